"""Read-only views of stored runs for tables, frontiers and the test-image gallery.

The gallery shows test-split images only: a model trained with DP protects its training images,
and showing those next to its predictions would publish exactly what the guarantee is about.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from PIL import Image

from dpcore.data import load_dataset
from dpcore.errors import DPCoreError
from dpcore.store.predictions import TestPredictions, load_test_predictions  # noqa: F401 - reviewed here
from dpcore.store.runs import RunRecord, RunStore


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _spent_epsilon(rec: RunRecord) -> float | None:
    """The ε the run's card guarantees per image (composed over its weights' lineage), from the stored
    privacy record; ∞ for a private run whose guarantee does not hold (replayable noise, a non-private
    ancestor on the same images)."""
    if not rec.private or not rec.privacy:
        return None
    return guaranteed_epsilon(rec.privacy)


def guaranteed_epsilon(privacy: dict[str, Any]) -> float | None:
    if privacy.get("guarantee_holds") is False:
        return math.inf
    return privacy.get("guarantee_epsilon") or privacy.get("epsilon")


def owner_guarantee(privacy: dict[str, Any]) -> tuple[float | None, float | None]:
    """(ε, δ) per patient (lesion): a patient-level run's own; for an image-level run the group-privacy bound
    of its largest patient (∞ where it overflows); (None, None) where the data name no owners."""
    eps = guaranteed_epsilon(privacy)
    if eps is None:
        return None, None
    if privacy.get("unit") not in (None, "image"):
        return eps, privacy.get("delta")
    group = privacy.get("group")
    if not group:
        return None, None
    ge, gd = group.get("group_epsilon"), group.get("group_delta")
    return (math.inf if ge is None else ge), (math.inf if gd is None else gd)


def runs_table(store: RunStore) -> list[dict[str, Any]]:
    """One row per run, oldest first, with the columns a runs overview shows.

    `epsilon` is the ε actually spent, from the run's privacy record: None for non-private runs and
    for runs that ended without one (queued, running, failed); a cancelled run shows what it spent.
    """
    rows = []
    for rec in store.list_runs():
        cfg, m = rec.config, rec.metrics or {}
        rows.append({
            "run_id": rec.run_id, "status": rec.status, "dataset": rec.dataset, "backbone": rec.backbone,
            "pretrained": cfg.pretrained, "scope": cfg.scope, "private": rec.private,
            "epsilon": _spent_epsilon(rec), "target_epsilon": rec.target_epsilon,
            "unit": ((rec.privacy or {}).get("unit") or cfg.privacy_unit) if rec.private else None,
            "delta": cfg.delta if rec.private else None, "accountant": cfg.accountant if rec.private else None,
            "test_accuracy": m.get("accuracy"), "test_roc_auc": m.get("roc_auc"),
            "duration_s": rec.duration, "created": _iso(rec.created_at),
        })
    return rows


def _label(rec: RunRecord) -> str:
    cfg = rec.config
    unit = (rec.privacy or {}).get("unit") or "image"
    budget = (f"ε={rec.privacy['epsilon']:.3g} per {unit}" if _spent_epsilon(rec) is not None else "non-private")
    weights = {"none": "from scratch", "hub": "pretrained"}.get(cfg.pretrained, "weights from file")
    return f"{budget}, {cfg.epochs} epochs, {cfg.scope}, {weights}"


def frontier_points(store: RunStore, dataset: str, backbone: str, scope: str | None = None,
                    pretrained: str | None = None) -> tuple[list[dict], list[dict]]:
    """(DP points, non-private points) of the finished runs of one data set + backbone (and, when given,
    fine-tuning scope and weight source: a head-only probe and full fine-tuning are different curves)."""
    dp, nonprivate = [], []
    for rec in store.list_runs():
        if rec.status != "done" or rec.dataset != dataset or rec.backbone != backbone:
            continue
        if (scope is not None and rec.config.scope != scope) or (
                pretrained is not None and rec.config.pretrained != pretrained):
            continue
        m = rec.metrics or {}
        point = {"epsilon": _spent_epsilon(rec), "target_epsilon": rec.target_epsilon,
                 "accuracy": m.get("accuracy"), "balanced_accuracy": m.get("balanced_accuracy"),
                 "roc_auc": m.get("roc_auc"), "run_id": rec.run_id, "label": _label(rec),
                 "unit": ((rec.privacy or {}).get("unit") or rec.config.privacy_unit) if rec.private else None}
        if rec.private:
            if point["epsilon"] is None:  # a done private run always records ε; say so rather than hide it
                raise DPCoreError(f"run {rec.run_id} is private and done but has no spent ε recorded. "
                                  "Fix: check its card.json; re-run it if the privacy record is missing")
            dp.append(point)
        else:
            nonprivate.append(point)
    return dp, nonprivate


def frontier_groups(store: RunStore) -> list[tuple[str, str, str, str]]:
    """(data set, backbone, scope, weight source) of the finished runs, sorted: one frontier each."""
    return sorted({(r.dataset, r.backbone, r.config.scope, r.config.pretrained)
                   for r in store.list_runs() if r.status == "done"})


def group_of(rec: RunRecord) -> tuple[str, str, str, str]:
    """The frontier a run belongs to (see `frontier_groups`)."""
    return rec.dataset, rec.backbone, rec.config.scope, rec.config.pretrained


def default_frontier_group(store: RunStore, sweep_run_ids: list[str] | None = None) -> tuple[str, str, str, str] | None:
    """The frontier to show first: that of the latest sweep (its point runs, newest sweep first, when one of them
    has finished), else that of the most recently finished run — not the first group in sort order."""
    groups = set(frontier_groups(store))
    records = {r.run_id: r for r in store.list_runs()}
    for run_id in sweep_run_ids or ():
        rec = records.get(run_id)
        if rec is not None and group_of(rec) in groups:
            return group_of(rec)
    done = [r for r in records.values() if r.status == "done"]
    if not done:
        return None
    return group_of(max(done, key=lambda r: (r.finished_at or r.created_at, r.created_at)))


def ready_runs(store: RunStore) -> list[RunRecord]:
    """Finished runs whose model file is present (those can predict, explain and show a gallery)."""
    return [r for r in store.list_runs()
            if r.status == "done" and (store.run_dir(r.run_id) / "model.safetensors").is_file()]


DEMO_DATASETS = ("digits", "cifar10")  # not medical images: listed after the medical models


def clinician_order(store: RunStore) -> list[RunRecord]:
    """The models a clinician may pick, best first: private with a guarantee that holds, then medical data
    before the demo sets, then by test ROC-AUC (the newest run is not the best one)."""
    def key(r: RunRecord):
        holds = r.private and bool(r.privacy) and math.isfinite(guaranteed_epsilon(r.privacy) or math.inf)
        auc = (r.metrics or {}).get("roc_auc")
        return (not holds, r.dataset in DEMO_DATASETS, -(auc if auc is not None else -1.0), -r.created_at)

    return sorted(ready_runs(store), key=key)


@dataclass
class GalleryItem:
    image: Image.Image
    true_label: str
    predicted_label: str
    confidence: float  # probability of the predicted class
    correct: bool
    source: str  # file path or 'array[index]' of the test image


def _n_skipped_test(store: RunStore, run_id: str) -> int:
    try:
        return len(store.card(run_id)["dataset"]["skipped_unreadable"]["test"])
    except (DPCoreError, KeyError, TypeError):
        return 0


def test_gallery(store: RunStore, run_id: str, *, misclassified_only: bool = False,
                 true_class: str | None = None, limit: int = 24) -> list[GalleryItem]:
    """Test-split images of a run with its stored predictions (never training images): the classes in turn, each in
    test-split order, up to `limit`."""
    preds = load_test_predictions(store, run_id)
    if true_class is not None and true_class not in preds.class_names:
        raise DPCoreError(f"{true_class!r} is not a class of run {run_id}. Fix: use one of {preds.class_names}")
    cfg = store.get_run(run_id).config
    try:
        splits = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction,
                              cache_dir=cfg.cache_dir, medmnist_size=cfg.medmnist_size, split=cfg.split)
    except DPCoreError as e:
        where = f" from {cfg.data_dir}" if cfg.data_dir else ""
        raise DPCoreError(f"the test images of run {run_id} cannot be shown: data set {cfg.dataset!r} no longer "
                          f"loads{where} ({e}). Fix: restore the data where the run read them") from e
    test = splits.test
    expected = len(preds.test_index) + _n_skipped_test(store, run_id)
    changed = (splits.class_names != preds.class_names or len(test) != expected
               or (len(preds.test_index) and int(preds.test_index.max()) >= len(test)))
    if not changed:
        changed = not np.array_equal(test.labels[preds.test_index], preds.labels)
    if changed:
        raise DPCoreError(f"the data of run {run_id} have changed since it was trained: its test split now has "
                          f"{len(test)} images and classes {splits.class_names}, the run evaluated {expected} "
                          f"with classes {preds.class_names} (or the labels differ). The gallery would pair "
                          "predictions with the wrong images. Fix: restore the original data folder"
                          + (f" {cfg.data_dir}" if cfg.data_dir else ""))
    predicted = preds.probs.argmax(axis=1)
    want = preds.class_names.index(true_class) if true_class is not None else None
    by_class: dict[int, list[int]] = {}
    for row in range(len(preds.test_index)):
        y, p = int(preds.labels[row]), int(predicted[row])
        if (misclassified_only and y == p) or (want is not None and y != want):
            continue
        by_class.setdefault(y, []).append(row)
    # every class in turn (test-split order within a class): "all" shows each class, not the first one only
    rows, queues = [], [by_class[c] for c in sorted(by_class)]
    while queues and len(rows) < limit:
        rows += [q.pop(0) for q in queues][: limit - len(rows)]
        queues = [q for q in queues if q]
    items: list[GalleryItem] = []
    for row in rows:
        i, y, p = int(preds.test_index[row]), int(preds.labels[row]), int(predicted[row])
        items.append(GalleryItem(image=test.image(i), true_label=preds.class_names[y],
                                 predicted_label=preds.class_names[p], confidence=float(preds.probs[row, p]),
                                 correct=y == p, source=test.source(i)))
    return items


test_gallery.__test__ = False  # its name starts with "test": keep pytest from collecting it where imported
