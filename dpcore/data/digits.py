"""scikit-learn's bundled 8x8 digits: the one data set that needs neither files nor network (demos, tests)."""
from __future__ import annotations

import numpy as np

from dpcore.data.base import DataSplits
from dpcore.data.images import ArrayImageList
from dpcore.data.split import finish, stratified_split


def load_digits_splits(*, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # values are 0..16
    labels = d.target.astype(np.int64)
    class_names = [str(i) for i in range(10)]
    full = ArrayImageList(images, labels, "digits")
    tr, te = stratified_split(labels, test_fraction, seed, "digits", class_names)
    n = len(labels)
    return finish(DataSplits(
        name="digits", class_names=class_names, train=full.subset(tr), test=full.subset(te),
        train_metadata=[{} for _ in tr], test_metadata=[{} for _ in te],
        split_info={"method": f"stratified held-out, seed={seed}", "seed": seed, "test_fraction": test_fraction,
                    "source": f"sklearn.datasets.load_digits ({n} images, 8x8, values 0..16 scaled to 0..255)"},
    ))
