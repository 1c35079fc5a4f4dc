"""Subgroup metrics of a stored run: accuracy, balanced accuracy, ROC-AUC and recall per metadata group.

A model can be accurate on average and much worse for one group (one sex, the elderly, lesions on the
scalp). This module measures that on a run's test split, grouped by a metadata attribute (HAM10000:
sex, age buckets, localization; a `folder` data set: any column of its metadata.csv), reports the
largest gap between groups, and puts a DP run beside a non-private one: does DP widen the gaps?
(Berrada et al. 2023 report it does not on their medical sets.)

Nothing is dropped silently: groups smaller than `min_group` are listed and flagged but left out of
the gap (their accuracy is mostly noise); the "unknown" group (missing metadata) is listed too and
never counts as a demographic group. Results are stored in the run folder as `fairness.json`; the
per-example test probabilities are `test_predictions.npz` (written by the trainer, or here once) and
the test split's metadata `test_metadata.json`, so the second look is fast.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpcore.errors import DPCoreError
from dpcore.store.runs import RunStore

UNKNOWN = "unknown"
DEFAULT_MIN_GROUP = 30
MIN_POSITIVES = 10  # a group's recall of the positive class counts in the gap only with this many positives
AGE_EDGES = (30, 45, 60, 75)
AGE_LABELS = ("<30", "30–44", "45–59", "60–74", "75+")
# Where a data set's "positive" (malignant / disease) class is known, its recall (sensitivity) is reported.
POSITIVE_CLASSES = {"ham10000": "mel", "dermamnist": "melanoma", "pneumoniamnist": "pneumonia"}
_POSITIVE_NAMES = ("mel", "melanoma", "malignant", "pneumonia", "positive", "disease", "abnormal")
GAP_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "positive_recall")
BOOTSTRAP = 1000
_ID_KEYS = ("lesion_id", "image_id", "patient_id", "id", "path", "file", "filename")
_PREFERRED = ("sex", "age", "localization")
CACHE_VERSION = 1


# -- grouping -----------------------------------------------------------------------------------
def age_bucket(age: Any) -> str:
    """'<30', '30–44', '45–59', '60–74', '75+', or 'unknown' (missing or not a number)."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if math.isnan(a):
        return UNKNOWN
    for edge, label in zip(AGE_EDGES, AGE_LABELS):
        if a < edge:
            return label
    return AGE_LABELS[-1]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def group_values(metadata: Sequence[dict[str, Any]], attribute: str) -> list[str]:
    """The group label of each example for one attribute.

    `age` (and any attribute whose name ends in 'age') is bucketed: <30, 30–44, 45–59, 60–74, 75+.
    Another numeric attribute with more than 12 distinct values is cut at its quartiles; anything else is
    its own value as text. Missing values (None, empty) are 'unknown'.
    """
    raw = [m.get(attribute) for m in metadata]
    if attribute.lower() == "age" or attribute.lower().endswith("_age"):
        return [age_bucket(v) for v in raw]
    nums = [v for v in raw if _is_number(v)]
    if nums and len(nums) == sum(v not in (None, "") for v in raw) and len(set(nums)) > 12:
        q = np.quantile(np.asarray(nums, dtype=float), [0.25, 0.5, 0.75])
        edges = sorted({float(e) for e in q})
        labels = []
        for v in raw:
            if not _is_number(v):
                labels.append(UNKNOWN)
                continue
            k = int(np.searchsorted(edges, float(v), side="right"))
            lo = _fmt_num(edges[k - 1]) if k > 0 else None
            hi = _fmt_num(edges[k]) if k < len(edges) else None
            labels.append(f"<{hi}" if lo is None else (f"≥{lo}" if hi is None else f"{lo}–<{hi}"))
        return labels
    out = []
    for v in raw:
        if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v)):
            out.append(UNKNOWN)
        elif _is_number(v):
            out.append(_fmt_num(float(v)))
        else:
            out.append(str(v))
    return out


