"""Who owns each image (dpcore/data/groups.py) and what image-level DP promises that owner (group_privacy.py)."""
from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpcore.data import ArrayImageList, DataSplits, load_dataset
from dpcore.data.groups import KERMANY_SOURCE, GroupInfo, groups_of, kermany_patient_id, train_groups
from dpcore.privacy.group_privacy import group_guarantee, group_sentence, group_summary, is_meaningful

# Every name shape in shared/data/chest_xray/{train,test}/{NORMAL,PNEUMONIA}, as literal real names.
REAL_NAMES = {
    "person1_bacteria_1.jpeg": "person1",  # 1-digit person, 1-digit image
    "person10_bacteria_30.jpeg": "person10",
    "person23_bacteria_100.jpeg": "person23",
    "person1000_bacteria_2931.jpeg": "person1000",
    "person1_virus_6.jpeg": "person1",  # test; the same N as bacteria is one patient
    "person1000_virus_1681.jpeg": "person1000",
    "person447_virus_921_1.jpeg": "person447",  # the single name with a fourth field
    "IM-0001-0001.jpeg": "IM-0001",
    "IM-0429-0001-0002.jpeg": "IM-0429",  # several images of one visit
    "NORMAL2-IM-0007-0001.jpeg": "NORMAL2-IM-0007",
    "NORMAL2-IM-0651-0004.jpeg": "NORMAL2-IM-0651",  # the only MMMM other than 0001
    "NORMAL2-IM-0173-0001-0002.jpeg": "NORMAL2-IM-0173",
}


@pytest.mark.parametrize("name,expected", REAL_NAMES.items())
def test_kermany_rule_on_every_real_name_shape(name, expected):
    assert kermany_patient_id(name) == expected
    assert kermany_patient_id(f"/data/chest_xray/train/X/{name}") == expected  # a path works too
    assert kermany_patient_id(name.upper().replace(".JPEG", ".jpeg")) == expected  # case is ignored


def test_kermany_rule_keeps_batches_apart_and_ignores_other_names():
    assert kermany_patient_id("IM-0500-0001.jpeg") != kermany_patient_id("NORMAL2-IM-0500-0001.jpeg")
    assert kermany_patient_id("C:\\x\\IM-0500-0001.png") == "IM-0500"
    for other in ["ISIC_0027419.jpg", "person1_fungus_1.jpeg", "person_bacteria_1.jpeg", "IM-0001.jpeg",
                  "NORMAL3-IM-0001-0001.jpeg", "person1_bacteria_1 (1).jpeg", "scan.png", "", "images[3]"]:
        assert kermany_patient_id(other) is None, other


def test_groupinfo_counts_unknown_ids_as_groups_of_one():
    g = GroupInfo("patient", "test", ["a", "a", "a", "b", None, None])
    assert g.sizes() == {"a": 3, "b": 1} and g.largest == 3 and g.largest_id == "a"
    assert g.n_groups == 4 and g.n_unknown == 2 and g.coverage == pytest.approx(4 / 6)
    assert g.size_histogram() == {1: 3, 3: 1}
    assert g.group_index() == [0, 0, 0, 1, 2, 3]
    only_unknown = GroupInfo("lesion", "test", [None, None])
    assert (only_unknown.largest, only_unknown.n_groups, only_unknown.coverage) == (1, 2, 0.0)
    assert GroupInfo("patient", "t", ["a", "b"]).shared_with(GroupInfo("patient", "t", ["b", None])) == {"b"}


def test_groupinfo_refuses_bad_input():
    with pytest.raises(ValueError, match="unit"):
        GroupInfo("hospital", "x", ["a"])
    with pytest.raises(ValueError, match="non-empty strings"):
        GroupInfo("patient", "x", ["a", ""])
    with pytest.raises(ValueError, match="source"):
        GroupInfo("patient", "", ["a"])


def _arrays(n: int) -> ArrayImageList:
    return ArrayImageList(np.zeros((n, 4, 4, 3), np.uint8), np.arange(n) % 2, "toy")


def _splits(train_meta: list[dict], name: str = "toy") -> DataSplits:
    n = len(train_meta)
    return DataSplits(name=name, class_names=["a", "b"], train=_arrays(n), test=_arrays(2),
                      train_metadata=train_meta, test_metadata=[{}, {}])


def test_ham10000_style_lesion_ids():
    meta = [{"lesion_id": "HAM_1", "image_id": "ISIC_1"}, {"lesion_id": "HAM_1", "image_id": "ISIC_2"},
            {"lesion_id": "HAM_2", "image_id": "ISIC_3"}, {"lesion_id": "", "image_id": "ISIC_4"}]
    g = train_groups(_splits(meta, "ham10000"), "ham10000")
    assert g.unit == "lesion" and g.source == "lesion_id column of HAM10000_metadata.csv"
    assert g.ids == ["HAM_1", "HAM_1", "HAM_2", None] and g.largest == 2 and g.coverage == 0.75


