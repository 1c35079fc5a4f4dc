"""Privacy accounting for DP-SGD, over Google's dp-accounting library.

This module is the single source of every ε the project shows: the trainer, the CLI and the app
all call it with the exact (σ, q, T, δ) of a run. DP-SGD with Poisson sampling is the event
`SelfComposed(PoissonSampled(q, Gaussian(σ)), T)` under the add-or-remove-one relation.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant

from .errors import ConfigError

ACCOUNTANTS = ("rdp", "pld")

# dp-accounting's own default orders (dense in (1, 11], integers to 63, then up to 1024).
RDP_ORDERS: tuple[float, ...] = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
# PLD ε is a pessimistic (valid) upper bound at any discretization; 1e-3 is 10-15x faster than the
# library default 1e-4 and moves ε by < 0.01% on DP-SGD plans (tests/test_accounting.py checks this).
PLD_DISCRETIZATION = 1e-3

# dp-accounting logs a warning per fractional order when q is large; the orders are still handled.
logging.getLogger("absl").setLevel(logging.ERROR)


def _check(accountant: str, sigma: float | None, q: float, steps: int, delta: float) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError("accountant", f"unknown accountant {accountant!r}", f"use one of {ACCOUNTANTS}")
    if sigma is not None and not (sigma >= 0 and math.isfinite(sigma)):
        raise ConfigError("noise_multiplier", f"must be a finite number ≥ 0, got {sigma}", "pass σ ≥ 0")
    if not 0 < q <= 1:
        raise ConfigError("sample_rate", f"must be in (0, 1], got {q}", "use batch size / data set size")
    if int(steps) != steps or steps < 0:
        raise ConfigError("steps", f"must be a whole number ≥ 0, got {steps}", "pass the number of optimizer steps")
    if not 0 < delta < 1:
        raise ConfigError("delta", f"must be in (0, 1), got {delta}", "use δ well below 1/n, e.g. 1e-5")


def make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant of the named kind with this project's settings."""
    if accountant == "rdp":
        return rdp.RdpAccountant(orders=RDP_ORDERS)
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    raise ConfigError("accountant", f"unknown accountant {accountant!r}", f"use one of {ACCOUNTANTS}")


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of T steps of Poisson-sampled Gaussian DP-SGD."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        int(steps),
    )


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε spent by `steps` DP-SGD steps with noise σ and Poisson rate q, at δ (inf when σ = 0)."""
    _check(accountant, noise_multiplier, sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(accountant)
    acc.compose(dp_sgd_event(noise_multiplier, sample_rate, steps))
    return float(acc.get_epsilon(delta))


def epsilon_replace_one(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε under replace-one adjacency (PLD; the RDP accountant has no Poisson replace-one rule).

    What a patient-level run promises ONE IMAGE of a patient who has other images: removing that image
    changes the patient's clipped gradient from one vector of norm ≤ C to another, so the sampled sum
    shifts by up to 2C — dp-accounting's REPLACE_ONE pair (1−q)N(0) + qN(∓C) under Poisson sampling.
    (An image that is its patient's only one is added or removed with the patient: `epsilon`.)
    """
    _check("pld", noise_multiplier, sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                            value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(dp_sgd_event(noise_multiplier, sample_rate, steps))
    return float(acc.get_epsilon(delta))


REPLACE = "replace"  # the relation tag of an event (σ, q, T, "replace"); 3-tuples are add/remove


def compose_events(events, delta: float, accountant: str) -> float:
    """ε at δ of DP-SGD events run on the same unit: (σ, q, T) under add/remove, (σ, q, T, "replace") under
    replace-one. With any replace-one event only PLD composes them (its privacy-loss distributions of both
    relations convolve); RDP then answers math.inf (no Poisson replace-one rule), so callers take min(RDP, PLD)."""
    live = [e for e in events if e[2] > 0]
    if not live:
        return 0.0
    if any(e[0] == 0 for e in live):
        return math.inf
    if not any(len(e) > 3 and e[3] == REPLACE for e in live):
        acc = make_accountant(accountant)
        for s, q, t, *_ in live:
            acc.compose(dp_sgd_event(s, q, t))
        return float(acc.get_epsilon(delta))
    if accountant == "rdp":
        return math.inf
    from dp_accounting.pld import privacy_loss_distribution as PLD

    total = None
    for s, q, t, *rel in live:
        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if rel and rel[0] == REPLACE
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        one = PLD.from_gaussian_mechanism(s, sampling_prob=q, value_discretization_interval=PLD_DISCRETIZATION,
                                          neighboring_relation=relation).self_compose(int(t))
        total = one if total is None else total.compose(one)
    return float(total.get_epsilon_for_delta(delta))


@lru_cache(maxsize=512)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp", rtol: float = 0.005
) -> float:
    """Smallest σ (within `rtol`) such that ε(σ, q, T, δ) ≤ target ε.

    A bracketing root search on log ε against log σ (nearly linear there), stopped once ε lies in
    [target·(1 − rtol), target]: the guarantee holds and is tight (within 1% by default). Every
    (σ, ε) the accountant computes is remembered per plan (q, T, δ, accountant), so calibrating
    further targets for the same plan (an ε sweep, the app's sliders) starts from a tight bracket
    and takes one to three accountant calls instead of ~20.
    """
    _check(accountant, None, sample_rate, steps, delta)
    if not target_epsilon > 0:
        raise ConfigError("epsilon", f"must be > 0, got {target_epsilon}", "pass a positive ε, or train non-private")
    if steps == 0:
        raise ConfigError("steps", "a plan with 0 steps needs no noise", "train for at least one step")
    memo = _plan_memo(float(sample_rate), int(steps), float(delta), accountant)

    def eps_of(sigma: float) -> float:
        e = epsilon(sigma, sample_rate, steps, delta, accountant)
        with _MEMO_LOCK:
            memo[sigma] = e
        return e

    guess = 1.0
    if accountant != "rdp":  # PLD is tighter than RDP, so its σ lies at or below RDP's (cheap) σ
        guess = 0.97 * calibrate_noise(target_epsilon, delta, sample_rate, steps, "rdp", rtol)
    return _solve_sigma(eps_of, memo, float(target_epsilon), rtol, guess)


