"""The registered backbones (names the run config may use) and their specs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dpcore.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: Optional[str]  # timm "architecture.tag" (None for our own tiny_cnn)
    family: str  # 'cnn' | 'vit' | 'beit' | 'resnet' | 'convnext' | 'vgg'
    pretrained_tag: Optional[str]  # what the pretrained weights were trained on, e.g. 'in1k', 'in22k'
    default_image_size: int
    description: str

    @property
    def is_transformer(self) -> bool:
        return self.family in ("vit", "beit")


_SPECS = [
    BackboneSpec("tiny_cnn", None, "cnn", None, 32,
                 "3 conv blocks (16-32-64 ch, GroupNorm), ~25k params; no pretrained weights; fast DP on CPU"),
    BackboneSpec("vgg11", "vgg11.tv_in1k", "vgg", "in1k", 224,
                 "VGG-11 (torchvision ImageNet-1k weights), ~133M params; the seed's older baseline"),
    BackboneSpec("beit_base_patch16_224.in22k_ft_in22k", "beit_base_patch16_224.in22k_ft_in22k", "beit", "in22k", 224,
                 "BEiT-B/16, self-supervised + fine-tuned on ImageNet-22k, ~86M params; the seed's model"),
    BackboneSpec("vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "vit", "in21k_ft_in1k", 224,
                 "ViT-Ti/16 (AugReg, ImageNet-21k then 1k), ~5.7M params"),
    BackboneSpec("vit_small_patch16_224", "vit_small_patch16_224.augreg_in21k_ft_in1k", "vit", "in21k_ft_in1k", 224,
                 "ViT-S/16 (AugReg, ImageNet-21k then 1k), ~22M params"),
    BackboneSpec("resnet18", "resnet18.a1_in1k", "resnet", "in1k", 224,
                 "ResNet-18 (timm A1 recipe, ImageNet-1k), ~11.7M params; BatchNorm becomes GroupNorm under DP"),
    BackboneSpec("resnet50", "resnet50.a1_in1k", "resnet", "in1k", 224,
                 "ResNet-50 (timm A1 recipe, ImageNet-1k), ~25.6M params; BatchNorm becomes GroupNorm under DP"),
    BackboneSpec("convnext_tiny", "convnext_tiny.fb_in1k", "convnext", "in1k", 224,
                 "ConvNeXt-T (Facebook, ImageNet-1k), ~28.6M params"),
    BackboneSpec("convnext_tiny.in22k", "convnext_tiny.fb_in22k", "convnext", "in22k", 224,
                 "ConvNeXt-T (Facebook, ImageNet-22k), ~28.6M params; compare with convnext_tiny (in1k)"),
]

_REGISTRY = {s.name: s for s in _SPECS}
_ALIASES = {"beit_base_in22k": "beit_base_patch16_224.in22k_ft_in22k"}


def list_models() -> list[str]:
    """Registered backbone names (aliases not included)."""
    return [s.name for s in _SPECS]


def get_spec(name: str) -> BackboneSpec:
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ConfigError(
            "backbone",
            f"unknown backbone {name!r}",
            "use one of: " + ", ".join(list_models()) + " (alias: " + ", ".join(_ALIASES) + ")",
        )
    return _REGISTRY[key]
