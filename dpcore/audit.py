"""Membership-inference audit of a run's training recipe: loss threshold (Yeom et al. 2018) and LiRA
(Carlini et al. 2022, "Membership Inference Attacks From First Principles").

What is audited, and why
------------------------
A stored run was trained on its whole train split, so its own model gives an attacker members (the
train split) and non-members (the test split) of very different sizes and, for the LiRA shadows, a
training-set size the shadows cannot match without overlapping. The clean, standard audit is of the
*recipe*: the candidate pool is the run's train ∪ test split; a fresh **target** model is trained with
the run's recipe on a random half of the pool (so membership is known and balanced), and **S shadow
models** are trained with the same recipe on random halves chosen so that every candidate is IN for
exactly half of the shadows. The report is "audit of this run's training recipe".

Same recipe means: the run's backbone, scope, initial weights, optimizer and learning rate, and its
privacy parameters (σ, q, T, C) exactly as its card records them, so each audited model carries the
run's claimed ε (the accountant depends on σ, q, T and δ only). With half the data the expected batch
q·n is half as large; the number of steps, epochs and the guarantee are unchanged. A non-private run is
replayed with the same q (batch ≈ q·n, shuffled) and T. For a head-only run (`scope="head"`) every model
trains the head on the cached frozen-backbone features (`dpcore.features`), so an audit takes seconds to
minutes on a CPU; full fine-tuning is replayed on images (fine for `tiny_cnn`; slow for large backbones
without a GPU — `scope="head"` audits the head-only proxy of the same privacy parameters instead).

Attacks (higher score = "member"):
* loss: score = −loss of the target on the candidate's true label (Yeom et al.);
* LiRA online: per-candidate Gaussians of φ = log(p/(1−p)) of the true class over the shadows where
  it was IN and where it was OUT (a variance shared by all candidates, as Carlini et al. advise for few
  shadows); score = log N(φ_target; IN) − log N(φ_target; OUT);
* LiRA offline: only the OUT Gaussian; score = (φ_target − μ_out)/σ_out.

The empirical ε lower bound: an (ε, δ)-DP training algorithm makes every membership test obey
TPR ≤ e^ε·FPR + δ and 1−FPR ≤ e^ε·(1−TPR) + δ. The rates are estimated from finitely many candidates,
so the bound uses Clopper-Pearson limits (a lower limit of TPR and an upper limit of FPR, each at
1−α/2, jointly 1−α = 95 %). Picking the best threshold on the same candidates would bias it upwards,
so the threshold is chosen on one random half of the candidates and the bound is evaluated on the
other: ``epsilon_lb`` is then a valid 95 % lower bound. The un-split maximum over all thresholds is
reported too (``epsilon_lb_all_thresholds``, optimistic) with the point estimate (not a bound).

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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from . import accounting
from .config import RunConfig
from .errors import DPCoreError
from .store import RunStore

AUDIT_FILE = "audit.json"
PROGRESS_FILE = "audit_progress.json"
AUDIT_VERSION = 1
ATTACKS = ("loss", "lira_online", "lira_offline")
ATTACK_LABELS = {"loss": "Loss threshold (Yeom)", "lira_online": "LiRA online (IN+OUT)",
                 "lira_offline": "LiRA offline (OUT only)"}
FPR_POINTS = (0.01, 0.001)
MAX_CURVE_POINTS = 400

Progress = Callable[[int, int, str], None]


class AuditCancelled(DPCoreError):
    pass


# -- the recipe ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How each audited model trains: DP-SGD (σ, q, T, C) or the non-private loop (q, T), and the optimizer."""

    private: bool
    sample_rate: float
    steps: int
    noise_multiplier: float | None = None
    clip_norm: float = 1.0
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"
    physical_batch: int = 128
    grad_sample_mode: str = "hooks"

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(1 / self.sample_rate))

    def epsilon(self) -> float | None:
        if not self.private:
            return None
        return accounting.epsilon(self.noise_multiplier, self.sample_rate, self.steps, self.delta, self.accountant)

    @classmethod
    def from_run(cls, config: RunConfig, card: dict[str, Any], physical_batch: int | None = None,
                 grad_sample_mode: str = "hooks") -> Recipe:
        p = card.get("privacy") or {}
        common = dict(optimizer=config.optimizer, lr=config.lr, momentum=config.momentum,
                      weight_decay=config.weight_decay, delta=config.delta, accountant=config.accountant,
                      physical_batch=physical_batch or config.max_physical_batch_size,
                      grad_sample_mode=grad_sample_mode)
        if config.private:
            if p.get("noise_multiplier") is None:
                raise DPCoreError("the run's card has no noise multiplier; only finished runs can be audited")
            return cls(private=True, sample_rate=float(p["sample_rate"]), steps=int(p["steps"]),
                       noise_multiplier=float(p["noise_multiplier"]), clip_norm=float(p.get("clip_norm") or 1.0),
                       **common)
        plan = accounting.sampling_plan(int(card["dataset"]["n_train"]), config.batch_size, config.epochs)
        return cls(private=False, sample_rate=plan.sample_rate, steps=int(p.get("steps") or plan.steps), **common)


