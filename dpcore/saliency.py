"""Grad-CAM saliency for a stored run, via the maintained `grad-cam` package (pytorch_grad_cam).

The target layer is chosen per backbone family. Where that layer's feature map is only 1×1 at the
run's input size (e.g. ResNet's layer4 on 32-pixel images) the map would carry no location at all,
so the next earlier candidate with a spatial grid is used, and `method` names the layer actually used.
The model is left as found (eval/train mode, requires_grad flags, .grad), so later predictions are
unaffected.
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

from .data import to_rgb
from .errors import DPCoreError
from .predict import LoadedRun


class SaliencyError(DPCoreError):
    """Grad-CAM cannot be computed for this model or input."""


@dataclass
class SaliencyResult:
    heatmap: np.ndarray  # HxW in [0,1] at the model input size
    overlay: Image.Image  # RGB, heatmap over the preprocessed input image
    target_class: int
    method: str


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
                        "Fix: add one in dpcore/saliency.py")


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
    from pytorch_grad_cam.utils.image import show_cam_on_image
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
    rgb = pixels.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255.0
    overlay = Image.fromarray(show_cam_on_image(rgb, heat, use_rgb=True), "RGB")
    method = f"Grad-CAM on {name}"
    if not heat.any():  # Grad-CAM keeps only evidence for the class; there may be none
        method += " (no region raises this class's score: the map is empty)"
    return SaliencyResult(heatmap=heat, overlay=overlay, target_class=int(target_class), method=method)