def available_attributes(metadata: Sequence[dict[str, Any]]) -> list[str]:
    """Metadata keys worth grouping by: at least two known values and not an identifier (sex, age, ... first)."""
    keys: list[str] = []
    for m in metadata:
        keys += [k for k in m if k not in keys]
    n = len(metadata)
    out = []
    for k in keys:
        if k.lower() in _ID_KEYS:
            continue
        values = {str(m.get(k)) for m in metadata if m.get(k) not in (None, "")}
        numeric = all(_is_number(m.get(k)) for m in metadata if m.get(k) not in (None, ""))
        if len(values) < 2 or (not numeric and n >= 20 and len(values) > n / 2):
            continue  # constant, or nearly one value per example (an id)
        out.append(k)
    return sorted(out, key=lambda k: (_PREFERRED.index(k) if k in _PREFERRED else len(_PREFERRED), keys.index(k)))


def positive_class(dataset: str | None, class_names: Sequence[str], override: str | None = None) -> str | None:
    """The class whose recall matters most (melanoma for HAM10000), or None where none is known."""
    if override is not None:
        if override not in class_names:
            raise DPCoreError(f"positive class {override!r} is not a class of this run. Fix: use one of "
                              f"{list(class_names)}")
        return override
    lower = {c.lower(): c for c in class_names}
    if dataset in POSITIVE_CLASSES and POSITIVE_CLASSES[dataset] in lower:
        return lower[POSITIVE_CLASSES[dataset]]
    return next((lower[n] for n in _POSITIVE_NAMES if n in lower), None)


# -- metrics ------------------------------------------------------------------------------------
def _auc(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> tuple[float | None, str | None]:
    from sklearn.metrics import roc_auc_score

    present = sorted(set(y.tolist()))
    if len(present) < 2:
        which = class_names[present[0]] if present else "none"
        return None, f"only one class in this group ({which}): ROC-AUC is undefined"
    if len(class_names) == 2:
        return float(roc_auc_score(y, probs[:, 1])), None
    auc = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    missing = [class_names[c] for c in range(len(class_names)) if c not in present]
    return auc, (f"macro over the {len(present)} classes present (absent: {', '.join(missing)})" if missing else None)


def group_metrics(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                  positive: str | None = None) -> dict[str, Any]:
    """n, accuracy, balanced accuracy (mean recall over the classes present), macro one-vs-rest ROC-AUC
    (None with the reason when the group has a single class), per-class recall (None for classes absent
    from the group) and the positive class's recall."""
    y = np.asarray(y, dtype=int)
    pred = np.asarray(probs).argmax(axis=1)
    counts = np.bincount(y, minlength=len(class_names))
    recall = {c: (float((pred[y == k] == k).mean()) if counts[k] else None) for k, c in enumerate(class_names)}
    present = [recall[c] for k, c in enumerate(class_names) if counts[k]]
    auc, note = _auc(y, np.asarray(probs), class_names)
    out = {
        "n": len(y),
        "n_per_class": {c: int(counts[k]) for k, c in enumerate(class_names)},
        "accuracy": float((pred == y).mean()) if len(y) else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "roc_auc": auc, "roc_auc_note": note,
        "per_class_recall": recall,
    }
    if positive is not None:
        out["positive_recall"] = recall[positive]
        out["n_positive"] = int(counts[list(class_names).index(positive)])
    return out


def _gap(groups: dict[str, dict], metric: str, eligible: list[str]) -> dict[str, Any] | None:
    vals = {g: groups[g][metric] for g in eligible if groups[g].get(metric) is not None}
    if metric == "positive_recall":
        vals = {g: v for g, v in vals.items() if groups[g].get("n_positive", 0) >= MIN_POSITIVES}
    if len(vals) < 2:
        return None
    best, worst = max(vals, key=vals.get), min(vals, key=vals.get)
    return {"gap": vals[best] - vals[worst], "best_group": best, "best": vals[best], "worst_group": worst,
            "worst": vals[worst], "n_groups": len(vals)}


def _bootstrap_gaps(groups: np.ndarray, correct: Sequence[np.ndarray], eligible: list[str], n_boot: int,
                    seed: int) -> np.ndarray:
    """(n_boot, len(correct)) max−min of the group means of each 0/1 array, resampling examples within each
    group (the same resample for every array: a paired bootstrap when they are two runs on one test split)."""
    rng = np.random.default_rng(seed)
    means = np.zeros((n_boot, len(correct), len(eligible)))
    for j, g in enumerate(eligible):
        idx = np.flatnonzero(groups == g)
        draw = idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))]
        for r, c in enumerate(correct):
            means[:, r, j] = c[draw].mean(axis=1)
    return means.max(axis=2) - means.min(axis=2)


