"""HAM10000 dermatoscopy: metadata CSV + images, split grouped by lesion.

7470 lesions have 10015 images; a random image split would put photos of the same lesion on both
sides and inflate test accuracy, so the split is grouped by lesion_id (and stratified by dx).
"""
from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dpcore.errors import DataError
from dpcore.data.base import DataSplits
from dpcore.data.folder import check_data_dir, is_image_file
from dpcore.data.images import PathImageList
from dpcore.data.split import finish

METADATA_FILE = "HAM10000_metadata.csv"
IMAGE_FOLDERS = ("images", ".", "HAM10000_images_part_1", "HAM10000_images_part_2",
                 "ham10000_images_part_1", "ham10000_images_part_2")  # Kaggle ships both spellings
COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
PRIVACY_UNIT = ("image (one dermatoscopic image; a lesion can have several images and a patient several lesions, "
                "so the guarantee for a whole lesion or patient is weaker, by group privacy)")


def _read_metadata(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} lacks column(s) {missing}; expected the official HAM10000 columns {list(COLUMNS)}")
        rows = [{k: (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not rows:
        raise DataError(f"{path} has no rows")
    dup = sorted(i for i, k in Counter(r["image_id"] for r in rows).items() if k > 1)
    if dup:
        raise DataError(f"{path} lists image_id(s) more than once: {dup[:10]}. Fix: use the official metadata file")
    return rows


def _find_images(root: Path) -> tuple[dict[str, str], list[str]]:
    """{image_id: path} from every folder Kaggle/ISIC releases use; the folders searched, for the error message."""
    found: dict[str, str] = {}
    searched = []
    for name in IMAGE_FOLDERS:
        d = root / name
        if not d.is_dir():
            continue
        searched.append(str(d))
        for e in os.scandir(d):
            if is_image_file(e.name) and not e.name.startswith("."):
                found.setdefault(os.path.splitext(e.name)[0], e.path)
    return found, searched


def _age(v: str) -> float | None:
    try:
        a = float(v)
    except ValueError:
        return None
    return None if np.isnan(a) else a


def _meta(r: dict[str, str]) -> dict[str, Any]:
    return {"lesion_id": r["lesion_id"], "image_id": r["image_id"], "sex": r["sex"] or None, "age": _age(r["age"]),
            "localization": r["localization"] or None, "dx_type": r["dx_type"] or None}


def grouped_split(y: np.ndarray, groups: list[str], test_fraction: float, seed: int):
    """First fold of a StratifiedGroupKFold with k = round(1/test_fraction): test ≈ test_fraction of images."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = max(2, int(round(1 / test_fraction)))
    if len(set(groups)) < k:
        raise DataError(f"only {len(set(groups))} lesions: too few for a lesion-grouped split with test_fraction "
                        f"{test_fraction}. Fix: use more data or a larger test_fraction")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        tr, te = next(iter(cv.split(np.zeros(len(y)), y, groups)))
    return np.sort(tr), np.sort(te), k, [str(w.message) for w in caught]


def load_ham10000(data_dir, *, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    root = check_data_dir(data_dir, "ham10000")
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise DataError(f"{root} has no {METADATA_FILE}. Fix: put the official metadata file there, with the "
                        f"images in {root}/images/ (or Kaggle's HAM10000_images_part_1/part_2 folders)")
    rows = _read_metadata(meta_path)
    found, searched = _find_images(root)
    missing = [r["image_id"] for r in rows if r["image_id"] not in found]
    if missing:
        raise DataError(f"{len(missing)} of {len(rows)} images listed in {meta_path.name} were not found "
                        f"(searched {', '.join(searched) or 'no image folder found'}): "
                        f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}. "
                        "Fix: add the missing image files, or remove their rows from the metadata file")
    listed = {r["image_id"] for r in rows}
    extra = sorted(i for i in found if i not in listed)

    class_names = sorted({r["dx"] for r in rows})
    y = np.array([class_names.index(r["dx"]) for r in rows], dtype=np.int64)
    groups = [r["lesion_id"] or f"(no lesion_id) {r['image_id']}" for r in rows]
    tr, te, k, notes = grouped_split(y, groups, test_fraction, seed)
    full = PathImageList([found[r["image_id"]] for r in rows], y)
    info: dict[str, Any] = {
        "method": f"stratified by dx, grouped by lesion_id (StratifiedGroupKFold, {k} folds, fold 0 = test), "
                  f"seed={seed}",
        "seed": seed, "test_fraction": test_fraction, "actual_test_fraction": round(len(te) / len(rows), 4),
        "grouped_by": "lesion_id", "n_lesions": len(set(groups)),
        "n_lesions_train": len({groups[i] for i in tr}), "n_lesions_test": len({groups[i] for i in te}),
        "root": str(root), "metadata_file": str(meta_path),
    }
    if notes:
        info["split_warnings"] = notes
    if extra:
        info["images_without_metadata"] = extra
        warnings.warn(f"{len(extra)} image file(s) under {root} have no row in {METADATA_FILE} and were not used "
                      f"(e.g. {', '.join(extra[:5])}); listed in split_info['images_without_metadata']", stacklevel=3)
    return finish(DataSplits(
        name="ham10000", class_names=class_names, train=full.subset(tr), test=full.subset(te),
        train_metadata=[_meta(rows[i]) for i in tr], test_metadata=[_meta(rows[i]) for i in te],
        split_info=info, privacy_unit=PRIVACY_UNIT,
    ))