def _make_optimizer(r: Recipe, params) -> torch.optim.Optimizer:
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay)
    return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, *, seed: int,
        normalize: torch.nn.Module | None = None, device: torch.device | str = "cpu",
        cancel: threading.Event | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `model` on (x, y) with the recipe: the trainer's DP-SGD pieces (`trainer.privatize`: Opacus,
    Poisson sampling, clipping to C, noise σ·C) for T real steps, or shuffled batches for T steps.

    Returns the trained plain module and what was actually run (q, steps, expected batch).
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    from .trainer import BatchedTensorDataset, privatize

    device = torch.device(device)
    normalize = (normalize or torch.nn.Identity()).to(device)
    torch.manual_seed(seed)
    n = len(y)
    k = recipe.steps_per_epoch
    batch = max(1, math.ceil(n / k))  # expected batch q·n with q = 1/k, as in the run
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(recipe, params)
    criterion = torch.nn.CrossEntropyLoss()
    taken = 0
    if recipe.private:
        data = BatchedTensorDataset(x, y)
        engine, pmodel, optimizer, loader, criterion = privatize(
            model, optimizer, data, batch_size=batch, noise_multiplier=recipe.noise_multiplier,
            clip_norm=recipe.clip_norm, grad_sample_mode=recipe.grad_sample_mode)
        q = float(loader.sample_rate)
        stepped: list[bool] = []
        previous = optimizer.step_hook

        def on_step(opt) -> None:
            if previous is not None:
                previous(opt)
            stepped.append(True)

        optimizer.attach_step_hook(on_step)
        while taken < recipe.steps:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=recipe.physical_batch,
                                    optimizer=optimizer) as physical:
                for xb, yb in physical:
                    if cancel is not None and cancel.is_set():
                        raise AuditCancelled("audit cancelled")
                    pmodel.train()
                    optimizer.zero_grad(set_to_none=True)
                    loss = criterion(pmodel(normalize(xb.to(device))), yb.to(device))
                    loss.backward()
                    optimizer.step()
                    if stepped:
                        stepped.clear()
                        taken += 1
                        if taken >= recipe.steps:
                            break
        recorded = sum(s for _, _, s in engine.accountant.history)
        if recorded != taken:
            raise RuntimeError(f"Opacus counted {recorded} noisy steps, the audit loop {taken}")
        trained = pmodel._module if hasattr(pmodel, "_module") else pmodel
        trained.zero_grad(set_to_none=True)
        info = {"sample_rate": q, "steps": taken, "expected_batch_size": n * q}
    else:
        while taken < recipe.steps:
            order = torch.randperm(n)
            for start in range(0, n, batch):
                if taken >= recipe.steps:
                    break
                if cancel is not None and cancel.is_set():
                    raise AuditCancelled("audit cancelled")
                idx = order[start:start + batch]
                model.train()
                optimizer.zero_grad(set_to_none=True)
                for chunk in idx.split(recipe.physical_batch):
                    loss = criterion(model(normalize(x[chunk].to(device))), y[chunk].to(device))
                    (loss * (len(chunk) / len(idx))).backward()
                optimizer.step()
                taken += 1
        trained = model
        info = {"sample_rate": 1 / math.ceil(n / batch), "steps": taken, "batch_size": batch}
    trained.eval()
    return trained, info


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


