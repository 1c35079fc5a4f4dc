"""Loaders on small generated data: folder layouts, HAM10000, MedMNIST, digits, and the registry."""
from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
from PIL import Image

from dpcore.data import DATASETS, list_datasets, load_dataset
from dpcore.data import medmnist as medmnist_mod
from dpcore.errors import ConfigError, DataError, OfflineError


def _img(path, value=100, mode="RGB", size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)


def _classes(root, counts: dict[str, int], ext="png"):
    for c, n in counts.items():
        for i in range(n):
            _img(root / c / f"{c}_{i:03d}.{ext}", value=10 * i % 256)


# -- registry -----------------------------------------------------------------------------------
def test_registry_lists_and_rejects_unknown():
    assert list_datasets() == list(DATASETS)
    assert {"digits", "folder", "ham10000", "pneumoniamnist", "dermamnist", "cifar10"} <= set(list_datasets())
    assert DATASETS["folder"].needs_data_dir and not DATASETS["digits"].needs_data_dir
    assert DATASETS["cifar10"].downloads
    with pytest.raises(ConfigError, match="digits") as e:
        load_dataset("mnist")
    assert e.value.field == "dataset"


# -- digits -------------------------------------------------------------------------------------
def test_digits_split_sizes_and_stratification():
    s = load_dataset("digits", seed=3, test_fraction=0.25)
    assert s.class_names == [str(i) for i in range(10)]
    assert len(s.train) + len(s.test) == 1797 and len(s.test) == int(np.ceil(0.25 * 1797))
    assert s.split_info["seed"] == 3 and s.split_info["test_fraction"] == 0.25
    assert "stratified" in s.split_info["method"]
    frac = np.bincount(s.test.labels, minlength=10) / np.bincount(
        np.concatenate([s.train.labels, s.test.labels]), minlength=10)
    assert np.all(np.abs(frac - 0.25) < 0.02)
    im = s.train.image(0)
    assert im.mode == "RGB" and im.size == (8, 8) and np.asarray(im).max() == 255  # 16 scaled to 255
    again = load_dataset("digits", seed=3, test_fraction=0.25)
    assert np.array_equal(again.test.labels, s.test.labels)
    assert not np.array_equal(load_dataset("digits", seed=4, test_fraction=0.25).test.index, s.test.index)


# -- folder -------------------------------------------------------------------------------------
def test_folder_official_split_with_val_and_ignored_files(tmp_path):
    _classes(tmp_path / "train", {"NORMAL": 4, "PNEUMONIA": 6}, "jpeg")
    _classes(tmp_path / "test", {"NORMAL": 2, "PNEUMONIA": 3})
    _classes(tmp_path / "val", {"NORMAL": 1, "PNEUMONIA": 1}, "JPG")
    (tmp_path / "train" / "NORMAL" / "notes.txt").write_text("x")
    (tmp_path / "train" / "NORMAL" / ".DS_Store").write_text("x")  # hidden: ignored quietly
    (tmp_path / "README.md").write_text("x")
    with pytest.warns(UserWarning, match="notes.txt"):
        s = load_dataset("folder", tmp_path)
    assert s.class_names == ["NORMAL", "PNEUMONIA"]
    assert (len(s.train), len(s.test), len(s.val)) == (10, 5, 2)
    assert s.train.labels.tolist() == [0] * 4 + [1] * 6
    assert s.split_info["method"] == "official folders"
    assert s.split_info["ignored_files"] == ["train/NORMAL/notes.txt"] and s.split_info["n_ignored_files"] == 1
    assert s.split_info["root_files_not_read"] == ["README.md"]
    assert len(s.val_metadata) == 2 and s.test.image(0).mode == "RGB"


