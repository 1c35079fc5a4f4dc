"""Split a network into a frozen prefix and the trainable rest, for last-k fine-tuning on cached activations.

Under scope "last-k" the blocks before the last k are frozen and, without augmentation, a fixed public
function of each image, exactly like the whole backbone under scope "head". Their output can then be
computed once (``dpcore.training.features``) and DP-SGD runs on the last k blocks alone: the same mechanism and
the same per-example gradients, without the forward pass through the frozen part at every step (on a
CPU most of a last-k step). The suffix module shares its parameters with the model, so training it
trains the model, and the whole model is saved.

Supported: timm's EfficientNet class (EfficientNet-Lite, MobileNetV2 / V1): ``conv_stem → bn1 →
blocks[0..n) → conv_head → bn2 → global_pool → classifier``. Other families return None and train
on images as before.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

_EFFNET_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")


class LastKSuffix(nn.Module):
    """blocks[start:] → conv_head → bn2 → pool → (dropout) → classifier of a timm EfficientNet-style model."""

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.start = start
        self.blocks = nn.Sequential(*list(model.blocks)[start:])
        self.conv_head, self.bn2 = model.conv_head, model.bn2
        self.global_pool, self.classifier = model.global_pool, model.classifier
        self.drop_rate = float(getattr(model, "drop_rate", 0.0) or 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(x)))
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)


def last_k_split(model: nn.Module, k: int) -> Optional[tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor],
                                                             LastKSuffix]]:
    """(prefix, suffix) with ``suffix(prefix(model, x)) == model(x)`` in eval mode, or None when the model
    has no known split. Every parameter of the prefix must be frozen (checked): otherwise caching its
    output would silently stop training it."""
    if not all(hasattr(model, p) for p in _EFFNET_PARTS) or not isinstance(model.blocks, nn.Sequential):
        return None
    n = len(model.blocks)
    if not 1 <= k <= n:
        return None
    start = n - k

    def prefix(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = m.bn1(m.conv_stem(x))
        for block in list(m.blocks)[:start]:
            x = block(x)
        return x

    frozen = [model.conv_stem, model.bn1, *list(model.blocks)[:start]]
    if any(p.requires_grad for part in frozen for p in part.parameters()):
        return None
    return prefix, LastKSuffix(model, start)
