"""Exponential moving average of a model's weights (De et al. 2022), with its warm-up.

After each real optimizer step t (0-based count of updates so far) the shadow copy becomes
    ema ← d_t·ema + (1 − d_t)·θ,   d_t = min(decay, (1 + t) / (10 + t)),
so early on (d_0 = 0.1) the average follows the weights and later it averages over ~1/(1 − decay)
steps. Trainable parameters and floating-point buffers are averaged; frozen parameters are constant.

Privacy: the EMA is a function of the sequence of DP-SGD iterates only, each of which the DP
guarantee already covers (the accountant's ε is for releasing *every* iterate). Computing it, and
publishing the averaged weights instead of (or besides) the last iterate, is post-processing: it
costs no privacy and does not change ε.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def ema_decay_at(decay: float, t: int) -> float:
    """The decay used at update number ``t`` (0-based), with De et al.'s warm-up."""
    return min(float(decay), (1.0 + t) / (10.0 + t))


class EMA:
    """A shadow copy of ``module``'s trainable parameters and float buffers (same device)."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module, self.decay, self.updates = module, float(decay), 0
        self._tensors = self._live()
        self.shadow = {name: t.detach().clone() for name, t in self._tensors.items()}

    def _live(self) -> dict[str, torch.Tensor]:
        out = {name: p for name, p in self.module.named_parameters() if p.requires_grad}
        out.update({name: b for name, b in self.module.named_buffers() if b.is_floating_point()})
        return out

    @torch.no_grad()
    def update(self) -> float:
        """Fold the current weights into the average; returns the decay used."""
        d = ema_decay_at(self.decay, self.updates)
        for name, t in self._tensors.items():
            self.shadow[name].lerp_(t.detach(), 1.0 - d)
        self.updates += 1
        return d

    @torch.no_grad()
    def copy_to(self, module: nn.Module | None = None) -> None:
        """Overwrite the weights of ``module`` (default: the tracked one) with the averages."""
        target = self._tensors if module is None else dict(
            list(module.named_parameters()) + list(module.named_buffers()))
        for name, v in self.shadow.items():
            target[name].copy_(v)

    @contextmanager
    def swapped_in(self):
        """Temporarily put the averaged weights into the tracked module (restored afterwards)."""
        with torch.no_grad():
            backup = {name: t.detach().clone() for name, t in self._tensors.items()}
            self.copy_to()
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for name, t in self._tensors.items():
                    t.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)