def fairness_report(y: np.ndarray, probs: np.ndarray, groups: Sequence[str], class_names: Sequence[str], *,
                    min_group: int = DEFAULT_MIN_GROUP, positive: str | None = None, attribute: str = "group",
                    n_boot: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Per-group metrics, the overall row, and the largest gap (max−min) of each metric across the groups
    with at least `min_group` examples (the 'unknown' group never counts; small groups are flagged)."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=float)
    groups_arr = np.asarray([str(g) for g in groups], dtype=object)
    if not (len(y) == len(probs) == len(groups_arr)):
        raise DPCoreError(f"{len(y)} labels, {len(probs)} predictions and {len(groups_arr)} group labels differ")
    if min_group < 1:
        raise DPCoreError(f"min_group must be at least 1, got {min_group}")
    names = sorted(set(groups_arr.tolist()), key=_group_order)
    majority = int(np.bincount(y, minlength=len(class_names)).argmax()) if len(y) else 0
    per_group: dict[str, dict] = {}
    for g in names:
        m = groups_arr == g
        row = group_metrics(y[m], probs[m], class_names, positive)
        # what always answering the overall majority class would score here: group accuracies differ with
        # the groups' class mix alone, so read accuracy against this (and balanced accuracy, which does not)
        row["majority_baseline"] = float((y[m] == majority).mean()) if m.any() else None
        row["small"] = row["n"] < min_group
        row["unknown"] = g == UNKNOWN
        per_group[g] = row
    eligible = [g for g in names if not per_group[g]["small"] and g != UNKNOWN]
    excluded = {g: ("missing metadata" if g == UNKNOWN else f"n={per_group[g]['n']} < {min_group}")
                for g in names if g not in eligible}
    gaps = {metric: _gap(per_group, metric, eligible) for metric in GAP_METRICS
            if metric != "positive_recall" or positive is not None}
    correct = (probs.argmax(axis=1) == y).astype(float)
    if gaps.get("accuracy") and n_boot:
        boot = _bootstrap_gaps(groups_arr, [correct], eligible, n_boot, seed)[:, 0]
        gaps["accuracy"]["ci95"] = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
    overall = group_metrics(y, probs, class_names, positive)
    overall["majority_baseline"] = float((y == majority).mean()) if len(y) else None
    return {
        "attribute": attribute, "min_group": min_group, "positive_class": positive, "min_positives": MIN_POSITIVES,
        "majority_class": class_names[majority] if len(y) else None,
        "class_names": list(class_names), "overall": overall,
        "groups": per_group, "gap_groups": eligible, "excluded_from_gap": excluded, "gaps": gaps,
    }


def _group_order(g: str):
    if g == UNKNOWN:
        return (2, 0, g)
    if g in AGE_LABELS:
        return (0, AGE_LABELS.index(g), g)
    return (1, 0, g)


# -- stored runs --------------------------------------------------------------------------------
@dataclass
class RunTestData:
    run_id: str
    dataset: str
    private: bool
    probs: np.ndarray
    labels: np.ndarray
    test_index: np.ndarray
    class_names: list[str]
    metadata: list[dict[str, Any]]  # one per row of probs
    predictions_source: str


def _load_splits(store: RunStore, run_id: str):
    from dpcore.data import load_dataset

    cfg = store.get_run(run_id).config
    try:
        return load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction,
                            cache_dir=cfg.cache_dir, medmnist_size=cfg.medmnist_size, split=cfg.split)
    except DPCoreError as e:
        where = f" from {cfg.data_dir}" if cfg.data_dir else ""
        raise DPCoreError(f"the test split of run {run_id} cannot be loaded: data set {cfg.dataset!r} no longer "
                          f"loads{where} ({e}). Fix: restore the data where the run read them") from e


