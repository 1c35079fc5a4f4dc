"""A data set's human name, for every place a run is named ("Trained on: folder" means nothing to a clinician).

From a data-set card in the data folder when there is one — the first heading of DATASET.md, PROVENANCE.md or
README.md, e.g. "# chest_xray — Pediatric pneumonia chest X-rays (Kermany et al. 2018), full official …" gives
"Pediatric pneumonia chest X-rays (Kermany et al. 2018)" —, else the registered data set's own name, else the
folder's name.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

CARD_FILES = ("DATASET.md", "PROVENANCE.md", "README.md")
BUILT_IN = {"digits": "Handwritten digits (scikit-learn, demo)", "cifar10": "CIFAR-10 natural images (demo)",
            "pneumoniamnist": "PneumoniaMNIST chest X-rays (MedMNIST)", "dermamnist": "DermaMNIST skin lesions (MedMNIST)",
            "ham10000": "HAM10000 dermatoscopic images (Tschandl et al. 2018)"}


@lru_cache(maxsize=64)
def _card_title(data_dir: str) -> str | None:
    for name in CARD_FILES:
        path = Path(data_dir) / name
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                first = next((line.strip() for line in f if line.strip()), "")
        except OSError:
            continue
        if not first.startswith("#"):
            continue
        title = first.lstrip("#").strip()
        title = re.split(r"\s+[—–-]\s+", title, maxsplit=1)[-1]  # "name — Title" → "Title"
        title = re.split(r",\s", title, maxsplit=1)[0].strip()  # the rest is detail (split, size)
        if title:
            return title[:100]
    return None


def dataset_title(dataset: str, data_dir: str | None = None) -> str:
    if data_dir:
        found = _card_title(str(data_dir))
        if found:
            return found
    if dataset in BUILT_IN:
        return BUILT_IN[dataset]
    return Path(data_dir).name if data_dir else dataset