def test_no_grouping_gives_none():
    assert train_groups(_splits([{}, {}, {}]), "digits") is None
    assert train_groups(_splits([{"sex": "f"}, {"sex": "m"}]), "folder") is None
    assert train_groups(_splits([{"patient_id": None}, {"patient_id": None}]), "folder") is None
    with pytest.raises(ValueError, match="3 images but 2 metadata rows"):
        groups_of(_arrays(3), [{}, {}], "toy")


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def _folder(root: Path, names: dict[str, list[str]]) -> Path:
    for rel_dir, files in names.items():
        for f in files:
            _png(root / rel_dir / f)
    return root


def test_metadata_csv_patient_id_wins_over_file_names(tmp_path):
    root = _folder(tmp_path, {"train/NORMAL": ["IM-0001-0001.png", "IM-0002-0001.png"],
                              "train/PNEUMONIA": ["person1_virus_1.png", "person2_virus_2.png"],
                              "test/NORMAL": ["IM-0009-0001.png"], "test/PNEUMONIA": ["person9_virus_9.png"]})
    rows = [("train/NORMAL/IM-0001-0001.png", "17"), ("train/NORMAL/IM-0002-0001.png", "17"),
            ("train/PNEUMONIA/person1_virus_1.png", "18"), ("train/PNEUMONIA/person2_virus_2.png", ""),
            ("test/NORMAL/IM-0009-0001.png", "17"), ("test/PNEUMONIA/person9_virus_9.png", "19")]
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "sex"])
        w.writerows([(p, pid, "f") for p, pid in rows])
    s = load_dataset("folder", root)
    g = train_groups(s, "folder")
    assert g.unit == "patient" and g.source == "patient_id column of metadata.csv"
    assert g.ids == ["17", "17", "18", None]  # numbers read as 17.0 by folder.py come back as "17"
    assert g.largest == 2 and g.coverage == 0.75
    test = groups_of(s.test, s.test_metadata, "folder")
    assert test.ids == ["17", "19"] and g.shared_with(test) == {"17"}


def test_kermany_names_in_a_folder_and_the_90_percent_threshold(tmp_path):
    kermany = [f"person{i // 3}_bacteria_{i}.png" for i in range(9)]
    root = _folder(tmp_path / "a", {"train/NORMAL": ["IM-0001-0001.png"], "train/PNEUMONIA": kermany,
                                    "test/NORMAL": ["IM-0002-0001.png"], "test/PNEUMONIA": ["x.png"]})
    g = train_groups(load_dataset("folder", root), "folder")
    assert g.source == KERMANY_SOURCE and g.largest == 3 and g.coverage == 1.0
    root = _folder(tmp_path / "b", {"train/NORMAL": ["scan1.png"], "train/PNEUMONIA": kermany,
                                    "test/NORMAL": ["a.png"], "test/PNEUMONIA": ["b.png"]})
    s = load_dataset("folder", root)
    g = train_groups(s, "folder")  # 9 of 10 names match: exactly at the threshold
    assert g.coverage == 0.9 and g.ids[0] is None and g.n_groups == 4
    assert groups_of(s.test, s.test_metadata, "folder") is None  # 0 of 2 names match
    root = _folder(tmp_path / "c", {"train/NORMAL": ["scan1.png", "scan2.png"], "train/PNEUMONIA": kermany[:8],
                                    "test/NORMAL": ["a.png"], "test/PNEUMONIA": ["b.png"]})
    assert train_groups(load_dataset("folder", root), "folder") is None  # 8 of 10: below it


def test_group_guarantee_values():
    assert group_guarantee(1.0, 1e-5, 1) == (1.0, 1e-5)  # k = 1 is the identity
    eps, delta = group_guarantee(1.0, 1e-5, 2)
    assert eps == 2.0 and delta == pytest.approx(2 * math.e * 1e-5)
    eps, delta = group_guarantee(1.0, 1e-5, 30)
    assert eps == 30.0 and delta == pytest.approx(30 * math.exp(29) * 1e-5) and delta > 1
    assert not is_meaningful(eps, delta)  # δ_k > 1 is flagged, not clipped
    assert group_guarantee(1.0, 1e-5, 2000) == (2000.0, math.inf)  # e^1999 would overflow: inf, no exception
    assert group_guarantee(800.0, 1e-300, 2)[1] == pytest.approx(2 * math.exp(800 + math.log(1e-300)))
    assert group_guarantee(2.0, 0.0, 30) == (60.0, 0.0)  # pure DP stays pure
    assert group_guarantee(math.inf, 1e-5, 3) == (math.inf, math.inf)
    assert is_meaningful(*group_guarantee(0.1, 1e-6, 6))
    for bad in [(1.0, 1e-5, 0), (1.0, 1e-5, 2.0), (-1.0, 1e-5, 2), (1.0, math.nan, 2), (1.0, 1e-5, True)]:
        with pytest.raises(ValueError):
            group_guarantee(*bad)