def _predict_test(store: RunStore, run_id: str, splits, batch_size: int, device: str) -> None:
    """Predict the whole test split with the stored model (batched, no grad) into test_predictions.npz."""
    from dpcore.analysis.predict import load_run

    loaded = load_run(store, run_id, device=device)
    test = splits.test
    probs, kept = [], []
    for start in range(0, len(test), batch_size):
        idx = list(range(start, min(start + batch_size, len(test))))
        probs.append(loaded.predict_proba([test.image(i) for i in idx], batch_size=batch_size, calibrated=False))
        kept += idx
    from dpcore.store.runs import atomic_write

    path = store.run_dir(run_id) / "test_predictions.npz"
    all_probs = np.concatenate(probs) if probs else np.zeros((0, len(loaded.class_names)))
    atomic_write(path, lambda tmp: np.savez(tmp, probs=all_probs, labels=np.asarray(test.labels, dtype=np.int64),
                                            test_index=np.asarray(kept, dtype=np.int64)))


def load_run_test_data(store: RunStore, run_id: str, *, batch_size: int = 128, device: str = "cpu") -> RunTestData:
    """A run's test probabilities with each example's metadata (cached in the run folder after the first call)."""
    from dpcore.store.predictions import load_test_predictions

    rec = store.get_run(run_id)
    run_dir = store.run_dir(run_id)
    source = "test_predictions.npz (saved by the trainer)"
    splits = None
    if not (run_dir / "test_predictions.npz").is_file():
        if not (run_dir / "model.safetensors").is_file():
            raise DPCoreError(f"run {run_id} has neither test predictions nor a model (status: {rec.status}). "
                              "Fix: pick a finished run")
        splits = _load_splits(store, run_id)
        _predict_test(store, run_id, splits, batch_size, device)
        source = "test_predictions.npz (predicted from model.safetensors by fairness)"
    preds = load_test_predictions(store, run_id)
    meta_path = run_dir / "test_metadata.json"
    fingerprint = {"n": len(preds.labels), "labels_sum": int(preds.labels.sum()),
                   "index_sum": int(preds.test_index.sum())}
    metadata = None
    if meta_path.is_file():
        try:
            cached = json.loads(meta_path.read_text())
            if cached.get("version") == CACHE_VERSION and cached.get("fingerprint") == fingerprint:
                metadata = cached["metadata"]
        except (OSError, ValueError, KeyError):
            metadata = None
    if metadata is None:
        splits = splits or _load_splits(store, run_id)
        test = splits.test
        if (splits.class_names != preds.class_names
                or (len(preds.test_index) and int(preds.test_index.max()) >= len(test))
                or not np.array_equal(test.labels[preds.test_index], preds.labels)):
            raise DPCoreError(f"the data of run {run_id} have changed since it was trained (classes "
                              f"{splits.class_names} vs {preds.class_names}, or other labels or test images): "
                              "subgroup metrics would pair predictions with the wrong examples. Fix: restore the "
                              "original data folder" + (f" {rec.config.data_dir}" if rec.config.data_dir else ""))
        metadata = [dict(splits.test_metadata[int(i)]) for i in preds.test_index]
        store.write_json(run_id, "test_metadata.json", {"version": CACHE_VERSION, "fingerprint": fingerprint,
                                                        "metadata": metadata})
    return RunTestData(run_id=run_id, dataset=rec.dataset, private=rec.private, probs=preds.probs,
                       labels=preds.labels, test_index=preds.test_index, class_names=preds.class_names,
                       metadata=metadata, predictions_source=source)


