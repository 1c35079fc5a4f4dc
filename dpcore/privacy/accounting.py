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
from dp_accounting.pld import common as pld_common
from dp_accounting.pld import privacy_loss_distribution as pld_dist
from dp_accounting.pld import privacy_loss_mechanism as pld_mech
from dp_accounting.rdp import rdp_privacy_accountant

from dpcore.errors import ConfigError

ACCOUNTANTS = ("rdp", "pld")

# dp-accounting's own default orders (dense in (1, 11], integers to 63, then up to 1024).
RDP_ORDERS: tuple[float, ...] = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
# PLD ε is a pessimistic (valid) upper bound at any discretization; 1e-3 is 10-15x faster than the
# library default 1e-4 and moves ε by < 0.01% on DP-SGD plans (tests/test_accounting.py checks this).
PLD_DISCRETIZATION = 1e-3

# Bounds on what a plan may ask, so that a typo fails at once with a fix instead of hanging or overflowing.
# e^ε bounds how much one image can change the odds of any outcome: past ε = 100 (e^100 ≈ 10^43) nothing is promised.
MAX_EPSILON = 100.0
# Training and PLD plans: dp-accounting's PLD composition of T steps computes (grid size)**T as an exact integer
# first (pld_pmf.SparsePLDPmf.self_compose), ~1 s at 10^6 steps and growing faster than T; the trainer also keeps
# per-step schedules. 10^6 steps is ~3 h at 10 ms a step, 500x the chest X-ray preset (2,100). RDP `epsilon` and
# `calibrate_noise` answer any T.
MAX_STEPS = 1_000_000
# PLD grids (points of PLD_DISCRETIZATION): one step's, which dp-accounting builds at ~5 µs a point, and the
# composed one its FFT runs over (16 bytes a point, a few copies). Past these a query takes minutes or runs out of
# memory; such plans have a σ tiny for their q, or privacy losses spread over thousands of nats.
PLD_MAX_POINTS = 500_000
PLD_MAX_COMPOSED_POINTS = 20_000_000

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


def _check_pld_steps(steps: int) -> None:
    if steps > MAX_STEPS:
        raise ConfigError("steps", f"the PLD accountant composes at most {MAX_STEPS:,} steps, got {steps:,} "
                          "(dp-accounting's PLD composition slows down without bound past that)",
                          "use --accountant rdp, which composes any number of steps at once, or fewer steps")