# -- attacks -------------------------------------------------------------------------------------
def membership_matrix(n: int, shadows: int, rng: np.random.Generator) -> np.ndarray:
    """(S, n) bool: each candidate is IN for exactly ⌊S/2⌋ or ⌈S/2⌉ shadows, at random (Carlini et al.'s scheme)."""
    order = rng.random((shadows, n)).argsort(axis=0)
    keep = order < shadows / 2
    return keep


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


# -- what the rates imply: ε lower bounds ------------------------------------------------------
def epsilon_from_rates(tpr, fpr, delta: float = 0.0) -> np.ndarray:
    """The ε that (TPR, FPR) of one test force on any (ε, δ)-DP mechanism (a point estimate, no sampling error):
    max(log((TPR − δ)/FPR), log((1 − FPR − δ)/(1 − TPR)), 0)."""
    tpr, fpr = np.asarray(tpr, dtype=float), np.asarray(fpr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where((tpr - delta > 0) & (fpr > 0), np.log(np.clip(tpr - delta, 1e-300, None) / fpr),
                     np.where(tpr - delta > 0, np.inf, 0.0))
        b = np.where((1 - fpr - delta > 0) & (1 - tpr > 0),
                     np.log(np.clip(1 - fpr - delta, 1e-300, None) / np.clip(1 - tpr, 1e-300, None)),
                     np.where(1 - fpr - delta > 0, np.inf, 0.0))
    return np.maximum(np.maximum(a, b), 0.0)


def clopper_pearson(k, n, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided (1 − alpha) Clopper-Pearson interval of a binomial rate k/n (each side at alpha/2)."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    lo = np.where(k > 0, stats.beta.ppf(alpha / 2, np.maximum(k, 1e-12), n - k + 1), 0.0)
    hi = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, np.maximum(n - k, 1e-12)), 1.0)
    return lo, hi


def epsilon_lower_bound(tp, fp, n_pos: int, n_neg: int, delta: float = 0.0, confidence: float = 0.95) -> np.ndarray:
    """A `confidence`-level lower bound on ε from counts (tp of n_pos members flagged, fp of n_neg non-members):
    the DP inequalities at TPR's lower and FPR's upper Clopper-Pearson limits (each at 1 − α/2; jointly 1 − α)."""
    alpha = 1 - confidence
    tpr_lo, _ = clopper_pearson(tp, n_pos, alpha)
    _, fpr_hi = clopper_pearson(fp, n_neg, alpha)
    return epsilon_from_rates(tpr_lo, fpr_hi, delta)


