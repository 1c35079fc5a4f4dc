"""Learning-rate schedules over a run's logical steps: optional linear warm-up, then constant or cosine.

The factor multiplies the configured lr. It is set once per *real* optimizer step (for DP runs: only
when Opacus actually added noise and stepped, not after the virtual steps of a logical batch), so
step t of the schedule is the t-th parameter update whatever the physical batch size.
"""
from __future__ import annotations

import math

from dpcore.config import LR_SCHEDULES
MAX_WARMUP_FRACTION = 0.5


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """Number of warm-up steps: round(fraction · T), at least 1 when the fraction is > 0."""
    if warmup_fraction <= 0 or total_steps <= 0:
        return 0
    return max(1, round(warmup_fraction * total_steps))


def lr_factor(step: int, total_steps: int, schedule: str = "constant", warmup_fraction: float = 0.0) -> float:
    """Factor of the base lr for update number ``step`` (0-based: the first update is step 0).

    Warm-up: (step+1)/W for the first W = round(warmup_fraction·T) updates (so the first update is not
    taken at lr 0). Then "constant" keeps 1; "cosine" decays as ½(1 + cos(π·p)), p = (t − W)/(T − W) going
    from 0 at the end of the warm-up towards 1 (the last planned update still has a small positive lr).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; use one of {LR_SCHEDULES}")
    w = warmup_steps(total_steps, warmup_fraction)
    if step < w:
        return (step + 1) / w
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - w)
    progress = min(1.0, max(0.0, (step - w) / span))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Sets ``group["lr"] = base_lr · lr_factor(t)`` on an optimizer's param groups.

    Works on Opacus' DPOptimizer too (its param_groups are the wrapped optimizer's). Call ``apply(t)``
    before update t (``apply(0)`` once before training, then ``apply(t)`` after the t-th real step).
    """

    def __init__(self, optimizer, total_steps: int, schedule: str = "constant", warmup_fraction: float = 0.0):
        self.optimizer, self.total_steps = optimizer, int(total_steps)
        self.schedule, self.warmup_fraction = schedule, float(warmup_fraction)
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_factor = 1.0

    @property
    def active(self) -> bool:
        return self.schedule != "constant" or self.warmup_fraction > 0

    def apply(self, step: int) -> float:
        f = lr_factor(step, self.total_steps, self.schedule, self.warmup_fraction)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        self.last_factor = f
        return f

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
