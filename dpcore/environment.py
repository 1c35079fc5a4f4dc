"""What this machine has: device, library versions, which data sets and pretrained weights are local.

Answers come from the local disk only (no network), so the app can show at once what will work
offline and, for what is missing, where to put it.
"""
from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "DPCORE_DATA_DIR"

# known local folders under a data root, per registered data set (relative path, what it is)
LOCAL_DATA = {
    "folder": ("chest_xray", "the Kaggle “Chest X-Ray Images (Pneumonia)” ImageFolder (train/ and test/)"),
    "ham10000": ("ham10000", "HAM10000_metadata.csv plus the images"),
    "pneumoniamnist": ("pneumoniamnist/pneumoniamnist.npz", "the MedMNIST pneumoniamnist.npz (28×28)"),
    "dermamnist": ("dermamnist/dermamnist.npz", "the MedMNIST dermamnist.npz (28×28)"),
}


def _version(lib: str) -> str | None:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict[str, Any]:
    """Device training would use ("auto"), GPU name, versions of the libraries that matter, CPU cores."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,  # > 1: a run can be spread over them (torchrun)
        "torch": _version("torch"),
        "opacus": _version("opacus"),
        "timm": _version("timm"),
        "cpu_count": os.cpu_count(),
    }


def default_data_root() -> Path | None:
    """$DPCORE_DATA_DIR if set, else `<repo>/../shared/data` if it exists, else None."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    shared = (REPO_ROOT.parent / "shared" / "data").resolve()
    return shared if shared.is_dir() else None


def expected_data_root(data_root: Path | None = None) -> Path:
    """Where data sets are looked for and should be put: the given root, the default, or <repo>/../shared/data."""
    if data_root is not None:
        return Path(data_root).expanduser()
    return default_data_root() or (REPO_ROOT.parent / "shared" / "data").resolve()


def _medmnist_row(name: str, root: Path | None) -> dict[str, Any]:
    from dpcore.data.medmnist import DEFAULT_CACHE, ZENODO_URL, npz_name

    file = npz_name(name, 28)
    if root is not None and (root / LOCAL_DATA[name][0]).is_file():
        path = root / LOCAL_DATA[name][0]
        return {"name": name, "available": True, "path": str(path),
                "note": f"found at {path} (pass --data-dir {path})"}
    cached = DEFAULT_CACHE.expanduser() / file
    if cached.is_file():
        return {"name": name, "available": True, "path": str(cached), "note": f"found in the cache at {cached}"}
    return {"name": name, "available": False, "path": None,
            "note": f"MedMNIST npz not in cache: {file} is downloaded from {ZENODO_URL.format(file=file)} on "
                    f"first use (needs internet); offline, put it at {cached}"
                    + (f" or {root / LOCAL_DATA[name][0]}" if root is not None else "")}


def dataset_availability(data_root: Path | None = None) -> list[dict[str, Any]]:
    """One row per registered data set: name, available, path (to pass as data_dir) and a plain note."""
    from dpcore.data import DATASETS

    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    rows = []
    for name in DATASETS:
        if name == "digits":
            rows.append({"name": name, "available": True, "path": None, "note": "bundled with scikit-learn"})
        elif name in ("pneumoniamnist", "dermamnist"):
            rows.append(_medmnist_row(name, root))
        elif name == "cifar10":
            from dpcore.data.cifar10 import DEFAULT_CACHE, URL

            folder = DEFAULT_CACHE.expanduser() / "cifar-10-batches-py"
            ok = folder.is_dir()
            rows.append({"name": name, "available": ok, "path": str(folder.parent) if ok else None,
                         "note": f"found in the cache at {folder}" if ok else
                         f"not in the cache: downloaded from {URL} on first use (needs internet); "
                         f"offline, unpack it so that {folder} exists"})
        elif name in LOCAL_DATA:
            rel, what = LOCAL_DATA[name]
            where = expected_data_root(root) / rel
            ok = where.is_dir() and (name != "ham10000" or (where / "HAM10000_metadata.csv").is_file())
            rows.append({"name": name, "available": ok, "path": str(where) if ok else None,
                         "note": f"found at {where}" if ok else
                         f"needs --data-dir: put {what} at {where}, or pass any folder in that layout"})
        else:  # a data set registered later without a known local place
            rows.append({"name": name, "available": False, "path": None,
                         "note": "no known local copy; see `python -m dpcore datasets`"})
    return rows


def _hub_cached(timm_name: str) -> bool:
    """Is the timm checkpoint in the local Hugging Face cache? Looks at files on disk only."""
    from models.weight_sources import hub_file

    return hub_file(timm_name) is not None


def weights_cached(backbone: str) -> bool:
    """Whether `pretrained="hub"` for this registered backbone would work offline."""
    from models import get_spec

    spec = get_spec(backbone)
    return spec.timm_name is not None and _hub_cached(spec.timm_name)


def cached_weights() -> list[dict[str, Any]]:
    """One row per registered backbone with hub weights: backbone, timm_name, cached (bool)."""
    from models import get_spec, list_models

    rows = []
    for name in list_models():
        spec = get_spec(name)
        if spec.timm_name is None:  # tiny_cnn: no pretrained weights exist
            continue
        rows.append({"backbone": name, "timm_name": spec.timm_name, "cached": _hub_cached(spec.timm_name)})
    return rows


def pretrained_sources() -> list[dict[str, Any]]:
    """Every offline source of pretrained weights per backbone, for the Home page: the local hub cache, the
    bundled package, the ``$DPCORE_WEIGHTS_DIR`` folder. One row per backbone that has pretrained weights:
    backbone, hub_cached, bundled (package name or None), weights_dir (file name or None), ready (bool:
    ``pretrained="default"`` works offline)."""
    from models import get_spec, list_models
    from models.weight_sources import bundled_available, hub_cached, list_weights_dir

    folder = {r["backbone"]: r["file"] for r in list_weights_dir() if r["backbone"] and r["fits"]}
    rows = []
    for name in list_models():
        spec = get_spec(name)
        if spec.timm_name is None:
            continue
        bundled = spec.bundled if bundled_available(spec) else None
        cached = hub_cached(spec) is not None
        rows.append({"backbone": name, "hub_cached": cached, "bundled": bundled, "weights_dir": folder.get(name),
                     "ready": bool(cached or bundled or folder.get(name))})
    rows.sort(key=lambda r: (not r["ready"], r["backbone"]))
    return rows

