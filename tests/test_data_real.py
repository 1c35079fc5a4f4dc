"""The loaders on the real data in shared/data (skipped where that folder is absent, e.g. a bare clone)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dpcore.data import load_dataset, materialize

# CI clones the repo with shared/ beside it; DPCORE_SHARED_DATA overrides (as in conftest.py).
DATA = Path(os.environ.get("DPCORE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _need(sub: str) -> Path:
    p = DATA / sub
    if not p.exists():
        pytest.skip(f"real data not present at {p}")
    return p


def resize_to_uint8(size: int):
    def f(img):
        return torch.from_numpy(np.array(img.resize((size, size)))).permute(2, 0, 1).contiguous()
    return f


def test_chest_xray_official_split():
    s = load_dataset("folder", _need("chest_xray"))
    assert s.class_names == ["NORMAL", "PNEUMONIA"]
    assert (len(s.train), len(s.test)) == (5216, 624)
    assert s.split_info["class_counts"]["test"] == {"NORMAL": 234, "PNEUMONIA": 390}
    assert s.split_info["method"] == "official folders" and s.split_info["ignored_files"] == []
    m = materialize(s.test.subset(range(0, 624, 100)), resize_to_uint8(32))
    assert m.images.shape == (7, 3, 32, 32) and not m.skipped


def test_ham10000_all_images_disjoint_lesions():
    s = load_dataset("ham10000", _need("ham10000"), seed=0)
    assert len(s.train) + len(s.test) == 10015
    assert s.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert not {m["lesion_id"] for m in s.train_metadata} & {m["lesion_id"] for m in s.test_metadata}
    assert s.split_info["n_lesions"] == 7470
    assert all(v > 0 for v in s.split_info["class_counts"]["test"].values())
    for i in (0, len(s.test) - 1):
        im = s.test.image(i)
        assert im.mode == "RGB" and im.size == (200, 150)
        assert s.test_metadata[i]["image_id"] in s.test.source(i)


def test_pneumoniamnist_official_sizes():
    s = load_dataset("pneumoniamnist", _need("pneumoniamnist"))
    assert (len(s.train), len(s.val), len(s.test)) == (4708, 524, 624)
    assert s.split_info["class_counts"]["train"] == {"normal": 1214, "pneumonia": 3494}
    assert s.train.image(0).size == (28, 28) and s.train.image(0).mode == "RGB"


def test_fullres_sample_held_out_and_materialized():
    s = load_dataset("folder", _need("chest_xray_fullres_sample"), seed=0, test_fraction=0.25)
    assert (len(s.train), len(s.test)) == (30, 10)
    assert s.split_info["seed"] == 0 and "held-out" in s.split_info["method"]
    assert set(s.test.labels.tolist()) == {0, 1}
    m = materialize(s.test, resize_to_uint8(64))
    assert m.images.shape == (10, 3, 64, 64) and m.kept == list(range(10))
    assert torch.equal(m.images[:, 0], m.images[:, 1])  # grayscale X-rays: identical channels after to_rgb
