"""MedMNIST .npz files (PneumoniaMNIST, DermaMNIST) with their official train/val/test splits.

Files are looked up in --data-dir, then in the cache, and downloaded once from MedMNIST's Zenodo
record only when missing; without network the error says exactly which file to put where.
"""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import numpy as np

from dpcore.errors import ConfigError, DataError, OfflineError
from dpcore.data.base import DataSplits
from dpcore.data.images import ArrayImageList
from dpcore.data.split import finish

SIZES = (28, 64, 128, 224)
ZENODO_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
DEFAULT_CACHE = Path("~/.cache/dpcore/medmnist")
DOWNLOAD_TIMEOUT_S = 15
CLASS_NAMES = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
}


def npz_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch url to dest atomically (a .part file renamed at the end), so a broken download never looks complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_npz(flag: str, size: int, data_dir=None, cache_dir=None) -> tuple[Path, bool]:
    """(path of the npz, whether it was downloaded now)."""
    file = npz_name(flag, size)
    if data_dir:
        p = Path(data_dir).expanduser()
        if not p.exists():
            raise ConfigError("data_dir", f"{p} does not exist", f"pass the {file} file or the folder holding it")
        if p.is_file():
            return p, False
        if (p / file).is_file():
            return p / file, False
        raise DataError(f"{p} has no {file} (MedMNIST {flag} at {size}x{size}). "
                        f"Fix: put {file} there, pass the .npz file itself, or leave out --data-dir to use the cache")
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE.expanduser()
    if (cache / file).is_file():
        return cache / file, False
    url = ZENODO_URL.format(file=file)
    try:
        download(url, cache / file)
    except Exception as e:
        raise OfflineError(
            f"{file} is not in the cache and could not be downloaded from {url} ({type(e).__name__}: {e}). "
            f"Fix: on a machine with internet, download that URL and place the file at {cache / file}, "
            f"or pass --data-dir pointing to {file} or the folder holding it") from e
    return cache / file, True


def load_medmnist(flag: str, data_dir=None, *, size: int = 28, cache_dir=None) -> DataSplits:
    if size not in SIZES:
        raise ConfigError("medmnist_size", f"MedMNIST comes in sizes {SIZES}, got {size}", "pick one of those sizes")
    path, downloaded = resolve_npz(flag, size, data_dir, cache_dir)
    names = CLASS_NAMES[flag]
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}). "
                        f"Fix: download {npz_name(flag, size)} again") from e
    with npz:
        need = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
        missing = [k for k in need if k not in npz.files]
        if missing:
            raise DataError(f"{path} lacks the MedMNIST array(s) {missing} (it has {npz.files}). "
                            f"Fix: use the official {npz_name(flag, size)}")
        parts = {s: _part(npz, s, path, flag, size, len(names)) for s in ("train", "val", "test")}
    info = {"method": "official MedMNIST train/val/test split", "file": str(path), "size": size,
            "downloaded": downloaded}
    return finish(DataSplits(
        name=flag, class_names=list(names), train=parts["train"], test=parts["test"], val=parts["val"],
        train_metadata=[{} for _ in range(len(parts["train"]))], test_metadata=[{} for _ in range(len(parts["test"]))],
        val_metadata=[{} for _ in range(len(parts["val"]))], split_info=info,
    ))


def _part(npz, split: str, path: Path, flag: str, size: int, n_classes: int) -> ArrayImageList:
    x, y = npz[f"{split}_images"], np.asarray(npz[f"{split}_labels"]).reshape(-1)
    if x.ndim >= 3 and x.shape[1:3] != (size, size):
        raise DataError(f"{path} holds {x.shape[1]}x{x.shape[2]} images but medmnist_size={size}. "
                        f"Fix: pass --medmnist-size {x.shape[1]}, or the file {npz_name(flag, size)}")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise DataError(f"{path}: {split} labels range {y.min()}..{y.max()}, but {flag} has {n_classes} classes. "
                        f"Fix: check that this is the {flag} file")
    return ArrayImageList(x, y.astype(np.int64), f"{path.name}:{split}")