def _counts(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tp, fp of the tests 'score ≥ t' for each threshold t."""
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    return tp, fp


def empirical_epsilon(scores: np.ndarray, labels: np.ndarray, delta: float, *, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, Any]:
    """ε lower bounds from one attack's scores: the valid one (threshold chosen on a random half, bound on
    the other half), the optimistic maximum over all thresholds, and the point estimate."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    thr = np.unique(scores)
    tp, fp = _counts(scores, labels, thr)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    all_lb = epsilon_lower_bound(tp, fp, n_pos, n_neg, delta, confidence)
    point = epsilon_from_rates(tp / max(n_pos, 1), fp / max(n_neg, 1), delta)
    finite_point = point[np.isfinite(point)]
    # Selection / evaluation split, stratified by membership.
    rng = np.random.default_rng(seed)
    sel = np.zeros(len(scores), dtype=bool)
    for cls in (True, False):
        idx = np.flatnonzero(labels == cls)
        sel[rng.permutation(idx)[: len(idx) // 2]] = True
    ev = ~sel
    s_tp, s_fp = _counts(scores[sel], labels[sel], thr)
    s_lb = epsilon_lower_bound(s_tp, s_fp, int(labels[sel].sum()), int((~labels[sel]).sum()), delta, confidence)
    best = int(np.argmax(s_lb))
    e_tp, e_fp = _counts(scores[ev], labels[ev], thr[best:best + 1])
    e_pos, e_neg = int(labels[ev].sum()), int((~labels[ev]).sum())
    valid = float(epsilon_lower_bound(e_tp, e_fp, e_pos, e_neg, delta, confidence)[0]) if s_lb[best] > 0 else 0.0
    return {"epsilon_lb": valid, "confidence": confidence,
            "threshold": float(thr[best]), "eval_tpr": float(e_tp[0] / max(e_pos, 1)),
            "eval_fpr": float(e_fp[0] / max(e_neg, 1)),
            "epsilon_lb_all_thresholds": float(all_lb.max()) if len(all_lb) else 0.0,
            "epsilon_point": float(finite_point.max()) if len(finite_point) else None}


def attack_metrics(scores: np.ndarray, labels: np.ndarray, delta: float, seed: int = 0) -> dict[str, Any]:
    """ROC-AUC, TPR at 1 % and 0.1 % FPR, the ROC curve (thinned) and the ε bounds of one attack."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    fpr, tpr, _ = roc_curve(labels, scores)
    out: dict[str, Any] = {"auc": float(roc_auc_score(labels, scores))}
    for target in FPR_POINTS:
        ok = fpr <= target
        out[f"tpr_at_{target:g}_fpr"] = float(tpr[ok].max()) if ok.any() else 0.0
    out["curve"] = _thin_curve(fpr, tpr)
    out.update(empirical_epsilon(scores, labels, delta, seed=seed))
    return out


def _thin_curve(fpr: np.ndarray, tpr: np.ndarray, points: int = MAX_CURVE_POINTS) -> dict[str, list[float]]:
    """At most `points` ROC points, spread evenly in log(FPR) so the low-FPR end (what matters) stays."""
    if len(fpr) > points:
        grid = np.unique(np.concatenate([[0, len(fpr) - 1], np.searchsorted(
            fpr, np.geomspace(max(fpr[fpr > 0].min(), 1e-6), 1, points - 2))]).clip(0, len(fpr) - 1))
        fpr, tpr = fpr[grid], tpr[grid]
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}


# -- the audit on arrays -------------------------------------------------------------------------
@dataclass
class AuditSettings:
    shadows: int = 8
    seed: int = 0
    pool_size: int | None = None  # at most this many candidates (a random subset of train ∪ test); None: all
    fixed_variance: bool = True
    device: str = "cpu"


def audit_arrays(x: torch.Tensor, y: torch.Tensor, make_model: Callable[[int], torch.nn.Module], recipe: Recipe,
                 settings: AuditSettings, *, normalize: torch.nn.Module | None = None,
                 progress: Progress | None = None, cancel: threading.Event | None = None) -> dict[str, Any]:
    """Train the target (random half, known membership) and S shadows (each candidate IN for half of them)
    with `recipe` on the candidates (x, y); score every candidate with each attack. `make_model(seed)`
    returns a fresh model to train."""
    if settings.shadows < 2:
        raise DPCoreError("LiRA needs at least 2 shadow models (8 to 16 is usual)")
    n = len(y)
    if n < 20:
        raise DPCoreError(f"{n} candidates are too few for a membership audit")
    rng = np.random.default_rng(settings.seed)
    target_in = np.zeros(n, dtype=bool)
    target_in[rng.permutation(n)[: n // 2]] = True
    keep = membership_matrix(n, settings.shadows, rng)
    total = settings.shadows + 1
    report = progress or (lambda done, tot, msg: None)
    timings: list[float] = []
    threads = torch.get_num_threads()
    small = torch.device(settings.device).type == "cpu" and x.ndim == 2  # a head on features: 1 thread is fastest
    if small:
        torch.set_num_threads(1)
    try:
        phis, losses, infos = [], [], []
        for m in range(total):
            member = target_in if m == 0 else keep[m - 1]
            report(m, total, "training the target model" if m == 0 else f"training shadow {m} of {settings.shadows}")
            t = time.time()
            idx = torch.as_tensor(np.flatnonzero(member))
            model, info = fit(make_model(settings.seed * 1000 + m), x[idx], y[idx], recipe,
                              seed=settings.seed * 1000 + m, normalize=normalize, device=settings.device,
                              cancel=cancel)
            phi, loss = confidences(model, x, y, normalize=normalize, device=settings.device)
            phis.append(phi)
            losses.append(loss)
            infos.append(info)
            timings.append(time.time() - t)
    finally:
        if small:
            torch.set_num_threads(threads)
    report(total, total, "scoring")
    phi_t, loss_t = phis[0], losses[0]
    scores = {"loss": -loss_t, **lira_scores(phi_t, np.stack(phis[1:]), keep, settings.fixed_variance)}
    attacks = {name: attack_metrics(scores[name], target_in, recipe.delta, seed=settings.seed) for name in ATTACKS}
    train_acc = float(np.mean(phi_t[target_in] > 0)) if n else None
    return {
        "attacks": attacks,
        "n_candidates": n, "n_members": int(target_in.sum()), "n_nonmembers": int((~target_in).sum()),
        "target": {"train_accuracy_proxy": train_acc, "mean_loss_members": float(loss_t[target_in].mean()),
                   "mean_loss_nonmembers": float(loss_t[~target_in].mean()), **infos[0]},
        "timings": {"per_model_s": [round(t, 3) for t in timings], "train_s": round(sum(timings), 3)},
    }


# -- the audit of a stored run -------------------------------------------------------------------
def _pool(store: RunStore, config: RunConfig, scope: str, device: torch.device, log: Callable[[str], None]):
    """Candidates (train ∪ test of the run's data set), the model factory and the input normalisation."""
    import models

    from . import features
    from .data import load_dataset, materialize
    from .preprocess import Normalizer, make_to_uint8

    torch.manual_seed(config.seed)  # the same random backbone as the run's (it seeds before building)
    np.random.seed(config.seed)
    splits = load_dataset(config.dataset, config.data_dir, seed=config.seed, test_fraction=config.test_fraction,
                          cache_dir=config.cache_dir, medmnist_size=config.medmnist_size)
    created = models.create_model(config.backbone, len(splits.class_names), pretrained=config.pretrained,
                                  image_size=config.image_size)
    models.set_trainable(created.model, scope)
    if scope == "head":
        key = features.feature_key(
            dataset=config.dataset, data_dir=config.data_dir, seed=config.seed, test_fraction=config.test_fraction,
            medmnist_size=config.medmnist_size, skip_unreadable=config.skip_unreadable, splits=splits,
            backbone=config.backbone, weights=created.weights, backbone_hash=features.backbone_digest(created.model),
            data_config=created.data_config)
        feats = features.load_or_extract(
            key=key, cache_dir=features.default_cache_dir(store.root), splits=splits, model=created.model,
            data_config=created.data_config, device=device, skip_unreadable=config.skip_unreadable,
            batch_size=max(config.max_physical_batch_size, 64), log=log)
        x = torch.cat([feats.train_x, feats.test_x])
        y = torch.cat([feats.train_y, feats.test_y])
        is_train = np.r_[np.ones(len(feats.train_y), bool), np.zeros(len(feats.test_y), bool)]
        head = created.model.get_classifier()
        init = copy.deepcopy(head).cpu()
        normalize = torch.nn.Identity()
        n_out = sum(p.numel() for p in head.parameters())
        physical = max(config.max_physical_batch_size, min(8192, int(32e6 // max(n_out, 1))))

        def make_model(seed: int) -> torch.nn.Module:
            torch.manual_seed(seed)
            m = copy.deepcopy(init)
            for layer in m.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            return m
    else:
        to_uint8 = make_to_uint8(created.data_config)
        log(f"decoding {len(splits.train)} train + {len(splits.test)} test images")
        tr = materialize(splits.train, to_uint8, skip_unreadable=config.skip_unreadable)
        te = materialize(splits.test, to_uint8, skip_unreadable=config.skip_unreadable)
        x, y = torch.cat([tr.images, te.images]), torch.cat([tr.labels, te.labels])
        is_train = np.r_[np.ones(len(tr.labels), bool), np.zeros(len(te.labels), bool)]
        init_state = copy.deepcopy(created.model.state_dict())
        template = created.model
        normalize = Normalizer.from_config(created.data_config)
        physical = config.max_physical_batch_size

        def make_model(seed: int) -> torch.nn.Module:
            # Every model starts from the run's initial weights (pretrained, or its seeded random init);
            # the classifier head is re-drawn per model.
            m = copy.deepcopy(template)
            m.load_state_dict(init_state)
            torch.manual_seed(seed)
            for layer in m.get_classifier().modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            models.set_trainable(m, scope)
            return m
    return x, y, is_train, make_model, normalize, physical, splits.class_names


def audit_run(store: RunStore, run_id: str, settings: AuditSettings | None = None, *, scope: str | None = None,
              progress: Progress | None = None, cancel: threading.Event | None = None,
              log: Callable[[str], None] = lambda _: None, save: bool = True) -> dict[str, Any]:
    """Audit a finished run's recipe (see the module docstring) and store the result as audit.json."""
    settings = settings or AuditSettings()
    record = store.get_run(run_id)
    if record.status != "done":
        raise DPCoreError(f"run {run_id} is {record.status}; only finished runs can be audited")
    config = record.config
    card = store.card(run_id)
    scope = scope or config.scope
    if scope not in ("head", config.scope):
        raise DPCoreError(f"audit scope {scope!r}: use the run's own scope ({config.scope}) or 'head'")
    t0 = time.time()
    from .trainer import resolve_device

    device = resolve_device(settings.device)
    x, y, is_train, make_model, normalize, physical, class_names = _pool(store, config, scope, device, log)
    grad_mode = "hooks"
    if config.private and scope != "head":
        from . import grad_modes
        from .trainer import TRAINER_MODES
        grad_mode = grad_modes.choose_grad_sample_mode(config.backbone, device, allowed=TRAINER_MODES)
        if grad_mode == "bk":
            from .bookkeeping import UnsupportedModel, check_supported
            try:
                check_supported(make_model(0))
            except UnsupportedModel:
                grad_mode = "hooks"
    recipe = Recipe.from_run(config, card, physical_batch=physical, grad_sample_mode=grad_mode)
    pool_total = len(y)
    rng = np.random.default_rng(settings.seed + 7919)
    if settings.pool_size and settings.pool_size < pool_total:
        chosen = np.sort(rng.choice(pool_total, settings.pool_size, replace=False))
        x, y, is_train = x[torch.as_tensor(chosen)], y[torch.as_tensor(chosen)], is_train[chosen]
    log(f"audit of {run_id}: {len(y)} candidates, target + {settings.shadows} shadows, scope {scope}, "
        + (f"σ={recipe.noise_multiplier:.4f}, q={recipe.sample_rate:.5f}, T={recipe.steps}" if recipe.private
           else f"non-private, q={recipe.sample_rate:.5f}, T={recipe.steps}"))
    result = audit_arrays(x, y, make_model, recipe, dataclasses.replace(settings, device=str(device)),
                          normalize=normalize, progress=progress, cancel=cancel)
    claimed = card.get("epsilon")
    audited_eps = recipe.epsilon()
    q_run = result["target"]["sample_rate"]
    if recipe.private and abs(q_run - recipe.sample_rate) > 1e-12:  # the half-size loader rounded q
        audited_eps = accounting.epsilon(recipe.noise_multiplier, q_run, recipe.steps, recipe.delta,
                                         recipe.accountant)
    payload = {
        "audit_version": AUDIT_VERSION,
        "run_id": run_id,
        "what": "audit of this run's training recipe: a fresh target trained with the run's recipe on a random "
                "half of train ∪ test (known membership), S shadows on random halves",
        "created_at": time.time(),
        "config": {**asdict(settings), "device": str(device), "scope": scope, "proxy": scope != config.scope,
                   "pool_size": len(y), "pool_total": int(pool_total),
                   "pool_from_train": int(is_train.sum()), "pool_from_test": int((~is_train).sum())},
        "recipe": asdict(recipe),
        "claimed_epsilon": claimed,
        "audited_epsilon": audited_eps,
        "delta": config.delta if config.private else None,
        "private": config.private,
        "dataset": config.dataset, "backbone": config.backbone, "class_names": class_names,
        **result,
    }
    payload["timings"]["total_s"] = round(time.time() - t0, 3)
    payload["summary"] = summary(payload)
    if save:
        store.write_json(run_id, AUDIT_FILE, payload)
    return payload


def summary(audit: dict[str, Any]) -> dict[str, Any]:
    """The headline: the strongest attack by AUC, and the largest valid ε lower bound of any attack."""
    attacks = audit["attacks"]
    best = max(attacks, key=lambda a: attacks[a]["auc"])
    lb = max(attacks, key=lambda a: attacks[a]["epsilon_lb"])
    return {"best_attack": best, "attack_auc": attacks[best]["auc"],
            "tpr_at_0.01_fpr": attacks[best]["tpr_at_0.01_fpr"],
            "epsilon_lb": attacks[lb]["epsilon_lb"], "epsilon_lb_attack": lb,
            "claimed_epsilon": audit.get("claimed_epsilon"),
            "consistent": (audit.get("claimed_epsilon") is None
                           or attacks[lb]["epsilon_lb"] <= (audit.get("audited_epsilon") or math.inf) + 1e-9)}


def read_audit(store: RunStore, run_id: str) -> dict[str, Any] | None:
    path = store.run_dir(run_id) / AUDIT_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ordered_attacks(audit: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, metrics) of an audit's attacks in the order of ATTACKS (audit.json stores keys sorted)."""
    attacks = audit.get("attacks") or {}
    return [(n, attacks[n]) for n in ATTACKS if n in attacks] + [(n, a) for n, a in attacks.items() if n not in ATTACKS]


def format_table(audit: dict[str, Any]) -> str:
    """The attack table of an audit, as text (CLI)."""
    cfg = audit["config"]
    claimed = audit.get("claimed_epsilon")
    lines = [f"== membership audit of run {audit['run_id']}'s training recipe ==",
             (f"candidates {audit['n_candidates']} ({audit['n_members']} members of the audit target), "
              f"{cfg['shadows']} shadows, scope {cfg['scope']}{' (head-only proxy)' if cfg.get('proxy') else ''}, "
              f"seed {cfg['seed']}, {audit['timings']['total_s']:.1f} s"),
             "claimed ε: " + (f"{claimed:.4g} (δ={audit['delta']:g})" if claimed is not None else "none (non-private)"),
             f"{'attack':<26} {'AUC':>6} {'TPR@1%':>8} {'TPR@0.1%':>9} {'ε_lb(95%)':>10} {'ε_lb all-thr':>12}"]
    for name, a in ordered_attacks(audit):
        lines.append(f"{ATTACK_LABELS.get(name, name):<26} {a['auc']:>6.3f} {a['tpr_at_0.01_fpr']:>8.3f} "
                     f"{a['tpr_at_0.001_fpr']:>9.3f} {a['epsilon_lb']:>10.3f} {a['epsilon_lb_all_thresholds']:>12.3f}")
    s = audit["summary"]
    if claimed is not None:
        verdict = "consistent with" if s["consistent"] else "VIOLATES"
        lines.append(f"empirical ε lower bound {s['epsilon_lb']:.3f} ({ATTACK_LABELS.get(s['epsilon_lb_attack'])}) "
                     f"{verdict} the claimed ε = {claimed:.4g}")
    else:
        lines.append(f"empirical ε lower bound {s['epsilon_lb']:.3f}: a non-private model claims nothing")
    return "\n".join(lines)


# -- background runner for the app ---------------------------------------------------------------
def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_progress(store: RunStore, run_id: str) -> dict[str, Any] | None:
    """The audit in progress (or last ended) for a run; a 'running' one whose process died reads as failed."""
    path = store.run_dir(run_id) / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        prog = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if prog.get("status") == "running" and not _alive(prog.get("pid")):
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
