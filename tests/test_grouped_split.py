"""``split = "grouped"``: train ∪ test split again by patient / lesion, so that no owner is on both sides
(the chest X-ray set's official split is not patient-disjoint). A first part of the patient-level DP issue."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.data.groups import groups_of
from dpcore.data.regroup import group_overlap
from dpcore.errors import ConfigError, DataError

SHARED_CHEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def _kermany(root: Path) -> Path:
    """30 patients, several images each, some of them in both official folders (as in the real set)."""
    for p in range(1, 31):
        cls = "PNEUMONIA" if p % 2 else "NORMAL"
        for i in range(1 + p % 3):
            name = f"person{p}_virus_{i}.png" if cls == "PNEUMONIA" else f"IM-{p:04d}-{i:04d}.png"
            _png(root / "train" / cls / name)
        if p % 5 == 0 or p % 5 == 1:  # these patients also have a test image
            name = f"person{p}_virus_9.png" if cls == "PNEUMONIA" else f"IM-{p:04d}-0009.png"
            _png(root / "test" / cls / name)
    return root


def _owners(images, metadata):
    return set(groups_of(images, metadata, "folder").ids)


def test_grouped_split_puts_no_patient_on_both_sides(tmp_path):
    root = _kermany(tmp_path / "xr")
    official = load_dataset("folder", root)
    assert group_overlap(official, "folder")["in_both"] == 12  # the official folders share patients
    g = load_dataset("folder", root, split="grouped", seed=3)
    assert not (_owners(g.train, g.train_metadata) & _owners(g.test, g.test_metadata))
    assert len(g.train) + len(g.test) == len(official.train) + len(official.test)  # nothing dropped
    assert sorted(g.train.paths + g.test.paths) == sorted(official.train.paths + official.test.paths)
    info = g.split_info
    assert info["split"] == "grouped" and info["seed"] == 3 and info["grouped_by"] == "patient"
    assert info["official"]["owners_in_both"]["in_both"] == 12 and group_overlap(g, "folder")["in_both"] == 0
    assert set(info["class_counts"]["test"]) == {"NORMAL", "PNEUMONIA"} and min(info["class_counts"]["test"].values()) > 0
    again = load_dataset("folder", root, split="grouped", seed=3)
    assert again.test.paths == g.test.paths  # the seed fixes it
    other = load_dataset("folder", root, split="grouped", seed=4)
    assert other.test.paths != g.test.paths


def test_a_data_set_without_owners_refuses_the_grouped_split(tmp_path):
    for cls in ("a", "b"):
        for i in range(4):
            _png(tmp_path / "plain" / cls / f"scan{i}.png")
    with pytest.raises(DataError, match="split 'official'"):
        load_dataset("folder", tmp_path / "plain", split="grouped")
    with pytest.raises(ConfigError, match="official or grouped"):
        RunConfig(split="random")


def test_the_cli_and_the_card_carry_the_split(tmp_path, fresh_ledger):
    from dpcore.cli.main import main as cli
    from dpcore.store.runs import RunStore

    root = _kermany(tmp_path / "xr")
    rc = cli(["train", "--runs-dir", str(tmp_path / "runs"), "--dataset", "folder", "--data-dir", str(root),
              "--split", "grouped", "--image-size", "8", "--epochs", "1", "--batch-size", "8",
              "--max-physical-batch-size", "8", "--epsilon", "8", "--quiet"])
    assert rc in (0, None)
    store = RunStore(tmp_path / "runs")
    run_id = store.list_runs()[0].run_id
    card = store.card(run_id)
    assert card["config"]["split"] == "grouped"
    assert card["dataset"]["split"]["method"].startswith("patient-grouped re-split")
    assert card["dataset"]["split"]["official"]["owners_in_both"]["in_both"] == 12


@pytest.mark.skipif(not SHARED_CHEST.is_dir(), reason="../shared/data/chest_xray is absent")
def test_the_real_official_chest_xray_split_shares_patients():
    official = load_dataset("folder", SHARED_CHEST)
    overlap = group_overlap(official, "folder")
    assert overlap["in_both"] == 170  # of 427 test patients by file name
    g = load_dataset("folder", SHARED_CHEST, split="grouped", seed=0)
    assert group_overlap(g, "folder")["in_both"] == 0
    assert len(g.train) + len(g.test) == 5840
