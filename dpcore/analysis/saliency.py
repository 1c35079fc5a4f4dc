"""Grad-CAM saliency for a stored run, via the maintained `grad-cam` package (pytorch_grad_cam).

The target layer is chosen per backbone family. Where that layer's feature map is only 1×1 at the
run's input size (e.g. ResNet's layer4 on 32-pixel images) the map would carry no location at all,
so the next earlier candidate with a spatial grid is used, and `method` names the layer actually used.
The model is left as found (eval/train mode, requires_grad flags, .grad), so later predictions are
unaffected. The map is kept apart from the image it explains, so a page can re-blend it at any opacity
(`blend`) without running Grad-CAM again.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from models import get_spec

from dpcore.data import to_rgb
from dpcore.errors import DPCoreError
from dpcore.analysis.predict import LoadedRun


class SaliencyError(DPCoreError):
    """Grad-CAM cannot be computed for this model or input."""


DEFAULT_OPACITY = 0.4
# Matplotlib's "inferno" (CC0) at 17 evenly spaced points: perceptually uniform, dark for low and bright for
# high, readable in grey scale. Interpolated linearly to 256 levels below.
_INFERNO_ANCHORS = np.array([
    (0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110), (138, 34, 106),
    (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29), (249, 142, 9), (252, 172, 17),
    (249, 203, 53), (242, 234, 105), (252, 255, 164)], dtype=np.float64)
COLOUR_TABLE = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_INFERNO_ANCHORS)),
                                   _INFERNO_ANCHORS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def colour_map(heat: np.ndarray) -> np.ndarray:
    """HxW values in [0,1] → HxWx3 uint8 colours of COLOUR_TABLE (out-of-range and NaN values clipped)."""
    levels = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float64)), 0.0, 1.0)
    return COLOUR_TABLE[np.rint(levels * 255).astype(np.intp)]


def blend(image: Image.Image, heat: np.ndarray, opacity: float = DEFAULT_OPACITY) -> Image.Image:
    """The coloured map over `image` at `opacity` (0: the image alone, 1: the colour map alone). The map is
    resized (bilinear) to the image's size when they differ."""
    if not 0.0 <= float(opacity) <= 1.0:
        raise SaliencyError(f"opacity {opacity!r} is outside 0..1. Fix: pass a value from 0 (image only) "
                            "to 1 (map only)")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != rgb.shape[:2]:
        resized = Image.fromarray(heat, "F").resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR)
        heat = np.asarray(resized, dtype=np.float32)
    mixed = (1.0 - opacity) * rgb + opacity * colour_map(heat).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), "RGB")


@dataclass
class SaliencyResult:
    heatmap: np.ndarray  # HxW in [0,1] at the model input size, relative to this image's own maximum
    image: Image.Image  # RGB, the preprocessed input image the map explains (model input size)
    target_class: int
    method: str

    def blended(self, opacity: float = DEFAULT_OPACITY) -> Image.Image:
        return blend(self.image, self.heatmap, opacity)

    @property
    def overlay(self) -> Image.Image:
        return self.blended(DEFAULT_OPACITY)


def _last_conv(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)][-1:]


def _candidates(model: nn.Module, family: str) -> list[tuple[str, nn.Module]]:
    """(name, layer) to try, preferred first: the usual Grad-CAM layer, then earlier ones."""
    if family == "cnn":  # tiny_cnn: its conv blocks, last first
        return [(f"features.{i}", b) for i, b in reversed(list(enumerate(model.features)))]
    if family == "resnet":
        return [(f"{name}.{len(getattr(model, name)) - 1}", getattr(model, name)[-1])
                for name in ("layer4", "layer3", "layer2", "layer1")]
    if family == "vgg":  # last conv of the feature extractor, then the ones before it
        convs = [(f"features.{n}", m) for n, m in model.features.named_modules() if isinstance(m, nn.Conv2d)]
        return list(reversed(convs))
    if family == "convnext":
        return [(f"stages.{i}", s) for i, s in reversed(list(enumerate(model.stages)))]
    if family in ("vit", "beit"):
        i = len(model.blocks) - 1
        return [(f"blocks.{i}.norm1", model.blocks[-1].norm1)]
    raise SaliencyError(f"no Grad-CAM target layer is known for backbone family {family!r}. "
                        "Fix: add one in dpcore/analysis/saliency.py")