def test_sentence_names_unit_k_source_and_verdict():
    g = GroupInfo("patient", KERMANY_SOURCE, ["p"] * 30 + ["q"])
    s = group_sentence(1.0, 1e-5, g)
    assert "largest patient" in s and "(30 images)" in s and "ε = 30" in s and "no guarantee at all" in s
    assert "δ above 1" in s and "Kermany file names" in s and "no known" not in s
    ok = group_sentence(0.01, 1e-6, g)
    assert "ε = 0.3" in ok and "no guarantee" not in ok
    lesion = group_sentence(1.0, 1e-5, GroupInfo("lesion", "lesion_id column of HAM10000_metadata.csv",
                                                 ["a", "a", None]))
    assert "largest lesion" in lesion and "(2 images)" in lesion and "several lesions" in lesion
    assert "1 of 3 images" in lesion and "no known lesion id" in lesion


def test_sentence_for_one_image_per_group():
    s = group_sentence(2.0, 1e-5, GroupInfo("patient", "patient_id column of metadata.csv", ["a", "b"]))
    assert s.startswith("Every patient") and "exactly one image" in s and "also the guarantee" in s
    assert "ε = 2" in s and "metadata.csv" in s
    s = group_sentence(2.0, 1e-5, GroupInfo("patient", "patient_id column of metadata.csv", ["a", None]))
    assert s.startswith("As far as known") and "1 of 2 images" in s


def test_summary_is_json_ready():
    g = GroupInfo("patient", KERMANY_SOURCE, ["p"] * 2000)
    d = group_summary(1.0, 1e-5, g)
    json.dumps(d, allow_nan=False)  # inf would not be valid JSON
    assert d["group_epsilon"] == 2000.0 and d["group_delta"] is None and d["delta_above_1"]
    assert d["meaningful"] is False and d["largest"] == 2000 and d["n_groups"] == 1
    d = group_summary(0.05, 1e-6, GroupInfo("lesion", "x", ["a", "a", "b"]))
    assert d["meaningful"] is True and d["group_epsilon"] == pytest.approx(0.1)
    assert d["size_histogram"] == {"1": 1, "2": 1} and d["sentence"].startswith("Image-level privacy")
    assert set(d) >= {"unit", "source", "coverage", "n_groups", "largest", "group_epsilon", "group_delta",
                      "meaningful", "sentence"}


# --- the real data, loaded as the trainer loads them; figures as documented in dpcore/data/groups.py ---

@functools.lru_cache(maxsize=None)
def _load(name: str, folder: str):
    return load_dataset(name, folder)


def test_real_chest_xray_groups(shared_data):
    s = _load("folder", str(shared_data / "chest_xray"))
    train, test = train_groups(s, "folder"), groups_of(s.test, s.test_metadata, "folder")
    assert train.source == KERMANY_SOURCE and train.unit == "patient"
    assert (train.n_images, train.coverage, train.n_groups) == (5216, 1.0, 2846)
    assert (train.largest, train.largest_id) == (30, "person23")
    h = train.size_histogram()
    assert h[1] == 1771 and sum(v for k, v in h.items() if k >= 10) == 21 and max(h) == 30
    families = {f: sum(1 for x in train.sizes() if x.startswith(f)) for f in ("person", "IM-", "NORMAL2-")}
    assert families == {"person": 1635, "IM-": 518, "NORMAL2-": 693}
    assert (test.n_images, test.coverage, test.n_groups, test.largest) == (624, 1.0, 427, 9)
    shared = train.shared_with(test)
    test_persons = {x for x in test.ids if x.startswith("person")}
    assert len(shared) == 170 and len(test_persons) == 202 and shared <= test_persons
    # ... and every shared person is bacteria on one side and virus on the other (see the module docstring)
    subtype = {}
    for lst in (s.train, s.test):
        for i in range(len(lst)):
            name = Path(lst.source(i)).name
            if name.startswith("person"):
                subtype.setdefault(kermany_patient_id(name), {}).setdefault(lst is s.test, set()).add(
                    name.split("_")[1])
    assert all(not (subtype[p][False] & subtype[p][True]) for p in shared)
    s_eps, s_delta = group_guarantee(1.0, 1e-5, train.largest)
    assert "(30 images)" in group_sentence(1.0, 1e-5, train) and s_eps == 30 and s_delta > 1


def test_real_ham10000_groups(shared_data):
    s = _load("ham10000", str(shared_data / "ham10000"))
    train, test = train_groups(s, "ham10000"), groups_of(s.test, s.test_metadata, "ham10000")
    assert train.unit == "lesion" and train.source == "lesion_id column of HAM10000_metadata.csv"
    assert (train.n_images, train.coverage, train.n_groups, train.largest) == (8011, 1.0, 5975, 6)
    assert train.n_groups == s.split_info["n_lesions_train"]
    assert (test.n_images, test.n_groups, test.largest) == (2004, 1495, 6) and not train.shared_with(test)
    assert "several lesions" in group_sentence(1.0, 1e-5, train)


def test_real_sets_without_owners(shared_data):
    s = _load("pneumoniamnist", str(shared_data / "pneumoniamnist"))
    assert train_groups(s, "pneumoniamnist") is None