def run_attributes(store: RunStore, run_id: str) -> list[str]:
    """The metadata attributes a run's test split can be grouped by (empty: the data set has no metadata)."""
    return available_attributes(load_run_test_data(store, run_id).metadata)


def _run_summary(store: RunStore, run_id: str) -> dict[str, Any]:
    rec = store.get_run(run_id)
    eps = (rec.privacy or {}).get("epsilon") if rec.private else None
    return {"run_id": run_id, "dataset": rec.dataset, "backbone": rec.backbone, "private": rec.private,
            "epsilon": eps, "target_epsilon": rec.target_epsilon if rec.private else None,
            "label": (f"DP ε={eps:.3g}" if eps is not None else "DP") if rec.private else "non-private"}


def _read_json(store: RunStore, run_id: str) -> dict[str, Any]:
    path = store.run_dir(run_id) / "fairness.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if data.get("version") != CACHE_VERSION:
        data = {"version": CACHE_VERSION}
    data.setdefault("reports", {})
    data.setdefault("comparisons", {})
    return data


def _key(attribute: str, min_group: int, positive: str | None, other: str | None = None) -> str:
    return f"{attribute}|min_group={min_group}|positive={positive}" + (f"|against={other}" if other else "")


def _check_attribute(data: RunTestData, attribute: str) -> None:
    attrs = available_attributes(data.metadata)
    if attribute not in attrs:
        has = {k for m in data.metadata for k in m}
        if not has:
            raise DPCoreError(f"run {data.run_id} ({data.dataset}) has no per-example metadata, so there are no "
                              "subgroups. Fix: use a data set with metadata (ham10000, or a folder data set with "
                              "a metadata.csv)")
        raise DPCoreError(f"run {data.run_id} cannot be grouped by {attribute!r}. Fix: use one of {attrs}")


def run_fairness(store: RunStore, run_id: str, attribute: str, *, min_group: int = DEFAULT_MIN_GROUP,
                 positive: str | None = None, use_cache: bool = True, device: str = "cpu") -> dict[str, Any]:
    """The fairness report of one stored run for one attribute; stored in RUN/fairness.json."""
    stored = _read_json(store, run_id)
    if use_cache:
        for rep in stored["reports"].values():
            if (rep.get("attribute") == attribute and rep.get("min_group") == min_group
                    and (positive is None or rep.get("positive_class") == positive)):
                return rep
    data = load_run_test_data(store, run_id, device=device)
    _check_attribute(data, attribute)
    pos = positive_class(data.dataset, data.class_names, positive)
    report = fairness_report(data.labels, data.probs, group_values(data.metadata, attribute), data.class_names,
                             min_group=min_group, positive=pos, attribute=attribute)
    report["run"] = _run_summary(store, run_id)
    report["predictions_source"] = data.predictions_source
    stored = _read_json(store, run_id)
    stored["reports"][_key(attribute, min_group, pos)] = report
    store.write_json(run_id, "fairness.json", stored)
    return report


def default_partner(store: RunStore, run_id: str) -> str | None:
    """A finished run of the other privacy kind on the same data (same split), most alike first, newest first."""
    rec = store.get_run(run_id)
    cfg = rec.config
    best, best_score = None, None
    for r in store.list_runs():
        if r.run_id == run_id or r.status != "done" or r.private == rec.private or r.dataset != rec.dataset:
            continue
        c = r.config
        if (c.data_dir, c.seed, c.test_fraction, c.medmnist_size) != (cfg.data_dir, cfg.seed, cfg.test_fraction,
                                                                       cfg.medmnist_size):
            continue
        if not (store.run_dir(r.run_id) / "test_predictions.npz").is_file() and not (
                store.run_dir(r.run_id) / "model.safetensors").is_file():
            continue
        score = (c.backbone == cfg.backbone, c.image_size == cfg.image_size, c.pretrained == cfg.pretrained,
                 c.scope == cfg.scope, c.epochs == cfg.epochs, r.created_at)
        if best_score is None or score > best_score:
            best, best_score = r.run_id, score
    return best