def _token_reshape(num_prefix_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, prefix + g², C) transformer tokens → (B, C, g, g), dropping the class token(s)."""
    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, num_prefix_tokens:, :]
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise SaliencyError(f"{patches.shape[1]} patch tokens do not form a square grid")
        return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)
    return reshape


def _grid_side(output: torch.Tensor, transformer: bool, prefix: int) -> int:
    if transformer:
        return math.isqrt(max(output.shape[1] - prefix, 0))
    return min(output.shape[-2:]) if output.dim() == 4 else 0


def _pick_layer(model: nn.Module, x: torch.Tensor, candidates, transformer: bool, prefix: int):
    """The first candidate whose feature map is at least 2×2 for this input (one probing forward pass)."""
    sides: dict[str, int] = {}
    handles = [layer.register_forward_hook(
        lambda _m, _i, out, name=name: sides.__setitem__(name, _grid_side(out, transformer, prefix)))
        for name, layer in candidates]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    for name, layer in candidates:
        if sides.get(name, 0) >= 2:
            return name, layer
    raise SaliencyError(f"every candidate layer ({', '.join(n for n, _ in candidates)}) has a 1×1 feature map "
                        f"at input size {tuple(x.shape[-2:])}, so Grad-CAM cannot localise anything. "
                        "Fix: train the run at a larger image size")


@contextmanager
def _gradients_enabled(model: nn.Module) -> Iterator[None]:
    """Grad-CAM needs gradients through the backbone (also for head-only runs); restore everything after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [m.training for m in model.modules()]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag, g in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = g
        for m, mode in zip(list(model.modules()), modes, strict=True):  # parents first: children end as found
            m.train(mode)


def saliency(loaded: LoadedRun, image: Image.Image, target_class: int | None = None) -> SaliencyResult:
    """Grad-CAM heatmap of `target_class` (None: the predicted class) for one image."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    n_classes = len(loaded.class_names)
    if target_class is not None and not (isinstance(target_class, (int, np.integer)) and 0 <= target_class < n_classes):
        raise SaliencyError(f"target class {target_class!r} is not a class index of this run (0..{n_classes - 1}). "
                            "Fix: pass None for the predicted class, or an index into the run's class names")
    family = get_spec(loaded.config.backbone).family
    model = loaded.model
    pixels = loaded.to_uint8(to_rgb(image))  # uint8 CHW at the model input size
    x = loaded.normalize(pixels.unsqueeze(0).to(loaded.device))
    transformer = family in ("vit", "beit")
    prefix = int(getattr(model, "num_prefix_tokens", 1)) if transformer else 0

    with _gradients_enabled(model):
        model.eval()
        name, layer = _pick_layer(model, x, _candidates(model, family), transformer, prefix)
        if target_class is None:
            with torch.no_grad():
                target_class = int(model(x).argmax(dim=1)[0])
        # not `with GradCAM(...)`: its __exit__ prints and swallows IndexError
        cam = GradCAM(model=model, target_layers=[layer],
                      reshape_transform=_token_reshape(prefix) if transformer else None)
        try:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(target_class))])[0]
        finally:
            cam.activations_and_grads.release()
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    shown = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy().astype(np.uint8), "RGB")
    method = f"Grad-CAM on {name}"
    if not heat.any():  # Grad-CAM keeps only evidence for the class; there may be none
        method += " (no region raises this class's score: the map is empty)"
    return SaliencyResult(heatmap=heat, image=shown, target_class=int(target_class), method=method)
