"""Membership-inference audit of a run's training mechanism: loss threshold (Yeom et al. 2018) and LiRA
(Carlini et al. 2022), with a valid one-run lower bound on ε (Steinke, Nasr & Jagielski 2023,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023).

What is audited, and why
------------------------
The run's own model was trained on its whole train split, so its membership is not random and no
statistical bound can be drawn from it. The audit therefore replays the run's *mechanism* on fresh
models: the candidates are the run's train ∪ test images (or a random subset), and

* a **target** model is trained on the candidates each included **independently with probability 1/2**
  (so membership is random, as the one-run theorem requires: not an exact half);
* **S shadow models** are trained on random halves chosen independently of the target's draw (each
  candidate IN for half of them: Carlini et al.'s scheme), which only the LiRA scores use.

Every model is trained by the trainer's own loop, `dpcore.training.trainer.fit_arrays`, with the run's stored
config — augmult and augmentation policy, EMA, lr schedule, warm-up, optimizer, weight standardisation,
scope — and, for a private run, exactly its card's (σ, q, T) (and C from the config): each audited
model is the run's mechanism, with the same ε (the accountant depends on σ, q, T and δ only). A
non-private run is replayed at its q for its T steps. ``scope="head"`` audits the head-only proxy (the
same mechanism on cached frozen-backbone features; no augmentation there) in seconds on a CPU.

Attacks (higher score = "member"); their AUC and TPR at low FPR are descriptive statistics, not bounds:
* loss: score = −loss of the target on the candidate's true label (Yeom et al.);
* LiRA online: per-candidate Gaussians of φ = log(p/(1−p)) of the true class over the shadows where
  it was IN and where it was OUT (a variance shared by all candidates, as Carlini et al. advise for few
  shadows); score = log N(φ_target; IN) − log N(φ_target; OUT);
* LiRA offline: only the OUT Gaussian; score = (φ_target − μ_out)/σ_out.

The ε lower bound (the only figure called a bound)
-------------------------------------------------
All m candidates are canaries of one training run, so they are not independent trials and a
Clopper-Pearson interval on their rates is not valid. Steinke et al.'s theorem is: let S ∈ {−1, +1}^m
have independent uniform coordinates (candidate i is trained on iff S_i = +1), let the training
algorithm be (ε, δ)-DP with respect to changing one S_i, and let T = A(model) ∈ {−1, 0, +1}^m be any
guesses computed from the trained model with ‖T‖₁ = r; let W = #{i : T_i = S_i} be the correct ones.
With f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v], for every v

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i=1..m} (f(v − i) − f(v)) / i

(for δ = 0 this is the binomial tail f(v)). The attacker here ranks the candidates by an attack's score,
guesses "in" for the k₊ highest and "out" for the k₋ lowest and abstains on the rest (r = k₊ + k₋; ties
broken at random); v is its number of correct guesses, and the bound is the largest ε whose p-value (the
right-hand side) stays ≤ β, at δ = the run's δ. When 2mδ ≤ 1 the right-hand side increases with ε and
decreases with v, so that ε is exceeded by the true ε with probability ≤ β; the audit caps m at 1/(2δ).

Multiplicity: the attacks (3) and the (k₊, k₋) choices (`GUESS_GRID`, fractions of m, 6 of them) are
fixed before any score is seen, each bound is computed at β = 0.05 / (3 × 6) (Bonferroni), and the
maximum over all 18 is reported: a valid 95 % lower bound on the ε of the audited mechanism (at the
run's δ), whatever choice happens to give it.

The privacy ledger: the audit trains S + 1 models on the candidate images with no guarantee covering its
own statistics, so it is a non-private use of them. Before anything is trained it is recorded in the
ledger (`Ledger.record_use`, kind "audit"), which voids those images' per-image ε; if that fails the
audit trains nothing. Its figures are covered by no DP guarantee.

Audits are written to ``<run dir>/audit.json``; ``start_audit`` runs one on a daemon thread and keeps
``<run dir>/audit_progress.json`` up to date for the app to poll.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import special, stats
from sklearn.metrics import roc_auc_score, roc_curve

from dpcore.config import RunConfig
from dpcore.errors import DPCoreError
from dpcore.process import alive
from dpcore.store.runs import RunStore

AUDIT_FILE = "audit.json"
PROGRESS_FILE = "audit_progress.json"
AUDIT_VERSION = 2
ATTACKS = ("loss", "lira_online", "lira_offline")
ATTACK_LABELS = {"loss": "Loss threshold (Yeom)", "lira_online": "LiRA online (IN+OUT)",
                 "lira_offline": "LiRA offline (OUT only)"}
FPR_POINTS = (0.01, 0.001)
MAX_CURVE_POINTS = 400
CONFIDENCE = 0.95
# (k₊, k₋) as fractions of the m candidates: "in" for the k₊ highest scores, "out" for the k₋ lowest.
# Fixed in advance (never chosen from the scores), so the Bonferroni correction below covers the choice.
GUESS_GRID: tuple[tuple[float, float], ...] = (
    (0.01, 0.0), (0.05, 0.0), (0.1, 0.0), (0.05, 0.05), (0.15, 0.15), (0.5, 0.5))
METHOD = "one-run audit (Steinke, Nasr & Jagielski 2023, 'Privacy Auditing with One (1) Training Run')"
THEOREM = ("P[W ≥ v] ≤ f(v) + 2·m·δ·max_{i=1..m} (f(v−i) − f(v))/i, "
           "f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v], for m candidates each trained on independently with "
           "probability 1/2, r guesses, W correct")
LEDGER_STATEMENT = ("The audit is recorded in the privacy ledger as a non-private use of the candidate images: "
                    "it trains the target and shadow models on them with no guarantee covering its statistics, "
                    "which voids their per-image ε (∞ in the ledger). Its figures — AUC, TPR and the ε lower "
                    "bound — are covered by no differential-privacy guarantee.")

Progress = Callable[[int, int, str], None]


class AuditCancelled(DPCoreError):
    pass


# -- the one-run bound (Steinke, Nasr & Jagielski 2023) -----------------------------------------
def _check_m_delta(m: int, delta: float) -> None:
    """The p-value is provably monotone in ε and v (what makes the inverted bound valid) when 2·m·δ ≤ 1."""
    if not 0 <= delta < 1:
        raise DPCoreError(f"δ must be in [0, 1) for the one-run bound, got {delta}")
    if 2 * m * delta > 1:
        raise DPCoreError(f"{m} candidates at δ={delta:g}: the one-run bound needs 2·m·δ ≤ 1. "
                          f"Fix: audit at most {math.floor(1 / (2 * delta))} candidates (--pool-size)")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Steinke et al.'s bound on P[W ≥ v] (module docstring) if the mechanism were (ε, δ)-DP: the p-value of
    v correct guesses out of r among m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v}, r={r}, m={m}")
    return float(_p_values(m, r, np.array([v]), np.array([float(epsilon)]), delta)[0])


def _p_values(m: int, r: int, v: np.ndarray, eps: np.ndarray, delta: float) -> np.ndarray:
    """`one_run_p_value` for arrays of (v, ε). The theorem's max runs over i = 1..m; for i > v its terms are
    (1 − f(v))/i (f(v−i) = 1), at most the i = v term, so i = 1..max(v) is computed (i > v included: exact).
    f(v−i) − f(v) = P[v−i ≤ Binomial ≤ v−1] is summed from the pmf, never a difference of tails."""
    v = np.asarray(v, dtype=np.int64)
    q = special.expit(np.asarray(eps, dtype=float))  # the accuracy of ε-DP randomized response
    tail = stats.binom.sf(v - 1, r, q)  # f(v) = P[Binomial(r, q) ≥ v]
    if delta > 0 and v.max(initial=0) > 0:
        i = np.arange(1, int(v.max()) + 1)
        pmf = stats.binom.pmf(v[:, None] - i[None, :], r, q[:, None])  # P[Binomial = v − i] (0 below 0)
        alpha = (np.cumsum(pmf, axis=1) / i).max(axis=1)  # max_i (f(v−i) − f(v)) / i
        tail = np.minimum(1.0, tail + 2 * m * delta * alpha)
    return np.where(v == 0, 1.0, tail)


def one_run_epsilons(m: int, r: int, v, delta: float, beta: float, tol: float = 1e-6) -> np.ndarray:
    """For each v: the largest ε whose p-value stays ≤ β (0 when even ε = 0 is not rejected), a (1 − β) lower
    bound on ε. Each term of the theorem's max, (1 − 2mδ/i)·f(v) + (2mδ/i)·f(v−i), increases with ε and
    decreases with v when 2mδ ≤ 1, so the p-value does too; bisection finds the boundary and returns its
    lower end (a rejected ε)."""
    _check_m_delta(m, delta)
    v = np.atleast_1d(np.asarray(v, dtype=np.int64))
    if np.any((v < 0) | (v > r)) or r > m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v in [{v.min()}, {v.max()}], r={r}, m={m}")
    out = np.zeros(len(v))
    live = _p_values(m, r, v, np.zeros(len(v)), delta) <= beta
    if not live.any():
        return out
    vv = v[live]
    lo, hi = np.zeros(len(vv)), np.ones(len(vv))
    while True:  # bracket: double hi until it is not rejected (the p-value tends to 1 as ε grows)
        grow = _p_values(m, r, vv, hi, delta) <= beta
        if not grow.any() or hi.max() > 1e4:
            break
        lo, hi = np.where(grow, hi, lo), np.where(grow, 2 * hi, hi)
    while (hi - lo).max() > tol:
        mid = (lo + hi) / 2
        ok = _p_values(m, r, vv, mid, delta) <= beta
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    out[live] = lo
    return out


def one_run_epsilon(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """`one_run_epsilons` of a single v."""
    return float(one_run_epsilons(m, r, [v], delta, beta)[0])


def guess_counts(m: int, grid: tuple[tuple[float, float], ...] = GUESS_GRID) -> list[tuple[int, int]]:
    """(k₊, k₋) of each grid point for m candidates (fractions of m, rounded up, k₊ + k₋ ≤ m)."""
    out = []
    for a, b in grid:
        k_plus = min(m, math.ceil(a * m))
        out.append((k_plus, min(m - k_plus, math.ceil(b * m))))
    return out


def correct_guesses(scores, member, pairs, rng: np.random.Generator) -> np.ndarray:
    """(G, R) correct guesses: for each (k₊, k₋) in `pairs`, of the attacker who says "in" for the k₊ highest
    scores and "out" for the k₋ lowest, abstaining on the rest (ties broken at random). Rows of 2-D
    inputs are independent repetitions; one sort serves every pair."""
    scores = np.nan_to_num(np.atleast_2d(np.asarray(scores, dtype=float)), nan=-np.inf)
    member = np.atleast_2d(np.asarray(member, dtype=bool))
    m = scores.shape[-1]
    shuffled = rng.permuted(np.broadcast_to(np.arange(m), scores.shape), axis=-1)  # random order among ties
    order = np.take_along_axis(shuffled, np.argsort(np.take_along_axis(scores, shuffled, -1), -1, kind="stable"), -1)
    ranked = np.take_along_axis(member, order, axis=-1)  # membership by ascending score
    ins_from_top = np.concatenate([np.zeros((len(ranked), 1), int), np.cumsum(ranked[:, ::-1], -1)], -1)
    outs_from_bottom = np.concatenate([np.zeros((len(ranked), 1), int), np.cumsum(~ranked, -1)], -1)
    return np.stack([ins_from_top[:, kp] + outs_from_bottom[:, km] for kp, km in pairs])


def bonferroni_beta(n_attacks: int, n_guesses: int, confidence: float = CONFIDENCE) -> float:
    """Each test's level so that all n_attacks × n_guesses bounds hold together with `confidence`."""
    return (1 - confidence) / (n_attacks * n_guesses)


