"""The data sets a run can name, and the one entry point that loads any of them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpcore.errors import ConfigError
from dpcore.data.base import DataSplits


@dataclass(frozen=True)
class DatasetInfo:
    description: str
    needs_data_dir: bool  # the user must point at files (no download exists or is allowed)
    downloads: bool  # fetched into cache_dir on first use when not given


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("scikit-learn's 1797 handwritten digits, 8x8, 10 classes; bundled, works offline "
                          "(stratified held-out test split)", False, False),
    "folder": DatasetInfo("your images in ImageFolder layout: DIR/{train,test[,val]}/CLASS/* or DIR/CLASS/* "
                          "(e.g. Kaggle chest_xray, DermNet)", True, False),
    "ham10000": DatasetInfo("HAM10000 dermatoscopy, 7 diagnoses: HAM10000_metadata.csv + images; "
                            "split grouped by lesion", True, False),
    "pneumoniamnist": DatasetInfo("PneumoniaMNIST (MedMNIST) chest X-rays, normal vs pneumonia, official "
                                  "train/val/test split; .npz from --data-dir, the cache, or Zenodo", False, True),
    "dermamnist": DatasetInfo("DermaMNIST (MedMNIST, from HAM10000), 7 classes, official train/val/test split; "
                              ".npz from --data-dir, the cache, or Zenodo", False, True),
    "cifar10": DatasetInfo("CIFAR-10 natural images, 10 classes (a non-medical baseline); downloaded by "
                           "torchvision into the cache", False, True),
}


def list_datasets() -> list[str]:
    return list(DATASETS)


def load_dataset(name: str, data_dir: str | Path | None = None, *, seed: int = 0, test_fraction: float = 0.2,
                 cache_dir: str | Path | None = None, medmnist_size: int = 28, split: str = "official") -> DataSplits:
    """Load any registered data set as train/test(/val) ImageLists; decoding is left to `materialize`.

    `seed` and `test_fraction` apply only where a data set has no official test split. ``split="grouped"``
    pools train and test and splits them again by patient / lesion (``dpcore.data.regroup``), seeded by `seed`.
    """
    splits = _load(name, data_dir, seed=seed, test_fraction=test_fraction, cache_dir=cache_dir,
                   medmnist_size=medmnist_size)
    if split == "official":
        return splits
    if split != "grouped":
        raise ConfigError("split", f"unknown split {split!r}", "use official or grouped")
    from dpcore.data.regroup import grouped_resplit

    regrouped = grouped_resplit(splits, name, seed=seed)
    if name == "folder":  # two copies with two owner ids may now straddle the split (the loader refuses
        # copies across the official folders)
        from dpcore.data.folder import drop_test_copies

        regrouped = drop_test_copies(regrouped)
    return regrouped


def _load(name: str, data_dir, *, seed: int, test_fraction: float, cache_dir, medmnist_size: int) -> DataSplits:
    if name not in DATASETS:
        raise ConfigError("dataset", f"unknown data set {name!r}", f"use one of {', '.join(DATASETS)}")
    if not 0 < test_fraction < 1:
        raise ConfigError("test_fraction", f"must be in (0, 1), got {test_fraction}", "pass e.g. 0.2")
    if name == "digits":
        from dpcore.data.digits import load_digits_splits
        return load_digits_splits(seed=seed, test_fraction=test_fraction)
    if name == "folder":
        from dpcore.data.folder import load_folder
        return load_folder(data_dir, seed=seed, test_fraction=test_fraction)
    if name == "ham10000":
        from dpcore.data.ham10000 import load_ham10000
        return load_ham10000(data_dir, seed=seed, test_fraction=test_fraction)
    if name in ("pneumoniamnist", "dermamnist"):
        from dpcore.data.medmnist import load_medmnist
        return load_medmnist(name, data_dir, size=medmnist_size, cache_dir=cache_dir)
    from dpcore.data.cifar10 import load_cifar10
    return load_cifar10(cache_dir=cache_dir)