def compare(store: RunStore, dp_run: str, np_run: str, attribute: str, *, min_group: int = DEFAULT_MIN_GROUP,
            positive: str | None = None, n_boot: int = BOOTSTRAP, seed: int = 0, device: str = "cpu") -> dict:
    """Two runs side by side per group, and how much wider (positive) or narrower the first run's gaps are.

    Usually the first is the DP run and the second the non-private one. When both were evaluated on the same
    test examples, the accuracy-gap difference gets a paired bootstrap 95% interval (resampling examples
    within each group, the same draws for both runs).
    """
    a = load_run_test_data(store, dp_run, device=device)
    b = load_run_test_data(store, np_run, device=device)
    if a.dataset != b.dataset or a.class_names != b.class_names:
        raise DPCoreError(f"runs {dp_run} ({a.dataset}, classes {a.class_names}) and {np_run} ({b.dataset}, "
                          f"classes {b.class_names}) are not on the same data set. Fix: compare runs of one data set")
    _check_attribute(a, attribute)
    _check_attribute(b, attribute)
    pos = positive_class(a.dataset, a.class_names, positive)
    reports = []
    for d, rid in ((a, dp_run), (b, np_run)):
        rep = fairness_report(d.labels, d.probs, group_values(d.metadata, attribute), d.class_names,
                              min_group=min_group, positive=pos, attribute=attribute, n_boot=n_boot, seed=seed)
        rep["run"] = _run_summary(store, rid)
        rep["predictions_source"] = d.predictions_source
        stored = _read_json(store, rid)
        stored["reports"][_key(attribute, min_group, pos)] = rep
        store.write_json(rid, "fairness.json", stored)
        reports.append(rep)
    ra, rb = reports
    groups = sorted(set(ra["groups"]) | set(rb["groups"]), key=_group_order)
    rows = []
    for g in groups:
        ga, gb = ra["groups"].get(g, {}), rb["groups"].get(g, {})
        row = {"group": g, "n": ga.get("n", gb.get("n")), "small": bool(ga.get("small", True)),
               "unknown": g == UNKNOWN, "majority_baseline": ga.get("majority_baseline", gb.get("majority_baseline"))}
        for m in GAP_METRICS:
            va, vb = ga.get(m), gb.get(m)
            row[f"{m}_a"], row[f"{m}_b"] = va, vb
            row[f"{m}_diff"] = None if va is None or vb is None else va - vb
        rows.append(row)
    gap_diff = {}
    for m in GAP_METRICS:
        x, y = ra["gaps"].get(m), rb["gaps"].get(m)
        gap_diff[m] = None if not x or not y else x["gap"] - y["gap"]
    paired = (len(a.test_index) == len(b.test_index) and np.array_equal(a.test_index, b.test_index)
              and np.array_equal(a.labels, b.labels))
    result: dict[str, Any] = {
        "attribute": attribute, "min_group": min_group, "positive_class": pos,
        "a": ra["run"], "b": rb["run"], "rows": rows, "gaps_a": ra["gaps"], "gaps_b": rb["gaps"],
        "overall_a": {m: ra["overall"].get(m) for m in GAP_METRICS},
        "overall_b": {m: rb["overall"].get(m) for m in GAP_METRICS},
        "gap_difference": gap_diff, "paired": bool(paired), "reports": [ra, rb],
    }
    eligible = [g for g in ra["gap_groups"] if g in rb["gap_groups"]]
    if paired and gap_diff["accuracy"] is not None and n_boot and len(eligible) >= 2:
        groups_arr = np.asarray(group_values(a.metadata, attribute), dtype=object)
        ca = (a.probs.argmax(axis=1) == a.labels).astype(float)
        cb = (b.probs.argmax(axis=1) == b.labels).astype(float)
        boot = _bootstrap_gaps(groups_arr, [ca, cb], eligible, n_boot, seed)
        d = boot[:, 0] - boot[:, 1]
        lo, hi = float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))
        result["accuracy_gap_difference_ci95"] = [lo, hi]
        result["bootstrap"] = {"resamples": n_boot, "seed": seed, "groups": eligible,
                               "method": "paired, examples resampled within each group"}
    result["verdict"] = verdict(result)
    stored = _read_json(store, dp_run)
    slim = {k: v for k, v in result.items() if k != "reports"}
    stored["comparisons"][_key(attribute, min_group, pos, np_run)] = slim
    store.write_json(dp_run, "fairness.json", stored)
    return result