def epsilon_bounds(scores: Mapping[str, Any], member, delta: float, *, grid=GUESS_GRID,
                   confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """The whole bound procedure: for every attack (a key of `scores`) and every grid point, v and the ε lower
    bound at the Bonferroni β. Score arrays may be (m,) or (R, m) (R repetitions, vectorised); returns
    'epsilon'/'correct': {attack: (G, R)}, 'best': (R,) — the maximum, valid jointly at `confidence`."""
    member = np.atleast_2d(np.asarray(member, dtype=bool))
    m = member.shape[-1]
    _check_m_delta(m, delta)
    pairs = guess_counts(m, grid)
    beta = bonferroni_beta(len(scores), len(pairs), confidence)
    rng = np.random.default_rng([seed, 2])  # tie-breaking: a stream of its own, independent of the membership draw
    eps_all, correct_all = {}, {}
    for name, s in scores.items():
        eps = np.zeros((len(pairs), len(member)))
        correct = np.zeros((len(pairs), len(member)), dtype=np.int64)
        counts = correct_guesses(s, member, pairs, rng)
        for g, (kp, km) in enumerate(pairs):
            v = counts[g]
            seen, where = np.unique(v, return_inverse=True)
            eps[g] = one_run_epsilons(m, kp + km, seen, float(delta), beta)[where.reshape(-1)]
            correct[g] = v
        eps_all[name], correct_all[name] = eps, correct
    best = np.max(np.stack(list(eps_all.values())), axis=(0, 1))
    return {"m": m, "delta": float(delta), "beta": beta, "confidence": confidence, "guesses": pairs,
            "epsilon": eps_all, "correct": correct_all, "best": best}


def bound_report(scores: Mapping[str, np.ndarray], member: np.ndarray, delta: float, *, seed: int = 0) -> dict:
    """`epsilon_bounds` of one audit, as audit.json stores it: every (attack, k₊, k₋) with r, v and its bound,
    each attack's maximum, the overall maximum, and the confidence and correction in words."""
    res = epsilon_bounds(scores, member, delta, seed=seed)
    n_a, n_g = len(scores), len(res["guesses"])
    attacks = {}
    for name in scores:
        rows = [{"k_plus": kp, "k_minus": km, "guesses": kp + km, "correct": int(res["correct"][name][g, 0]),
                 "epsilon_lb": float(res["epsilon"][name][g, 0])} for g, (kp, km) in enumerate(res["guesses"])]
        top = max(rows, key=lambda row: row["epsilon_lb"])
        attacks[name] = {"epsilon_lb": top["epsilon_lb"], "k_plus": top["k_plus"], "k_minus": top["k_minus"],
                         "grid": rows}
    best = max(attacks, key=lambda a: attacks[a]["epsilon_lb"])
    return {
        "method": METHOD, "theorem": THEOREM, "m": res["m"], "delta": res["delta"],
        "confidence": CONFIDENCE, "beta": res["beta"], "n_tests": n_a * n_g,
        "grid_fractions": [list(p) for p in GUESS_GRID],
        "correction": (f"Bonferroni over {n_a} attacks × {n_g} guess counts (k₊, k₋) fixed in advance: each bound "
                       f"at β = {1 - CONFIDENCE:g}/{n_a * n_g} = {res['beta']:.3g}, so all hold together with "
                       f"{CONFIDENCE:.0%} confidence and so does their maximum"),
        "attacks": attacks, "epsilon_lb": attacks[best]["epsilon_lb"], "attack": best,
        "k_plus": attacks[best]["k_plus"], "k_minus": attacks[best]["k_minus"],
    }


# -- attacks ------------------------------------------------------------------------------------------
@torch.no_grad()
def confidences(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, normalize=None,
                device: torch.device | str = "cpu", batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per example: φ = log(p_y / (1 − p_y)) of the true class (computed from the logits, stably) and the loss."""
    device = torch.device(device)
    normalize = (normalize or torch.nn.Identity()).to(device)
    model.eval()
    phis, losses = [], []
    for start in range(0, len(y), batch):
        logits = model(normalize(x[start:start + batch].to(device))).double().cpu()
        yb = y[start:start + batch]
        true = logits.gather(1, yb[:, None])[:, 0]
        others = logits.scatter(1, yb[:, None], float("-inf"))
        phis.append(true - torch.logsumexp(others, dim=1))
        losses.append(torch.nn.functional.cross_entropy(logits, yb, reduction="none"))
    return torch.cat(phis).numpy(), torch.cat(losses).numpy()


def membership_matrix(n: int, shadows: int, rng: np.random.Generator) -> np.ndarray:
    """(S, n) bool: each candidate IN for ⌊S/2⌋ or ⌈S/2⌉ shadows, at random (Carlini et al.'s scheme)."""
    order = rng.random((shadows, n)).argsort(axis=0)
    return order < shadows / 2


def lira_scores(phi_target: np.ndarray, phi_shadow: np.ndarray, keep: np.ndarray,
                fixed_variance: bool = True) -> dict[str, np.ndarray]:
    """Online (IN and OUT Gaussians) and offline (OUT only) LiRA scores; higher means 'member'."""
    phi_shadow = np.asarray(phi_shadow, dtype=float)
    keep = np.asarray(keep, dtype=bool)
    out = ~keep

    def moments(mask):
        cnt = mask.sum(0)
        mean = np.where(cnt > 0, (phi_shadow * mask).sum(0) / np.maximum(cnt, 1), np.nan)
        resid = np.where(mask, phi_shadow - mean, 0.0)
        var = (resid ** 2).sum(0) / np.maximum(cnt - 1, 1)
        if fixed_variance or np.any(cnt < 2):
            pooled = (resid ** 2).sum() / max(int((cnt - 1).clip(min=0).sum()), 1)
            var = np.full_like(var, pooled) if fixed_variance else np.where(cnt < 2, pooled, var)
        return mean, np.sqrt(np.maximum(var, 1e-12))

    mu_in, sd_in = moments(keep)
    mu_out, sd_out = moments(out)
    offline = (phi_target - mu_out) / sd_out
    online = stats.norm.logpdf(phi_target, mu_in, sd_in) - stats.norm.logpdf(phi_target, mu_out, sd_out)
    # A candidate without IN (or OUT) shadows falls back to the offline score (or to φ itself).
    online = np.where(np.isnan(mu_in), offline, online)
    offline = np.where(np.isnan(mu_out), phi_target, offline)
    online = np.where(np.isnan(online), offline, online)
    return {"lira_online": online, "lira_offline": offline}


def attack_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Descriptive statistics of one attack (no sampling error, not bounds): ROC-AUC, TPR at 1 % and 0.1 % FPR
    and the ROC curve (thinned)."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    fpr, tpr, _ = roc_curve(labels, scores)
    out: dict[str, Any] = {"auc": float(roc_auc_score(labels, scores))}
    for target in FPR_POINTS:
        ok = fpr <= target
        out[f"tpr_at_{target:g}_fpr"] = float(tpr[ok].max()) if ok.any() else 0.0
    out["curve"] = _thin_curve(fpr, tpr)
    return out


def _thin_curve(fpr: np.ndarray, tpr: np.ndarray, points: int = MAX_CURVE_POINTS) -> dict[str, list[float]]:
    """At most `points` ROC points, spread evenly in log(FPR) so the low-FPR end (what matters) stays."""
    if len(fpr) > points:
        grid = np.unique(np.concatenate([[0, len(fpr) - 1], np.searchsorted(
            fpr, np.geomspace(max(fpr[fpr > 0].min(), 1e-6), 1, points - 2))]).clip(0, len(fpr) - 1))
        fpr, tpr = fpr[grid], tpr[grid]
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}


# -- the audit on arrays ---------------------------------------------------------------------------
@dataclass
class AuditSettings:
    shadows: int = 8
    seed: int = 0
    pool_size: int | None = None  # at most this many candidates (a random subset of train ∪ test); None: all
    fixed_variance: bool = True
    device: str = "cpu"


def audit_arrays(x: torch.Tensor, y: torch.Tensor, make_model: Callable[[int], torch.nn.Module], config: RunConfig,
                 settings: AuditSettings, *, spending, mechanism: tuple[float | None, float, int] | None = None,
                 normalize: torch.nn.Module | None = None, physical_batch: int | None = None,
                 head_only: bool = False, created_weights: dict | None = None, progress: Progress | None = None,
                 cancel: threading.Event | None = None, owners=None) -> dict[str, Any]:
    """Train the target (each candidate in with probability 1/2) and S shadows (each candidate IN for half of
    them) on the candidates (x, y) with `dpcore.training.trainer.fit_arrays(config, …, mechanism=mechanism)`, score
    every candidate with each attack and bound ε. `make_model(seed)` returns a fresh model to train;
    `spending` is the ledger hold every fit counts its steps on (the caller records the use first).

    ``owners`` (one patient / lesion id per candidate; a patient-level run): membership is that of a whole
    patient — all of their images in or out together, each patient with probability 1/2 —, every model trains
    patient-level DP-SGD over its patients, a patient's score is the mean of their images' scores, and the
    bound is over patients."""
    from dpcore.training import trainer
    from dpcore.privacy.units import UnitPlan

    if settings.shadows < 2:
        raise DPCoreError("LiRA needs at least 2 shadow models (8 to 16 is usual)")
    unit_of_row = None if owners is None else np.unique(np.asarray(owners, dtype=object).astype(str),
                                                        return_inverse=True)[1]
    n = len(y) if unit_of_row is None else int(unit_of_row.max()) + 1  # the candidates: images, or patients
    if n < 20:
        raise DPCoreError(f"{n} candidates are too few for a membership audit")
    _check_m_delta(n, config.delta)
    # Separate streams: the one-run theorem's S (independent Bernoulli(1/2) draws), the shadows' halves, and
    # (in epsilon_bounds) the attacker's tie-breaking must not share random bits.
    target_in = np.random.default_rng([settings.seed, 0]).random(n) < 0.5
    keep = membership_matrix(n, settings.shadows, np.random.default_rng([settings.seed, 1]))

    def rows_of(member: np.ndarray) -> np.ndarray:
        return np.flatnonzero(member if unit_of_row is None else member[unit_of_row])

    def per_candidate(v: np.ndarray) -> np.ndarray:  # image values → the mean over each patient's images
        if unit_of_row is None:
            return v
        return np.bincount(unit_of_row, weights=v, minlength=n) / np.bincount(unit_of_row, minlength=n)
    total = settings.shadows + 1
    report = progress or (lambda done, tot, msg: None)
    phis, losses, infos, timings = [], [], [], []
    for k in range(total):
        member = target_in if k == 0 else keep[k - 1]
        report(k, total, "training the target model" if k == 0 else f"training shadow {k} of {settings.shadows}")
        t = time.time()
        seed = settings.seed * 1000 + k
        torch.manual_seed(seed)  # the public randomness (init, augmentation, shuffling); DP noise is secret
        rows = rows_of(member)
        idx = torch.as_tensor(rows)
        try:
            model, info = trainer.fit_arrays(
                config, make_model(seed), x[idx], y[idx], spending=spending, normalize=normalize,
                device=settings.device, mechanism=mechanism, physical_batch=physical_batch, head_only=head_only,
                cancel=cancel, created_weights=created_weights,
                units=None if unit_of_row is None else UnitPlan(unit_of_row[rows], name="patient"))
        except trainer.Cancelled as exc:
            raise AuditCancelled("audit cancelled") from exc
        if mechanism is not None and info["steps"] != int(mechanism[2]):
            raise RuntimeError(f"model {k} took {info['steps']} steps, the run {mechanism[2]}: not the run's mechanism")
        phi, loss = confidences(model, x, y, normalize=normalize, device=settings.device)
        phis.append(per_candidate(phi))
        losses.append(per_candidate(loss))
        infos.append({key: info.get(key) for key in ("private", "epsilon", "delta", "noise_multiplier",
                                                     "sample_rate", "steps", "expected_batch_size", "clip_norm")})
        timings.append(time.time() - t)
    report(total, total, "scoring")
    phi_t, loss_t = phis[0], losses[0]
    scores = {"loss": -loss_t, **lira_scores(phi_t, np.stack(phis[1:]), keep, settings.fixed_variance)}
    attacks = {name: {**attack_metrics(scores[name], target_in), "descriptive": True} for name in ATTACKS}
    bounds = bound_report({name: scores[name] for name in ATTACKS}, target_in, config.delta, seed=settings.seed)
    for name in ATTACKS:
        b = bounds["attacks"][name]
        attacks[name].update(epsilon_lb=b["epsilon_lb"], k_plus=b["k_plus"], k_minus=b["k_minus"])
    return {
        "attacks": attacks, "bound": bounds,
        "n_candidates": n, "n_members": int(target_in.sum()), "n_nonmembers": int((~target_in).sum()),
        "candidate_unit": "image" if unit_of_row is None else "patient",
        "n_candidate_images": len(y),
        "membership": ("each candidate in the target's training set independently with probability 1/2"
                       if unit_of_row is None else
                       "each patient (with ALL of their images) in the target's training set independently with "
                       "probability 1/2; a patient's score is the mean of their images' scores"),
        "target": {"train_accuracy_proxy": float(np.mean(phi_t[target_in] > 0)),
                   "mean_loss_members": float(loss_t[target_in].mean()),
                   "mean_loss_nonmembers": float(loss_t[~target_in].mean()), **infos[0]},
        "models": infos,
        "timings": {"per_model_s": [round(t, 3) for t in timings], "train_s": round(sum(timings), 3)},
    }


# -- the audit of a stored run -------------------------------------------------------------------------
def run_mechanism(config: RunConfig, card: dict[str, Any]) -> tuple[float | None, float, int]:
    """(σ, q, T) of a finished private run as its card records them; (None, q, T) of a non-private one (its
    q = 1/⌈n/batch⌉ and the steps it took), for `fit_arrays` to replay exactly."""
    from dpcore.privacy import accounting

    p = card.get("privacy") or {}
    if config.private:
        if p.get("noise_multiplier") is None or p.get("sample_rate") is None or not p.get("steps"):
            raise DPCoreError("the run's card records no (σ, q, T); only finished runs can be audited")
        return float(p["noise_multiplier"]), float(p["sample_rate"]), int(p["steps"])
    plan = accounting.sampling_plan(int(card["dataset"]["n_train"]), config.batch_size, config.epochs)
    return None, plan.sample_rate, int(p.get("steps") or plan.steps)


@dataclass
class _Pool:
    """The candidates (rows of x, y), where each came from (split and ImageList index), and how to train."""

    x: torch.Tensor
    y: torch.Tensor
    is_train: np.ndarray
    source_index: np.ndarray  # index into splits.train (is_train) or splits.test of each row
    splits: Any
    make_model: Callable[[int], torch.nn.Module]
    normalize: torch.nn.Module
    physical: int
    fit_config: RunConfig
    created_weights: dict
    proxy_changes: dict[str, Any] | None
    owners: np.ndarray | None = None  # patient-level runs: each candidate's patient (lesion)

    def take(self, rows: np.ndarray) -> None:
        idx = torch.as_tensor(rows)
        self.x, self.y = self.x[idx], self.y[idx]
        self.is_train, self.source_index = self.is_train[rows], self.source_index[rows]
        if self.owners is not None:
            self.owners = self.owners[rows]


def _proxy_config(config: RunConfig) -> tuple[RunConfig, dict[str, Any] | None]:
    """The config the head-only proxy trains with: the run's, less what cached features cannot do."""
    if config.scope == "head":
        return config, None
    changes = {"scope": "head", "augmult": 1, "augment": "none", "weight_standardization": False}
    was = {k: getattr(config, k) for k in changes}
    return config.replace(**changes), {"from": was, "to": changes,
                                       "why": "a head on cached features of un-augmented images; the run's "
                                              "weight standardisation is baked into the frozen backbone"}


def _pool(store: RunStore, config: RunConfig, scope: str, device: torch.device, log: Callable[[str], None]) -> _Pool:
    """Candidates (train ∪ test of the run's data set), the model factory, the normalisation and the config."""
    import models

    from dpcore.training import features
    from dpcore.data import load_dataset, materialize
    from dpcore.training.preprocess import Normalizer, make_to_uint8

    torch.manual_seed(config.seed)  # the same random backbone as the run's (it seeds before building)
    np.random.seed(config.seed)
    splits = load_dataset(config.dataset, config.data_dir, seed=config.seed, test_fraction=config.test_fraction,
                          cache_dir=config.cache_dir, medmnist_size=config.medmnist_size, split=config.split)
    created = models.create_model(config.backbone, len(splits.class_names), pretrained=config.pretrained,
                                  image_size=config.image_size, weight_standardization=config.weight_standardization)
    if scope == "head":
        fit_config, proxy = _proxy_config(config)
        if config.weight_standardization:  # the frozen backbone computes with standardised weights: bake them
            models.factory.bake_weight_standardization(created.model)
        models.set_trainable(created.model, "head")
        key = features.feature_key(
            dataset=config.dataset, data_dir=config.data_dir, seed=config.seed, test_fraction=config.test_fraction,
            medmnist_size=config.medmnist_size, skip_unreadable=config.skip_unreadable, splits=splits,
            backbone=config.backbone, weights=created.weights, backbone_hash=features.backbone_digest(created.model),
            data_config=created.data_config)
        feats = features.load_or_extract(
            key=key, cache_dir=features.default_cache_dir(store.root), splits=splits, model=created.model,
            data_config=created.data_config, device=device, skip_unreadable=config.skip_unreadable,
            batch_size=max(config.max_physical_batch_size, 64), log=log)
        skipped = {src for src, *_ in feats.skipped.get("train", [])}
        train_kept = [i for i in range(len(splits.train)) if splits.train.source(i) not in skipped]
        if len(train_kept) != len(feats.train_y):
            raise DPCoreError("the cached features do not match the readable training images: delete the feature "
                              "cache and audit again")
        x, y = torch.cat([feats.train_x, feats.test_x]), torch.cat([feats.train_y, feats.test_y])
        kept = (train_kept, list(feats.test_kept))
        head = created.model.get_classifier()
        init = copy.deepcopy(head).cpu()
        normalize: torch.nn.Module = torch.nn.Identity()
        n_out = sum(p.numel() for p in head.parameters())
        physical = max(config.max_physical_batch_size, min(8192, int(32e6 // max(n_out, 1))))  # as the trainer

        def make_model(seed: int) -> torch.nn.Module:
            torch.manual_seed(seed)
            m = copy.deepcopy(init)
            for layer in m.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            return m
    else:
        fit_config, proxy = config, None
        to_uint8 = make_to_uint8(created.data_config)
        log(f"decoding {len(splits.train)} train + {len(splits.test)} test images")
        tr = materialize(splits.train, to_uint8, skip_unreadable=config.skip_unreadable)
        te = materialize(splits.test, to_uint8, skip_unreadable=config.skip_unreadable)
        x, y = torch.cat([tr.images, te.images]), torch.cat([tr.labels, te.labels])
        kept = (list(tr.kept), list(te.kept))
        init_state = copy.deepcopy(created.model.state_dict())
        template = created.model
        normalize = Normalizer.from_config(created.data_config)
        physical = config.max_physical_batch_size

        def make_model(seed: int) -> torch.nn.Module:
            # Every model starts from the run's initial weights (pretrained, or its seeded random init, weight
            # standardisation included); the classifier head is re-drawn per model.
            m = copy.deepcopy(template)
            m.load_state_dict(init_state)
            torch.manual_seed(seed)
            for layer in m.get_classifier().modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            models.set_trainable(m, config.scope, config.trainable_blocks)
            return m
    is_train = np.r_[np.ones(len(kept[0]), bool), np.zeros(len(kept[1]), bool)]
    pool = _Pool(x=x, y=y, is_train=is_train, source_index=np.r_[kept[0], kept[1]].astype(np.int64),
                 splits=splits, make_model=make_model, normalize=normalize, physical=physical,
                 fit_config=fit_config, created_weights=created.weights, proxy_changes=proxy)
    if config.privacy_unit == "patient":
        pool.owners = _owners(splits, config.dataset, kept)
    return pool


def _owners(splits, dataset: str, kept) -> np.ndarray:
    """Each candidate's owner id (train rows, then test rows); one id for a patient in both splits, and an image
    with no known owner its own."""
    from dpcore.data.groups import groups_of

    out = []
    for part, (images, meta) in enumerate(((splits.train, splits.train_metadata), (splits.test, splits.test_metadata))):
        group = groups_of(images, meta, dataset)
        for i in kept[part]:
            owner = group.ids[i] if group is not None else None
            out.append(owner if owner is not None else f"\tunknown:{part}:{i}")
    return np.array(out, dtype=object)


def _choose_owner_candidates(owners: np.ndarray, settings: AuditSettings, delta: float,
                             log: Callable[[str], None]) -> np.ndarray:
    """Rows of whole patients: all, or random patients up to `pool_size` images, at most 1/(2δ) patients."""
    unique = np.unique(owners.astype(str))
    cap = math.floor(1 / (2 * delta)) if delta > 0 else len(unique)
    rng = np.random.default_rng(settings.seed + 7919)
    chosen, rows_total = [], 0
    by_owner = {o: np.flatnonzero(owners.astype(str) == o) for o in unique}
    for o in rng.permutation(unique):
        if len(chosen) >= cap or (settings.pool_size and rows_total + len(by_owner[o]) > settings.pool_size):
            break
        chosen.append(o)
        rows_total += len(by_owner[o])
    if len(chosen) < len(unique):
        log(f"auditing {len(chosen)} of the {len(unique)} patients ({rows_total} images)")
    return np.sort(np.concatenate([by_owner[o] for o in chosen]))


def _choose_candidates(total: int, settings: AuditSettings, delta: float, log: Callable[[str], None]) -> np.ndarray:
    """Rows of the pool to audit: all, or a random subset of `pool_size`, and at most 1/(2δ) (the bound's limit)."""
    cap = math.floor(1 / (2 * delta)) if delta > 0 else total
    n = min(total, settings.pool_size or total, cap)
    if n < min(total, settings.pool_size or total):
        log(f"auditing {n} of the candidates: the one-run bound needs 2·m·δ ≤ 1 (δ={delta:g})")
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng(settings.seed + 7919)
    return np.sort(rng.choice(total, n, replace=False))


def _ledger_entry_id(ledger, run_id: str) -> str:
    """`audit-<run>-<unix time>`, with a suffix when a second audit of the run starts within the same second."""
    base = f"audit-{run_id}-{int(time.time())}"
    entry, k = base, 1
    while ledger.entry(entry) is not None:  # two audits of a run within a second
        k += 1
        entry = f"{base}-{k}"
    return entry


def record_audit_use(pool: _Pool, run_id: str, config: RunConfig, store: RunStore, n_models: int,
                     log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """Record the audit in the privacy ledger before anything is trained: a non-private use of exactly the
    candidate images, which voids their per-image ε. Returns the hold every fit counts on; a LedgerError
    (or an unreadable image) propagates, and then nothing is trained."""
    from dpcore.privacy.ledger import Ledger, LedgerError
    from dpcore.privacy.fingerprint import Identities

    ledger = Ledger()
    parts = [(pool.splits.train, pool.source_index[pool.is_train]),
             (pool.splits.test, pool.source_index[~pool.is_train])]
    log(f"privacy ledger {ledger.path}: identifying the {len(pool.y)} candidate images by content")
    found = [ledger.identify(images.subset(rows)) for images, rows in parts if len(rows)]
    ids = found[0] if len(found) == 1 else Identities(
        [s for f in found for s in f.sha256], np.concatenate([f.fp for f in found]), found[0].fp_version)
    entry = _ledger_entry_id(ledger, run_id)
    note = (f"{n_models} models (target + shadows) trained on these {len(pool.y)} candidate images for a "
            "membership audit; no guarantee covers the audit's statistics, so their per-image ε is void")
    try:
        hold = ledger.record_use(entry, kind="audit", train=ids, dataset=config.dataset, data_dir=config.data_dir,
                                 label=f"membership audit of run {run_id}", note=note, runs_dir=str(store.root))
    except LedgerError:
        raise
    except Exception as exc:  # sqlite, disk full, permissions: say what it means for the audit
        raise LedgerError(f"the privacy ledger {ledger.path} could not record this audit ({type(exc).__name__}: "
                          f"{exc}), so it trains nothing. Fix: free disk space or make the file writable (or point "
                          "DPCORE_LEDGER at a writable path)") from exc
    return hold, {"entry": entry, "path": str(ledger.path), "n_images": len(pool.y), "kind": "audit",
                  "non_private_use": True, "statement": LEDGER_STATEMENT}


def _recipe(fit_config: RunConfig, mechanism, proxy: dict[str, Any] | None, target: dict[str, Any]) -> dict[str, Any]:
    """What every audited model was trained with, as audit.json records it."""
    sigma, q, steps = mechanism
    return {
        "replayed_by": "dpcore.training.trainer.fit_arrays (the trainer's own loop)",
        "config": fit_config.to_dict(),
        "mechanism": {"noise_multiplier": sigma, "sample_rate": q, "steps": steps,
                      "clip_norm": fit_config.clip_norm if sigma is not None else None,
                      "epsilon": target.get("epsilon"), "delta": fit_config.delta if fit_config.private else None,
                      "batches": ("Poisson sampling at rate q (expected batch q·n of each model's n), noise σ·C"
                                  if sigma is not None else "shuffled logical batches of ⌊q·n⌋ of each model's n "
                                  "(the run's rate q) for T steps; the config's batch_size was planned for the "
                                  "run's n")},
        **{k: getattr(fit_config, k) for k in ("scope", "augmult", "augment", "ema_decay", "lr_schedule",
                                               "warmup_fraction", "weight_standardization", "optimizer", "lr")},
        "proxy": proxy,
    }


def audit_run(store: RunStore, run_id: str, settings: AuditSettings | None = None, *, scope: str | None = None,
              progress: Progress | None = None, cancel: threading.Event | None = None,
              log: Callable[[str], None] = lambda _: None, save: bool = True) -> dict[str, Any]:
    """Audit a finished run's mechanism (see the module docstring) and store the result as audit.json."""
    from dpcore.training.trainer import resolve_device

    settings = settings or AuditSettings()
    record = store.get_run(run_id)
    if record.status != "done":
        raise DPCoreError(f"run {run_id} is {record.status}; only finished runs can be audited")
    config = record.config
    card = store.card(run_id)
    scope = scope or config.scope
    if scope not in ("head", config.scope):
        raise DPCoreError(f"audit scope {scope!r}: use the run's own scope ({config.scope}) or 'head'")
    if settings.shadows < 2:
        raise DPCoreError("LiRA needs at least 2 shadow models (8 to 16 is usual)")
    mechanism = run_mechanism(config, card)
    t0 = time.time()
    device = resolve_device(settings.device)
    pool = _pool(store, config, scope, device, log)
    pool_total = len(pool.y)
    pool.take(_choose_candidates(pool_total, settings, config.delta, log) if pool.owners is None
              else _choose_owner_candidates(pool.owners, settings, config.delta, log))
    sigma, q, steps = mechanism
    what = (f"{len(pool.y)} candidates" if pool.owners is None else
            f"{len(np.unique(pool.owners.astype(str)))} candidate patients ({len(pool.y)} images, in or out together)")
    log(f"audit of {run_id}: {what}, target + {settings.shadows} shadows, scope {scope}, "
        + (f"σ={sigma:.4f}, q={q:.5f}, T={steps}" if sigma is not None else f"non-private, q={q:.5f}, T={steps}"))
    hold, ledger_info = record_audit_use(pool, run_id, config, store, settings.shadows + 1, log)
    result = audit_arrays(pool.x, pool.y, pool.make_model, pool.fit_config,
                          dataclasses.replace(settings, device=str(device)), spending=hold, mechanism=mechanism,
                          normalize=pool.normalize, physical_batch=pool.physical, head_only=scope == "head",
                          created_weights=pool.created_weights, progress=progress, cancel=cancel, owners=pool.owners)
    payload = {
        "audit_version": AUDIT_VERSION,
        "run_id": run_id,
        "what": "audit of this run's mechanism: a fresh target trained by the trainer's own loop with the run's "
                "config and (σ, q, T) on the candidates (train ∪ test) each included with probability 1/2, "
                "S shadows on random halves",
        "created_at": time.time(),
        "config": {**asdict(settings), "device": str(device), "scope": scope, "proxy": scope != config.scope,
                   "pool_size": len(pool.y), "pool_total": int(pool_total),
                   "pool_from_train": int(pool.is_train.sum()), "pool_from_test": int((~pool.is_train).sum())},
        "recipe": _recipe(pool.fit_config, mechanism, pool.proxy_changes, result["target"]),
        "claimed_epsilon": card.get("epsilon"),
        "audited_epsilon": result["target"].get("epsilon") if config.private else None,
        "delta": config.delta,
        "private": config.private,
        "ledger": ledger_info,
        "guarantee": "none: " + LEDGER_STATEMENT,
        "dataset": config.dataset, "backbone": config.backbone, "class_names": pool.splits.class_names,
        **result,
    }
    payload["timings"]["total_s"] = round(time.time() - t0, 3)
    payload["summary"] = summary(payload)
    if save:
        store.write_json(run_id, AUDIT_FILE, payload)
    return payload


def summary(audit: dict[str, Any]) -> dict[str, Any]:
    """The headline: the strongest attack by AUC (descriptive) and the valid joint 95 % ε lower bound."""
    attacks, bound = audit["attacks"], audit["bound"]
    best = max(attacks, key=lambda a: attacks[a]["auc"])
    audited = audit.get("audited_epsilon")
    return {"best_attack": best, "attack_auc": attacks[best]["auc"],
            "tpr_at_0.01_fpr": attacks[best]["tpr_at_0.01_fpr"],
            "epsilon_lb": bound["epsilon_lb"], "epsilon_lb_attack": bound["attack"],
            "epsilon_lb_guesses": [bound["k_plus"], bound["k_minus"]],
            "confidence": bound["confidence"], "beta": bound["beta"], "n_tests": bound["n_tests"],
            "correction": bound["correction"],
            "claimed_epsilon": audit.get("claimed_epsilon"), "audited_epsilon": audited,
            "consistent": audited is None or bound["epsilon_lb"] <= audited + 1e-9}


def read_audit(store: RunStore, run_id: str) -> dict[str, Any] | None:
    """The stored audit.json of a run (None if absent, unreadable or of the old, invalid format)."""
    path = store.run_dir(run_id) / AUDIT_FILE
    if not path.exists():
        return None
    try:
        audit = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return audit if audit.get("audit_version", 1) >= AUDIT_VERSION else None


def ordered_attacks(audit: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, metrics) of an audit's attacks in the order of ATTACKS (audit.json stores keys sorted)."""
    attacks = audit.get("attacks") or {}
    return [(n, attacks[n]) for n in ATTACKS if n in attacks] + [(n, a) for n, a in attacks.items() if n not in ATTACKS]


def format_table(audit: dict[str, Any]) -> str:
    """The attack table of an audit, as text (CLI)."""
    cfg, bound, s = audit["config"], audit["bound"], audit["summary"]
    claimed = audit.get("claimed_epsilon")
    lines = [f"== membership audit of run {audit['run_id']}'s mechanism ==",
             (f"candidates {audit['n_candidates']} {audit.get('candidate_unit', 'image')}s"
              + (f" ({audit['n_candidate_images']} images)" if audit.get("candidate_unit") == "patient" else "")
              + f" (each in the audit target with probability 1/2: "
              f"{audit['n_members']} were), {cfg['shadows']} shadows, scope {cfg['scope']}"
              f"{' (head-only proxy)' if cfg.get('proxy') else ''}, seed {cfg['seed']}, "
              f"{audit['timings']['total_s']:.1f} s"),
             "claimed ε: " + (f"{claimed:.4g} (δ={audit['delta']:g})" if claimed is not None
                              else "none (non-private)"),
             f"{'attack':<26} {'AUC':>6} {'TPR@1%':>8} {'TPR@0.1%':>9} {'ε ≥ (95% joint)':>16} {'(k₊, k₋)':>12}"]
    for name, a in ordered_attacks(audit):
        lines.append(f"{ATTACK_LABELS.get(name, name):<26} {a['auc']:>6.3f} {a['tpr_at_0.01_fpr']:>8.3f} "
                     f"{a['tpr_at_0.001_fpr']:>9.3f} {a['epsilon_lb']:>16.3f} "
                     f"{'(' + str(a['k_plus']) + ', ' + str(a['k_minus']) + ')':>12}")
    lines.append("AUC and TPR are descriptive statistics of these candidates, not bounds.")
    lines.append(f"ε lower bound: {bound['method']}, δ={bound['delta']:g}, {bound['confidence']:.0%} confidence "
                 f"jointly: {bound['correction']}.")
    if claimed is not None:
        verdict = "consistent with" if s["consistent"] else "VIOLATES"
        lines.append(f"empirical ε ≥ {s['epsilon_lb']:.3f} ({ATTACK_LABELS.get(s['epsilon_lb_attack'])}, "
                     f"k₊={s['epsilon_lb_guesses'][0]}, k₋={s['epsilon_lb_guesses'][1]}) {verdict} the claimed "
                     f"ε = {claimed:.4g}")
    else:
        lines.append(f"empirical ε ≥ {s['epsilon_lb']:.3f} (95 %): a non-private model claims nothing")
    lines.append("ledger: " + audit.get("ledger", {}).get("statement", LEDGER_STATEMENT))
    return "\n".join(lines)


# -- background runner for the app ---------------------------------------------------------------
def read_progress(store: RunStore, run_id: str) -> dict[str, Any] | None:
    """The audit in progress (or last ended) for a run; a 'running' one whose process died reads as failed."""
    path = store.run_dir(run_id) / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        prog = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if prog.get("status") == "running" and not alive(prog.get("pid")):
        prog = {**prog, "status": "failed", "error": "interrupted: the process running the audit stopped"}
    elif prog.get("status") == "running" and prog.get("pid") == os.getpid() and not _RUNNING.get(
            (str(store.root), run_id)):
        prog = {**prog, "status": "failed", "error": "interrupted: the audit thread is gone"}
    return prog


_RUNNING: dict[tuple[str, str], threading.Thread] = {}
_RUNNING_LOCK = threading.Lock()


def is_running(store: RunStore, run_id: str) -> bool:
    with _RUNNING_LOCK:
        t = _RUNNING.get((str(store.root), run_id))
        return t is not None and t.is_alive()


def start_audit(store: RunStore, run_id: str, settings: AuditSettings | None = None, *,
                scope: str | None = None) -> threading.Thread:
    """Run `audit_run` on a daemon thread; progress goes to <run dir>/audit_progress.json. One audit per run."""
    settings = settings or AuditSettings()
    key = (str(store.root), run_id)
    store.get_run(run_id)
    with _RUNNING_LOCK:
        current = _RUNNING.get(key)
        if current is not None and current.is_alive():
            raise DPCoreError(f"an audit of run {run_id} is already running")
        state = {"status": "running", "pid": os.getpid(), "run_id": run_id, "started_at": time.time(),
                 "done": 0, "total": settings.shadows + 1, "message": "preparing the candidates",
                 "settings": asdict(settings), "log": []}

        def write() -> None:
            state["updated_at"] = time.time()
            store.write_json(run_id, PROGRESS_FILE, state)

        def progress(done: int, total: int, message: str) -> None:
            elapsed = time.time() - state["started_at"]
            state.update(done=done, total=total, message=message,
                         eta=(elapsed / done * (total - done)) if done else None)
            write()

        def log(message: str) -> None:
            state["log"] = (state["log"] + [message])[-20:]
            write()

        def work() -> None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    audit = audit_run(store, run_id, settings, scope=scope, progress=progress, log=log)
                state.update(status="done", done=state["total"], message="finished",
                             summary=audit["summary"], finished_at=time.time())
            except BaseException as exc:  # noqa: BLE001 - recorded for the page; the thread ends
                state.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                             trace=traceback.format_exc(limit=6), finished_at=time.time())
            write()

        write()
        thread = threading.Thread(target=work, name=f"audit-{run_id}", daemon=True)
        _RUNNING[key] = thread
        thread.start()
    return thread