_MEMO_LOCK = threading.Lock()
_MEMOS: "OrderedDict[tuple, dict[float, float]]" = OrderedDict()


def _plan_memo(q: float, steps: int, delta: float, accountant: str) -> dict[float, float]:
    """The remembered σ → ε evaluations of one plan (the 64 most recently used plans are kept)."""
    key = (q, steps, delta, accountant)
    with _MEMO_LOCK:
        memo = _MEMOS.pop(key, None) or {}
        _MEMOS[key] = memo
        while len(_MEMOS) > 64:
            _MEMOS.popitem(last=False)
        return memo


def _solve_sigma(eps_of, memo: dict[float, float], target: float, rtol: float, guess: float) -> float:
    """Illinois (regula falsi) on log ε(log σ) from the tightest known bracket; ε(result) ∈ [target(1 − rtol), target]."""
    floor = target * (1 - rtol)
    goal = math.log(target * (1 - rtol / 2))

    def known() -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
        with _MEMO_LOCK:
            items = list(memo.items())
        unsafe = [(s, e) for s, e in items if e > target]
        safe = [(s, e) for s, e in items if e <= target]
        return (max(unsafe) if unsafe else None), (min(safe) if safe else None)

    lo, hi = known()
    if lo is None and hi is None:
        eps_of(guess)
        lo, hi = known()
    for _ in range(200):  # bracket: ε ~ 1/σ overshoots the root, so one extrapolation usually suffices
        if lo is not None and hi is not None:
            break
        if hi is None:
            s, e = lo
            eps_of(s * max(1.1, min(e / target, 100.0) * 1.05) if math.isfinite(e) else s * 4)
        else:
            s, e = hi
            eps_of(s / max(1.1, min(target / max(e, 1e-300), 100.0) * 1.05))
        lo, hi = known()
    if hi[1] >= floor:
        return hi[0]

    def f(e: float) -> float:
        return math.log(e) - goal if 0 < e < math.inf else (math.inf if e > 0 else -math.inf)

    x_lo, f_lo, x_hi, e_hi = math.log(lo[0]), f(lo[1]), math.log(hi[0]), hi[1]
    f_hi = f(e_hi)
    side = 0
    for _ in range(100):
        if e_hi >= floor:
            break
        x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo) if math.isfinite(f_lo) and math.isfinite(f_hi) else math.nan
        if not x_lo < x < x_hi:
            x = (x_lo + x_hi) / 2  # the secant left the bracket: bisect
        e = eps_of(math.exp(x))
        if e <= target:
            x_hi, e_hi, f_hi = x, e, f(e)
            if side == 1:
                f_lo /= 2  # Illinois: the other end was kept twice, halve its weight
            side = 1
        else:
            x_lo, f_lo = x, f(e)
            if side == -1:
                f_hi /= 2
            side = -1
    return math.exp(x_hi)