def verdict(comp: dict[str, Any]) -> str:
    """One sentence: is the first run's accuracy gap wider than the second's, beyond bootstrap noise?"""
    d = comp["gap_difference"].get("accuracy")
    la, lb = comp["a"]["label"], comp["b"]["label"]
    if d is None:
        return (f"no accuracy gap to compare by {comp['attribute']}: fewer than two groups with at least "
                f"{comp['min_group']} examples in both runs")
    ci = comp.get("accuracy_gap_difference_ci95")
    size = f"{abs(d) * 100:.1f} points"
    if ci is None:
        return f"the {la} run's accuracy gap is {size} {'wider' if d > 0 else 'narrower'} than the {lb} run's " \
               "(no interval: the runs were not evaluated on the same test examples)"
    interval = f"95% CI {ci[0] * 100:+.1f} to {ci[1] * 100:+.1f} points"
    if ci[0] > 0:
        return f"the {la} run widens the accuracy gap by {size} over the {lb} run ({interval})"
    if ci[1] < 0:
        return f"the {la} run narrows the accuracy gap by {size} relative to the {lb} run ({interval})"
    return (f"no clear difference: the {la} run's accuracy gap is {size} {'wider' if d > 0 else 'narrower'} than "
            f"the {lb} run's, within bootstrap noise ({interval})")


# -- text ---------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}"


