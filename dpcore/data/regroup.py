"""A patient-grouped re-split of train ∪ test (``split = "grouped"``): no patient on both sides.

Why: the chest X-ray set's "official" split is not patient-disjoint. By the Kermany file names
(``dpcore.data.groups``), most pneumonia patients of its test folder also have images in train, so a test
score partly measures recognising patients already seen. Here the official folders are pooled and split again
by patient (stratified by class as far as whole patients allow, seeded by the run's seed), keeping the official
test fraction unless one is given. The official split stays the default, for comparison with the seed.
Images whose owner is unknown count as their own group, and the card says how many there were.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from dpcore.errors import DataError
from dpcore.data.base import DataSplits
from dpcore.data.groups import groups_of
from dpcore.data.split import finish

SPLITS = ("official", "grouped")


def group_overlap(splits: DataSplits, dataset: str) -> dict[str, Any] | None:
    """How many owners (patients, lesions) have images on both sides of a split; None when none are known."""
    tr = groups_of(splits.train, splits.train_metadata, dataset)
    te = groups_of(splits.test, splits.test_metadata, dataset)
    if tr is None or te is None:
        return None
    a = {g for g in tr.ids if g is not None}
    b = {g for g in te.ids if g is not None}
    return {"unit": tr.unit, "source": tr.source, "train_groups": len(a), "test_groups": len(b),
            "in_both": len(a & b)}


def grouped_resplit(splits: DataSplits, dataset: str, *, seed: int, test_fraction: float | None = None) -> DataSplits:
    """``splits`` with train ∪ test split again so that no owner has images on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold

    train, test = splits.train, splits.test
    if not hasattr(train, "paths") or not hasattr(test, "paths"):
        raise DataError(f"{dataset}: a grouped re-split needs images read from files. Fix: use split 'official'")
    from dpcore.data.images import PathImageList

    pooled = PathImageList(list(train.paths) + list(test.paths),
                           np.concatenate([np.asarray(train.labels), np.asarray(test.labels)]))
    meta = list(splits.train_metadata or [{} for _ in range(len(train))]) + list(
        splits.test_metadata or [{} for _ in range(len(test))])
    groups = groups_of(pooled, meta, dataset)
    if groups is None:
        raise DataError(f"{dataset}: no patient (or lesion) of its images is known, so it cannot be split by patient. "
                        "Fix: use split 'official', or add a metadata.csv with a patient_id column")
    before = group_overlap(splits, dataset)
    ids = [g if g is not None else f"\0image-{i}" for i, g in enumerate(groups.ids)]
    fraction = test_fraction if test_fraction is not None else len(test) / len(pooled)
    if not 0 < fraction < 1:
        raise DataError(f"{dataset}: test fraction {fraction} must be in (0, 1)")
    k = max(2, int(round(1 / fraction)))
    labels = np.asarray(pooled.labels)
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    tr_idx, te_idx = next(folds.split(np.zeros(len(labels)), labels, groups=np.asarray(ids, dtype=object)))
    tr_idx, te_idx = np.sort(tr_idx), np.sort(te_idx)
    assert not ({ids[i] for i in tr_idx} & {ids[i] for i in te_idx})  # the point of it all
    unknown = sum(g is None for g in groups.ids)
    info = dict(splits.split_info)
    info.update(
        method=f"{groups.unit}-grouped re-split of train ∪ test, seed={seed}", split="grouped", seed=seed,
        test_fraction=round(len(te_idx) / len(labels), 4), grouped_by=groups.unit, group_source=groups.source,
        n_groups=len(set(ids)), n_unknown_owner=unknown,
        official=({"method": splits.split_info.get("method"), "n_train": len(train), "n_test": len(test),
                   "owners_in_both": before} if before is not None else {"method": splits.split_info.get("method")}),
    )
    counts = Counter(labels[te_idx].tolist())
    missing = [c for i, c in enumerate(splits.class_names) if counts.get(i, 0) == 0]
    if missing:
        raise DataError(f"{dataset}: the grouped test split has no images of {missing}. Fix: use split 'official' "
                        "or a larger test fraction")
    return finish(DataSplits(
        name=splits.name, class_names=splits.class_names, train=pooled.subset(tr_idx), test=pooled.subset(te_idx),
        train_metadata=[meta[i] for i in tr_idx], test_metadata=[meta[i] for i in te_idx], split_info=info,
        val=splits.val, val_metadata=splits.val_metadata))