@dataclass(frozen=True)
class SamplingPlan:
    """How a run samples: Opacus' Poisson loader uses q = 1/steps_per_epoch; T = epochs · steps_per_epoch."""

    steps_per_epoch: int
    sample_rate: float
    steps: int


def sampling_plan(n_train: int, batch_size: int, epochs: int) -> SamplingPlan:
    """The (q, T) a run of this size trains with: the trainer, the CLI and the app all use this."""
    spe = math.ceil(n_train / batch_size)
    return SamplingPlan(spe, 1.0 / spe, epochs * spe)


def epsilon_grid(n_train: int, noise_multiplier: float, delta: float, batch_sizes, epochs_list,
                 accountant: str = "rdp") -> list[list[float]]:
    """ε for each (epochs, batch size) pair at fixed σ: rows follow epochs_list, columns batch_sizes."""
    rows = []
    for epochs in epochs_list:
        row = []
        for b in batch_sizes:
            sp = sampling_plan(n_train, b, epochs)
            row.append(EpsilonTracker(noise_multiplier, sp.sample_rate, delta, accountant)(sp.steps))
        rows.append(row)
    return rows


@dataclass(frozen=True)
class PrivacyPlan:
    """Everything needed to state a run's guarantee: the accountant inputs and the ε they give."""

    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plan(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> PrivacyPlan:
    """σ calibrated for a target ε, and the ε that σ really gives for the planned (q, T)."""
    sigma = calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)
    with _MEMO_LOCK:  # the calibration already computed ε(σ) with these exact arguments
        eps = _MEMOS.get((float(sample_rate), int(steps), float(delta), accountant), {}).get(sigma)
    if eps is None:
        eps = epsilon(sigma, sample_rate, steps, delta, accountant)
    return PrivacyPlan(accountant, sigma, sample_rate, steps, delta, eps)


class EpsilonTracker:
    """ε after t steps for fixed (σ, q, δ); cheap enough to call after every training step under RDP.

    RDP composes additively, so the RDP vector of one step is computed once and scaled by t before
    dp-accounting's own RDP→(ε, δ) conversion; `epsilon` above is the reference this is tested against.
    PLD has no such shortcut: each call composes afresh (about a second), so the trainer asks for it
    only at scheduled steps (see `pld_schedule`).
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float, accountant: str = "rdp"):
        _check(accountant, noise_multiplier, sample_rate, 0, delta)
        self.noise_multiplier, self.sample_rate, self.delta, self.accountant = (
            noise_multiplier, sample_rate, delta, accountant)
        self._rdp_one_step = None
        if accountant == "rdp" and noise_multiplier > 0:
            self._rdp_one_step = _rdp_one_step(noise_multiplier, sample_rate)

    @property
    def cheap(self) -> bool:
        return self.accountant == "rdp"

    def __call__(self, steps: int) -> float:
        if steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        if self._rdp_one_step is not None:
            eps, _ = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, self._rdp_one_step * steps, self.delta)
            return float(eps)
        return epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant)


@lru_cache(maxsize=64)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    acc = make_accountant("rdp")
    acc.compose(dp_sgd_event(noise_multiplier, sample_rate, 1))
    vec = getattr(acc, "_rdp", None)
    if vec is None:  # pragma: no cover - only if dp-accounting renames its internals
        raise RuntimeError("dp-accounting's RdpAccountant no longer exposes its RDP vector")
    vec = np.array(vec, dtype=float)
    vec.setflags(write=False)
    return vec


def checkpoint_steps(total_steps: int, points: int = 40) -> list[int]:
    """About `points` step counts from 1 to total_steps (always including both ends)."""
    if total_steps <= 0:
        return []
    if total_steps <= points:
        return list(range(1, total_steps + 1))
    grid = np.unique(np.round(np.linspace(1, total_steps, points)).astype(int))
    return [int(s) for s in grid]


def epsilon_curve(
    noise_multiplier: float, sample_rate: float, total_steps: int, delta: float,
    accountant: str = "rdp", steps: Sequence[int] | None = None,
) -> list[tuple[int, float]]:
    """(step, ε spent) pairs for a plan: what the ε-vs-step chart draws."""
    tracker = EpsilonTracker(noise_multiplier, sample_rate, delta, accountant)
    grid = list(steps) if steps is not None else checkpoint_steps(total_steps, 100 if tracker.cheap else 25)
    return [(int(s), tracker(int(s))) for s in grid]
