"""Temperature scaling of a run's probabilities, fitted on held-out TEST images, never on training images.

DP-trained models are often miscalibrated (Bu et al. 2023, arXiv 2210.08248): their confidences do not match
how often they are right. One scalar T > 0 rescales the logits, softmax(z / T); it is fitted by minimising the
negative log-likelihood on a stratified half of the test split (the "fit half", chosen from the run's seed and
the test indices) and judged on the other half (the "evaluation half"), so no number is reported on the images
T was fitted on. The training data are untouched: the DP guarantee, q and ε are unchanged; T, like the test
metrics, is a statistic of test images, which the guarantee does not cover. Dividing logits by T > 0 keeps
their order, so the predicted class, accuracy and the confusion matrix do not change.

The stored probabilities suffice: log p equals the logits up to a per-row constant, which softmax ignores.
"""
from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from typing import Any

import numpy as np

from dpcore.errors import DPCoreError
from dpcore.store.card import PUBLIC_FACT  # listed on every card that has a temperature

T_MIN, T_MAX = 0.05, 20.0
N_BINS = 15
MIN_PER_HALF = 20  # fewer test images per half: T and the ECE would be noise
CALIBRATION_FILE = "calibration.json"
# probabilities that underflowed to 0 in float32 are read as this (log ≈ −87): the closest logit gap we can know
_TINY = float(np.finfo(np.float32).tiny)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _TINY, None))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities the model gives with its logits divided by T."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise DPCoreError(f"a temperature must be a positive number, got {temperature!r}. Fix: fit it with "
                          "fit_temperature")
    z = _log_probs(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(-_log_probs(probs)[np.arange(len(labels)), labels].mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of Σ_k (p_k − [k = y])²."""
    labels = np.asarray(labels, dtype=np.int64)
    onehot = np.zeros_like(probs, dtype=np.float64)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((np.asarray(probs, dtype=np.float64) - onehot) ** 2).sum(axis=1).mean())


def _nll_at(logp: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logp / temperature
    m = z.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    return float((lse - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """The T in [t_min, t_max] minimising the NLL of softmax(log p / T): golden-section search over log T (the NLL
    is convex in 1/T, hence unimodal in log T). A bound is returned when the optimum lies past it."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise DPCoreError("no images to fit a temperature on. Fix: use a run with a larger test split")
    logp = _log_probs(probs)
    f = lambda u: _nll_at(logp, labels, math.exp(u))  # noqa: E731
    a, b = math.log(t_min), math.log(t_max)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-7:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    u = (a + b) / 2
    best = min((f(u), u), (f(math.log(t_min)), math.log(t_min)), (f(math.log(t_max)), math.log(t_max)))
    return float(math.exp(best[1]))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, Any]]:
    """Equal-width bins of top-class confidence over [0, 1]: per bin its edges, the images in it, their mean
    confidence and the fraction of them predicted right (None for an empty bin)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == labels
    which = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)  # confidence 1.0 goes in the last bin
    out = []
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n,
                    "confidence": float(conf[sel].mean()) if n else None,
                    "accuracy": float(right[sel].mean()) if n else None})
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE: Σ over bins of (images in bin / N) · |accuracy − mean confidence| (equal-width, top-class)."""
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        raise DPCoreError("no images to measure calibration on. Fix: use a run with a larger test split")
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / total)


def _key(seed: int, index: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8, person=b"dpcore-calib").digest()


