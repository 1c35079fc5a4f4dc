"""Preprocessing from the backbone's pretrained config, split in two so decoded images can be cached.

`to_uint8` (resize + center crop, PIL → uint8 CHW tensor) runs once per image and its output is
cached; `Normalizer` (÷255, mean/std) runs per batch on the training device. Training, evaluation
and prediction all go through these two, so a loaded run sees exactly its training preprocessing.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T


def make_to_uint8(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform for this config, minus ToTensor/Normalize, ending in a uint8 tensor."""
    full = create_transform(**_timm_args(data_config), is_training=False)
    geometric = [t for t in full.transforms if isinstance(t, (T.Resize, T.CenterCrop))]
    return T.Compose([*geometric, T.PILToTensor()])


def _timm_args(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: (tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]) for k in keys if k in cfg}


class Normalizer(torch.nn.Module):
    """uint8 batch (N,C,H,W) → float, scaled to [0,1] and standardised with the pretrained mean/std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    @classmethod
    def from_config(cls, data_config: dict[str, Any]) -> "Normalizer":
        return cls(data_config["mean"], data_config["std"])