def _f3(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_report(rep: dict[str, Any]) -> str:
    pos = rep.get("positive_class")
    head = f"{'group':<18} {'n':>6} {'acc %':>7} {'maj. %':>7} {'bal.acc %':>9} {'AUC':>6}" + (
        f" {pos + ' rec % (n)':>12}" if pos else "") + "  note"
    lines = [head, "-" * len(head)]

    def line(name: str, r: dict) -> str:
        notes = []
        if r.get("small"):
            notes.append(f"small (n<{rep['min_group']}): not in gap")
        if r.get("unknown"):
            notes.append("missing metadata: not in gap")
        if r.get("roc_auc") is None and r.get("roc_auc_note"):
            notes.append(r["roc_auc_note"])
        s = (f"{name:<18} {r['n']:>6} {_pct(r['accuracy']):>7} {_pct(r.get('majority_baseline')):>7} "
             f"{_pct(r['balanced_accuracy']):>9} {_f3(r['roc_auc']):>6}")
        if pos:
            rec = _pct(r.get("positive_recall"))
            s += f" {rec + ' (' + str(r.get('n_positive', 0)) + ')':>12}"
        return s + ("  " + "; ".join(notes) if notes else "")

    for g, r in rep["groups"].items():
        lines.append(line(g, r))
    lines.append(line("(all)", rep["overall"]))
    if rep.get("majority_class"):
        lines.append(f"maj. % = share of the majority class ({rep['majority_class']}): the accuracy of always "
                     "answering it; group accuracies differ with the class mix alone")
    for m, gap in rep["gaps"].items():
        if gap is None:
            lines.append(f"largest {m} gap: n/a (fewer than two groups qualify)")
        else:
            ci = f", 95% CI {_pct(gap['ci95'][0])}–{_pct(gap['ci95'][1])}" if gap.get("ci95") else ""
            scale = _f3 if m == "roc_auc" else _pct
            lines.append(f"largest {m} gap: {scale(gap['gap'])}{'' if m == 'roc_auc' else ' points'} "
                         f"({gap['best_group']} {scale(gap['best'])} vs {gap['worst_group']} {scale(gap['worst'])}"
                         f"{ci})")
    return "\n".join(lines)


def format_compare(comp: dict[str, Any]) -> str:
    la, lb = comp["a"]["label"], comp["b"]["label"]
    pos = comp.get("positive_class")
    metrics = [("accuracy", "acc %", _pct), ("balanced_accuracy", "bal.acc %", _pct), ("roc_auc", "AUC", _f3)]
    if pos:
        metrics.append(("positive_recall", f"{pos} rec %", _pct))
    head = f"{'group':<18} {'n':>6} {'maj. %':>7}" + "".join(f" {t + ' ' + s:>{max(14, len(t) + 8)}}" for _, t, _ in metrics
                                             for s in ("A", "B"))
    lines = [f"A = {la} ({comp['a']['run_id']}), B = {lb} ({comp['b']['run_id']}); by {comp['attribute']}",
             head, "-" * len(head)]
    for row in comp["rows"]:
        s = f"{row['group']:<18} {row['n']:>6} {_pct(row.get('majority_baseline')):>7}"
        for m, t, f in metrics:
            for side in ("a", "b"):
                s += f" {f(row[f'{m}_{side}']):>{max(14, len(t) + 8)}}"
        if row["small"] or row["unknown"]:
            s += "  (not in gap)"
        lines.append(s)
    s = f"{'(all)':<18} {comp['reports'][0]['overall']['n']:>6} {_pct(comp['reports'][0]['overall'].get('majority_baseline')):>7}"
    for m, t, f in metrics:
        for side in ("a", "b"):
            s += f" {f(comp[f'overall_{side}'][m]):>{max(14, len(t) + 8)}}"
    lines.append(s)
    for m, t, f in metrics:
        ga, gb, d = comp["gaps_a"].get(m), comp["gaps_b"].get(m), comp["gap_difference"].get(m)
        unit = "" if m == "roc_auc" else " pts"

        def desc(g, f=f, unit=unit):
            return "n/a" if not g else f"{f(g['gap'])}{unit} ({g['worst_group']} worst)"
        dd = "n/a" if d is None else (f"{d:+.3f}" if m == "roc_auc" else f"{d * 100:+.1f}{unit}")
        lines.append(f"{m} gap: A {desc(ga)}, B {desc(gb)}, A−B {dd}")
    if comp.get("accuracy_gap_difference_ci95"):
        lo, hi = comp["accuracy_gap_difference_ci95"]
        lines.append(f"accuracy gap difference A−B, paired bootstrap 95% CI: {lo * 100:+.1f} to {hi * 100:+.1f} pts")
    lines.append("verdict: " + comp["verdict"])
    return "\n".join(lines)


def headline(rep_or_comp: dict[str, Any]) -> dict[str, Any]:
    """The largest gaps (and their difference, for a comparison) as a compact dict for the CLI's last line."""
    def gaps(g: dict) -> dict:
        return {m: (None if v is None else {"gap": round(v["gap"], 4), "worst": v["worst_group"],
                                           "best": v["best_group"]}) for m, v in g.items()}
    if "rows" in rep_or_comp:
        c = rep_or_comp
        out = {"attribute": c["attribute"], "a": c["a"]["run_id"], "b": c["b"]["run_id"],
               "a_label": c["a"]["label"], "b_label": c["b"]["label"], "gaps_a": gaps(c["gaps_a"]),
               "gaps_b": gaps(c["gaps_b"]),
               "gap_difference": {m: (None if v is None else round(v, 4)) for m, v in c["gap_difference"].items()}}
        if c.get("accuracy_gap_difference_ci95"):
            out["accuracy_gap_difference_ci95"] = [round(x, 4) for x in c["accuracy_gap_difference_ci95"]]
        return out
    r = rep_or_comp
    return {"attribute": r["attribute"], "run": r["run"]["run_id"], "label": r["run"]["label"], "gaps": gaps(r["gaps"])}