def split_halves(labels: np.ndarray, test_index: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, evaluation rows), disjoint, stratified by class: within each class the rows are ordered by a
    keyed hash of (seed, test index) and the first ⌈n/2⌉ go to the fit half. Fixed by the run's user seed and the
    test indices (not by the row order, and not by any noise randomness)."""
    labels = np.asarray(labels, dtype=np.int64)
    test_index = np.asarray(test_index, dtype=np.int64)
    fit, ev = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = sorted(rows, key=lambda r: _key(seed, int(test_index[r])))
        k = (len(rows) + 1) // 2
        fit += rows[:k]
        ev += rows[k:]
    return np.sort(np.asarray(fit, dtype=np.int64)), np.sort(np.asarray(ev, dtype=np.int64))


def _refusal(probs: np.ndarray, labels: np.ndarray, fit: np.ndarray, ev: np.ndarray,
             class_names: list[str] | None) -> str | None:
    if len(fit) < MIN_PER_HALF or len(ev) < MIN_PER_HALF:
        return (f"the test split has {len(labels)} images: halves of {len(fit)} and {len(ev)}, fewer than the "
                f"{MIN_PER_HALF} per half a temperature and its check need. Fix: use a larger test split "
                "(--test-fraction) if you want calibrated probabilities")
    missing = sorted(set(range(probs.shape[1])) - set(np.asarray(labels)[fit].tolist()))
    if missing:
        names = [class_names[i] if class_names else str(i) for i in missing]
        return (f"class(es) {', '.join(names)} have no image in the fit half (none in the test split). Fix: use a "
                "test split that holds every class")
    return None


def calibrate(probs: np.ndarray, labels: np.ndarray, test_index: np.ndarray, seed: int,
              class_names: list[str] | None = None) -> dict[str, Any]:
    """The full calibration record (as stored in calibration.json); `method` is "none" with a `reason` when the
    test split cannot support it."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) != len(test_index):
        raise DPCoreError(f"inconsistent test predictions: probs {probs.shape}, {len(labels)} labels, "
                          f"{len(test_index)} indices. Fix: train the run again")
    fit, ev = split_halves(labels, test_index, seed)
    base = {"seed": int(seed), "n_fit": int(len(fit)), "n_eval": int(len(ev)), "n_bins": N_BINS,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    reason = _refusal(probs, labels, fit, ev, class_names)
    if reason:
        return {"method": "none", "reason": reason, **base}
    t = fit_temperature(probs[fit], labels[fit])
    before, after = probs[ev], apply_temperature(probs[ev], t)
    y = labels[ev]
    return {
        "method": "temperature", "temperature": t,
        "fit_on": f"half of the held-out test split ({len(fit)} images), never training images",
        "evaluated_on": f"the other half of the held-out test split ({len(ev)} images)",
        **base,
        "ece_before": expected_calibration_error(before, y), "ece_after": expected_calibration_error(after, y),
        "nll_before": nll(before, y), "nll_after": nll(after, y),
        "brier_before": brier(before, y), "brier_after": brier(after, y),
        "bins_before": reliability_bins(before, y), "bins_after": reliability_bins(after, y),
        "at_bound": t <= T_MIN * 1.0001 or t >= T_MAX * 0.9999,
        "unchanged": "the predicted class of every image, hence accuracy and the confusion matrix",
        "fit_test_index": [int(i) for i in np.asarray(test_index)[fit]],
    }


def card_section(record: dict[str, Any]) -> dict[str, Any]:
    """What the model card carries (calibration.json keeps the rest: the fit half's test indices)."""
    return {k: v for k, v in record.items() if k != "fit_test_index"}


def attach(card: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Put the calibration into a card (in place) and list the temperature among the facts treated as public."""
    card["calibration"] = card_section(record)
    facts = card.setdefault("privacy_facts", {}).setdefault("treated_as_public", [])
    if PUBLIC_FACT not in facts:  # cards made before calibration existed
        facts.append(PUBLIC_FACT)
    return card


def for_finished_run(store, run_id: str, card: dict[str, Any], probs: np.ndarray, labels: np.ndarray,
                     test_index: np.ndarray, seed: int) -> dict[str, Any]:
    """The trainer's hook (before card.json, the last artefact, is written): calibrate, store calibration.json,
    attach to the card. Never raises: a failure is recorded on the card as the reason there is no calibration."""
    try:
        record = calibrate(probs, labels, test_index, seed, card.get("dataset", {}).get("class_names"))
        store.write_json(run_id, CALIBRATION_FILE, record)
    except Exception as exc:  # calibration is an extra: it must never fail a finished training
        record = {"method": "none", "reason": f"calibration failed: {type(exc).__name__}: {exc}"}
    attach(card, record)
    return record


def calibrate_run(store, run_id: str) -> dict[str, Any]:
    """Calibrate a stored run from its test_predictions.npz: writes calibration.json and the card's
    `calibration` field (for runs stored before calibration existed, or again). Reads test predictions only."""
    from dpcore.store.predictions import load_test_predictions

    card = store.card(run_id)
    preds = load_test_predictions(store, run_id)
    seed = int((card.get("config") or {}).get("seed", store.get_run(run_id).config.seed))
    record = calibrate(preds.probs, preds.labels, preds.test_index, seed, preds.class_names)
    store.write_json(run_id, CALIBRATION_FILE, record)
    store.write_json(run_id, "card.json", attach(card, record))
    return record


def temperature_of(card: dict[str, Any] | None) -> float:
    """The run's fitted temperature; 1.0 (the model's own probabilities) when it has none."""
    cal = (card or {}).get("calibration") or {}
    t = cal.get("temperature") if cal.get("method") == "temperature" else None
    return float(t) if isinstance(t, (int, float)) and t > 0 and math.isfinite(t) else 1.0
