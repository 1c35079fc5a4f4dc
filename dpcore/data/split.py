"""Held-out test splits for data sets that ship without one, and the counts every run card shows."""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from dpcore.errors import DataError
from dpcore.data.base import DataSplits, ImageList


def stratified_split(labels: Sequence[int], test_fraction: float, seed: int, what: str,
                     class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx), sorted, with each class in the same proportion on both sides.

    Stratified so that a rare class is not missing from the test set by chance.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels, dtype=np.int64)
    counts = Counter(labels.tolist())
    small = [c for c, k in counts.items() if k < 2]
    if small:
        names = [class_names[c] if class_names else str(c) for c in sorted(small)]
        raise DataError(f"{what}: class(es) {names} have a single image, so a stratified train/test split "
                        "is impossible. Fix: add images to these classes, remove them, or provide a test/ folder")
    n_test = int(np.ceil(test_fraction * len(labels)))
    if n_test < len(counts) or len(labels) - n_test < len(counts):
        raise DataError(f"{what}: {len(labels)} images are too few to hold out {test_fraction:.0%} with each of "
                        f"{len(counts)} classes on both sides. Fix: change test_fraction or add images")
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(tr), np.sort(te)


def class_counts(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    c = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    return {name: int(k) for name, k in zip(class_names, c)}


def finish(splits: DataSplits) -> DataSplits:
    """Fill the sizes and per-class counts into split_info, so the card never recomputes them."""
    info: dict[str, Any] = splits.split_info
    parts: list[tuple[str, ImageList | None]] = [("train", splits.train), ("val", splits.val), ("test", splits.test)]
    info["n_train"], info["n_test"] = len(splits.train), len(splits.test)
    if splits.val is not None:
        info["n_val"] = len(splits.val)
    info["class_counts"] = {k: class_counts(v.labels, splits.class_names) for k, v in parts if v is not None}
    return splits