def test_folder_only_class_folders_gets_stratified_split(tmp_path):
    _classes(tmp_path, {"a": 10, "b": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about here
        s = load_dataset("folder", tmp_path, seed=7, test_fraction=0.2)
    assert s.split_info["seed"] == 7 and s.split_info["test_fraction"] == 0.2
    assert "stratified held-out" in s.split_info["method"] and "seed=7" in s.split_info["method"]
    assert set(s.test.labels.tolist()) == {0, 1} and len(s.test) == 3
    assert not set(s.train.paths) & set(s.test.paths)


def test_folder_only_train_gets_held_out_split(tmp_path):
    _classes(tmp_path / "train", {"x": 6, "y": 6})
    s = load_dataset("folder", tmp_path, seed=1, test_fraction=0.5)
    assert (len(s.train), len(s.test)) == (6, 6) and "from train/" in s.split_info["method"]
    assert s.val is None


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="data_dir"):
        load_dataset("folder", None)
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset("folder", tmp_path / "nope")
    _classes(tmp_path / "t1" / "train", {"a": 2, "b": 2})
    _classes(tmp_path / "t1" / "test", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"\['c'\]"):  # test class unknown to train
        load_dataset("folder", tmp_path / "t1")
    _classes(tmp_path / "t2", {"a": 2, "b": 2})
    (tmp_path / "t2" / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dataset("folder", tmp_path / "t2")
    _classes(tmp_path / "t3" / "inner" / "train", {"a": 2, "b": 2})  # a zip unpacked one level deeper
    with pytest.raises(ConfigError, match="inner"):
        load_dataset("folder", tmp_path / "t3")
    _classes(tmp_path / "t4", {"a": 1, "b": 3})
    with pytest.raises(DataError, match="single image"):
        load_dataset("folder", tmp_path / "t4")


# -- HAM10000 -----------------------------------------------------------------------------------
def _ham(root, n_lesions=30, images_dir="images"):
    rng = np.random.default_rng(0)
    dxs = ["nv", "mel", "bkl"]
    rows, k = [], 0
    for les in range(n_lesions):
        dx = dxs[les % 3]
        for _ in range(1 + les % 3):  # 1-3 images per lesion
            iid = f"ISIC_{k:07d}"
            _img(root / images_dir / f"{iid}.jpg", value=int(rng.integers(0, 255)), size=(20, 15))
            rows.append({"lesion_id": f"HAM_{les:07d}", "image_id": iid, "dx": dx, "dx_type": "histo",
                         "age": "" if k == 0 else str(30 + les), "sex": "female" if les % 2 else "male",
                         "localization": "back"})
            k += 1
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def test_ham10000_grouped_by_lesion_with_metadata(tmp_path):
    rows = _ham(tmp_path)
    s = load_dataset("ham10000", tmp_path, seed=0, test_fraction=0.2)
    assert s.class_names == ["bkl", "mel", "nv"]
    assert len(s.train) + len(s.test) == len(rows)
    tr_les = {m["lesion_id"] for m in s.train_metadata}
    te_les = {m["lesion_id"] for m in s.test_metadata}
    assert tr_les and te_les and not tr_les & te_les
    assert set(s.test.labels.tolist()) == {0, 1, 2}
    by_id = {r["image_id"]: r for r in rows}
    for lst, meta in ((s.train, s.train_metadata), (s.test, s.test_metadata)):
        for i, m in enumerate(meta):
            assert m["image_id"] in lst.source(i)
            assert s.class_names[lst.labels[i]] == by_id[m["image_id"]]["dx"]
            assert set(m) == {"lesion_id", "image_id", "sex", "age", "localization", "dx_type"}
    ages = {m["image_id"]: m["age"] for m in s.train_metadata + s.test_metadata}
    assert ages["ISIC_0000000"] is None and ages["ISIC_0000001"] == 31.0
    assert s.split_info["grouped_by"] == "lesion_id" and s.split_info["seed"] == 0
    assert 0.1 < s.split_info["actual_test_fraction"] < 0.35
    assert s.privacy_unit.startswith("image ") and "lesion" in s.privacy_unit


def test_ham10000_kaggle_folders_and_missing_images(tmp_path):
    rows = _ham(tmp_path, n_lesions=12, images_dir="HAM10000_images_part_1")
    s = load_dataset("ham10000", tmp_path)
    assert len(s.train) + len(s.test) == len(rows)
    (tmp_path / "HAM10000_images_part_1" / "ISIC_0000003.jpg").unlink()
    with pytest.raises(DataError, match="ISIC_0000003"):
        load_dataset("ham10000", tmp_path)


def test_ham10000_needs_metadata(tmp_path):
    with pytest.raises(DataError, match="HAM10000_metadata.csv"):
        load_dataset("ham10000", tmp_path)


# -- MedMNIST -----------------------------------------------------------------------------------
def _npz(path, size=28, n=(6, 2, 3), channels=None):
    rng = np.random.default_rng(0)
    shape = (size, size) if channels is None else (size, size, channels)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(k, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 2).reshape(-1, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_from_file_folder_and_cache(tmp_path):
    arrays = _npz(tmp_path / "d" / "pneumoniamnist.npz")
    for where in (tmp_path / "d", tmp_path / "d" / "pneumoniamnist.npz"):
        s = load_dataset("pneumoniamnist", where)
        assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 3)
        assert s.class_names == ["normal", "pneumonia"]
        assert s.split_info["method"].startswith("official") and not s.split_info["downloaded"]
        im = s.test.image(2)
        assert im.mode == "RGB" and im.size == (28, 28)
        assert np.array_equal(np.asarray(im)[..., 0], arrays["test_images"][2])
        assert s.test.labels.tolist() == [0, 1, 0]
    _npz(tmp_path / "cache" / "dermamnist_64.npz", size=64, channels=3)
    s = load_dataset("dermamnist", cache_dir=tmp_path / "cache", medmnist_size=64)
    assert len(s.class_names) == 7 and s.train.image(0).size == (64, 64)


def test_medmnist_size_mismatch_and_bad_size(tmp_path):
    _npz(tmp_path / "pneumoniamnist.npz")
    with pytest.raises(DataError, match="medmnist-size 28"):
        load_dataset("pneumoniamnist", tmp_path / "pneumoniamnist.npz", medmnist_size=64)
    with pytest.raises(ConfigError, match="medmnist_size"):
        load_dataset("pneumoniamnist", tmp_path, medmnist_size=32)


def test_medmnist_offline_error_names_file_and_place(tmp_path, monkeypatch):
    calls = []

    def no_network(url, dest, timeout=0):
        calls.append((url, dest))
        raise OSError("network is unreachable")

    monkeypatch.setattr(medmnist_mod, "download", no_network)
    cache = tmp_path / "cache"
    with pytest.raises(OfflineError) as e:
        load_dataset("pneumoniamnist", cache_dir=cache, medmnist_size=128)
    msg = str(e.value)
    assert "pneumoniamnist_128.npz" in msg and str(cache / "pneumoniamnist_128.npz") in msg and "--data-dir" in msg
    assert calls[0][0] == "https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1"
    with pytest.raises(DataError, match="pneumoniamnist.npz"):  # an explicit folder without the file: no download
        load_dataset("pneumoniamnist", tmp_path)
    assert len(calls) == 1


def test_medmnist_download_goes_to_cache(tmp_path, monkeypatch):
    def fake_download(url, dest, timeout=0):
        _npz(dest)

    monkeypatch.setattr(medmnist_mod, "download", fake_download)
    s = load_dataset("pneumoniamnist", cache_dir=tmp_path)
    assert s.split_info["downloaded"] and (tmp_path / "pneumoniamnist.npz").is_file()
    assert not load_dataset("pneumoniamnist", cache_dir=tmp_path).split_info["downloaded"]  # once only


# -- CIFAR-10 -----------------------------------------------------------------------------------
def test_cifar10_offline_error(tmp_path, monkeypatch):
    import torchvision.datasets

    class NoNetworkCIFAR10:
        def __init__(self, root, train=True, download=False):
            if not download:
                raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
            raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoNetworkCIFAR10)
    with pytest.raises(OfflineError, match="cifar-10-batches-py"):
        load_dataset("cifar10", cache_dir=tmp_path)