def _pld_of(noise_multiplier: float, sample_rate: float, steps: int,
            relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    """The privacy-loss distribution of T DP-SGD steps, built as dp-accounting's PLDAccountant builds it (the
    same calls, so the same ε to the last bit), but refused with a ConfigError before work that would not finish."""
    _check_pld_steps(steps)
    adjacency = pld_mech.AdjacencyType
    kinds = ((adjacency.REPLACE,) if relation == dp_accounting.NeighboringRelation.REPLACE_ONE
             else (adjacency.REMOVE, adjacency.ADD))
    span = 0.0
    for kind in kinds:  # the loss range dp-accounting will discretize, from the mechanism alone (no grid yet)
        loss = pld_mech.GaussianPrivacyLoss(noise_multiplier, sampling_prob=sample_rate, adjacency_type=kind,
                                            pessimistic_estimate=True)
        tail = loss.privacy_loss_tail()
        span = max(span, abs(loss.privacy_loss(tail.lower_x_truncation) - loss.privacy_loss(tail.upper_x_truncation)))
    points = span / PLD_DISCRETIZATION
    if not points <= PLD_MAX_POINTS:
        raise ConfigError("noise_multiplier", f"σ = {noise_multiplier:g} at q = {sample_rate:g} is too little noise "
                          f"for the PLD accountant: one step's privacy loss spans {span:,.0f} nats, a grid of "
                          f"{points:,.0f} points (limit {PLD_MAX_POINTS:,})",
                          "use a larger σ, or --accountant rdp (which handles any σ)")
    one = pld_dist.from_gaussian_mechanism(noise_multiplier, value_discretization_interval=PLD_DISCRETIZATION,
                                           sampling_prob=sample_rate, neighboring_relation=relation)
    if steps > 1:
        composed = 0
        for pmf in (getattr(one, "_pmf_remove", None), getattr(one, "_pmf_add", None)):
            probs = getattr(pmf.to_dense_pmf(), "_probs", None) if pmf is not None else None
            if probs is not None:  # the bounds dp-accounting's own self_compose will use (Chernoff, tail 1e-15)
                lo, hi = pld_common.compute_self_convolve_bounds(probs, steps, 1e-15)
                composed = max(composed, hi - lo + 1)
        if composed > PLD_MAX_COMPOSED_POINTS:
            raise ConfigError("steps", f"{steps:,} steps of σ = {noise_multiplier:g} at q = {sample_rate:g} need a "
                              f"PLD grid of {composed:,} points (limit {PLD_MAX_COMPOSED_POINTS:,}): the privacy "
                              "loss of this plan spreads too wide to compose",
                              "use --accountant rdp, more noise or fewer steps")
    return one.self_compose(int(steps))


def _pld_epsilon(plds, delta: float) -> float:
    """ε at δ of composed PLDs, composed onto the identity exactly as PLDAccountant.compose does."""
    total = pld_dist.identity(value_discretization_interval=PLD_DISCRETIZATION)
    for one in plds:
        total = total.compose(one)
    return float(total.get_epsilon_for_delta(delta))


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
    if accountant == "pld":
        return _pld_epsilon([_pld_of(noise_multiplier, sample_rate, steps)], delta)
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
    return _pld_epsilon([_pld_of(noise_multiplier, sample_rate, steps,
                                 dp_accounting.NeighboringRelation.REPLACE_ONE)], delta)


REPLACE = "replace"  # the relation tag of an event (σ, q, T, "replace"); 3-tuples are add/remove


def compose_events(events, delta: float, accountant: str) -> float:
    """ε at δ of DP-SGD events run on the same unit: (σ, q, T) under add/remove, (σ, q, T, "replace") under
    replace-one. With any replace-one event only PLD composes them (its privacy-loss distributions of both
    relations convolve); RDP then answers math.inf (no Poisson replace-one rule), so callers take min(RDP, PLD).
    PLD also answers math.inf for events past its work bounds (`_pld_of`): a valid bound that promises nothing,
    never an under-count, and callers keep RDP's answer."""
    live = [e for e in events if e[2] > 0]
    if not live:
        return 0.0
    if any(e[0] == 0 for e in live):
        return math.inf
    if accountant not in ACCOUNTANTS:
        raise ConfigError("accountant", f"unknown accountant {accountant!r}", f"use one of {ACCOUNTANTS}")
    replace = any(len(e) > 3 and e[3] == REPLACE for e in live)
    if accountant == "rdp":
        if replace:
            return math.inf
        acc = make_accountant(accountant)
        for s, q, t, *_ in live:
            acc.compose(dp_sgd_event(s, q, t))
        return float(acc.get_epsilon(delta))
    try:
        plds = [_pld_of(s, q, int(t), dp_accounting.NeighboringRelation.REPLACE_ONE if rel and rel[0] == REPLACE
                        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE) for s, q, t, *rel in live]
    except ConfigError:
        return math.inf
    if not replace:
        return _pld_epsilon(plds, delta)
    total = plds[0]
    for one in plds[1:]:
        total = total.compose(one)
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
    and takes one to three accountant calls instead of ~20. A target that no σ meets within that
    tolerance (ε jumps past it, e.g. to 0 below RDP's conversion floor, or from ∞ at a δ below PLD's
    truncation) is refused with a ConfigError rather than answered with a looser σ.
    """
    _check(accountant, None, sample_rate, steps, delta)
    if not target_epsilon > 0:
        raise ConfigError("epsilon", f"must be > 0, got {target_epsilon}", "pass a positive ε, or train non-private")
    if not target_epsilon <= MAX_EPSILON:
        raise ConfigError("epsilon", f"must be at most {MAX_EPSILON:g}, got {target_epsilon:g}: e^ε bounds how much "
                          f"one image can change the odds of any outcome, and e^{MAX_EPSILON:g} ≈ 10^43 promises "
                          "nothing", "pass a target ε of at most 10 for a meaningful guarantee (or train "
                          "--non-private for a baseline without one)")
    if steps == 0:
        raise ConfigError("steps", "a plan with 0 steps needs no noise", "train for at least one step")
    if accountant == "pld":
        _check_pld_steps(steps)  # before any search
    memo = _plan_memo(float(sample_rate), int(steps), float(delta), accountant)

    def eps_of(sigma: float) -> float:
        e = epsilon(sigma, sample_rate, steps, delta, accountant)
        with _MEMO_LOCK:
            memo[sigma] = e
        return e

    guess = 1.0
    if accountant != "rdp":  # PLD is tighter than RDP, so its σ lies at or below RDP's (cheap) σ
        try:
            guess = 0.97 * calibrate_noise(target_epsilon, delta, sample_rate, steps, "rdp", rtol)
        except ConfigError:
            pass  # RDP cannot meet this target: PLD may, from the default guess
    where = (f"ε = {target_epsilon:g} at q = {sample_rate:g}, T = {int(steps):,}, δ = {delta:g} "
             f"({accountant.upper()})")
    why = (f"one image is sampled at all with probability at most q·T = {sample_rate * steps:.3g} ≤ δ, so almost any "
           "σ meets the target" if sample_rate * steps <= delta else "")
    try:
        sigma = _solve_sigma(eps_of, memo, float(target_epsilon), rtol, guess)
    except ConfigError as exc:  # the PLD accountant refused a σ the search reached
        raise _unreachable(where, memo, target_epsilon, rtol, why or f"the search reached a σ the accountant "
                           f"refuses ({exc.problem})") from exc
    with _MEMO_LOCK:
        reached = memo.get(sigma)
    if reached is None or not target_epsilon * (1 - rtol) <= reached <= target_epsilon:
        raise _unreachable(where, memo, target_epsilon, rtol, why)
    return sigma


def _unreachable(where: str, memo: dict[float, float], target: float, rtol: float, why: str = "") -> ConfigError:
    """The error for a target ε no σ meets within rtol: names the nearest σ on each side and what they give."""
    with _MEMO_LOCK:
        items = sorted(memo.items())
    above = [(s, e) for s, e in items if e > target]
    below = [(s, e) for s, e in items if e <= target]
    seen = ""
    if above and below:
        (s1, e1), (s2, e2) = max(above), min(below)
        seen = f": the accountant gives ε = {e1:.4g} at σ = {s1:.8g} and ε = {e2:.4g} at σ = {s2:.8g}, nothing between"
    elif below:
        seen = f": ε stays at {min(below)[1]:.4g} or below down to σ = {min(below)[0]:.4g}"
    return ConfigError("epsilon", f"no σ gives {where} within {rtol:.1%} of the target{seen}"
                       + (f"; {why}" if why else ""),
                       "pick a target ε this accountant reaches for the plan, check δ and the sample rate "
                       "(q = batch size / data set size), or try the other accountant")


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
    """The (q, T) a run of this size trains with: the trainer, the CLI and the app all use this.

    Refuses plans over MAX_STEPS steps (a typo such as --epochs 100000000 would otherwise hang building the
    trainer's evaluation schedule)."""
    spe = math.ceil(n_train / batch_size)
    check_steps(epochs * spe, epochs, spe)
    return SamplingPlan(spe, 1.0 / spe, epochs * spe)


def check_steps(steps: int, epochs: int, steps_per_epoch: int) -> None:
    """A training plan's T = epochs × steps per epoch must stay within MAX_STEPS (see there for why)."""
    if steps > MAX_STEPS:
        fit = max(1, MAX_STEPS // steps_per_epoch)
        raise ConfigError("epochs", f"{epochs:,} epochs × {steps_per_epoch:,} steps per epoch = {steps:,} steps, more "
                          f"than the {MAX_STEPS:,} a run may take",
                          f"pass --epochs {fit:,} or fewer, or a larger --batch-size (fewer steps per epoch)")


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
