"""Subgroup fairness: metrics per metadata group, the largest gap, DP beside non-private, the folder
metadata CSV, the CLI and the Runs page section; on planted gaps (predictions and data) and on HAM10000."""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from dpcore.analysis import fairness as fx
from dpcore.cli.main import main as cli
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.errors import DataError, DPCoreError
from dpcore.figures.fairness import fairness_figure
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

NAMES = ["bkl", "mel", "nv"]


def planted(n=800, seed=0, good=0.95, bad=0.6):
    """Predictions that are right 95% of the time for men and 60% for women; 3 examples of unknown sex."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    sex = np.where(rng.random(n) < 0.5, "male", "female").astype(object)
    sex[:3] = None
    ok = np.where(sex == "male", rng.random(n) < good, rng.random(n) < bad)
    pred = np.where(ok, y, (y + 1) % 3)
    probs = np.full((n, 3), 0.1)
    probs[np.arange(n), pred] = 0.8
    meta = [{"sex": s, "age": float(a) if a >= 0 else None, "localization": loc}
            for s, a, loc in zip(sex, rng.choice([5, 20, 35, 50, 65, 80, -1], n),
                                 rng.choice(["back", "face", "trunk"], n))]
    return y, probs, meta


# -- metrics on planted predictions ------------------------------------------------------------
def test_planted_gap_is_found_with_the_right_worst_group():
    y, probs, meta = planted()
    rep = fx.fairness_report(y, probs, fx.group_values(meta, "sex"), NAMES, positive="mel", attribute="sex")
    gap = rep["gaps"]["accuracy"]
    assert gap["worst_group"] == "female" and gap["best_group"] == "male"
    assert 0.25 < gap["gap"] < 0.45
    assert gap["ci95"][0] > 0.2  # the bootstrap interval excludes "no gap"
    assert rep["gaps"]["positive_recall"]["worst_group"] == "female"
    assert rep["gaps"]["balanced_accuracy"]["worst_group"] == "female"
    assert rep["groups"]["male"]["accuracy"] == pytest.approx(
        float((probs.argmax(1) == y)[[m["sex"] == "male" for m in meta]].mean()))
    # the 3 examples without sex are listed, flagged, and not in the gap
    unk = rep["groups"][fx.UNKNOWN]
    assert unk["n"] == 3 and unk["small"] and unk["unknown"]
    assert fx.UNKNOWN in rep["excluded_from_gap"] and rep["gap_groups"] == ["female", "male"]
    assert rep["overall"]["n"] == 800
    maj = rep["majority_class"]
    assert rep["groups"]["female"]["majority_baseline"] == pytest.approx(
        np.mean([yi == NAMES.index(maj) for yi, m in zip(y, meta) if m["sex"] == "female"]))
    text = fx.format_report(rep)
    assert "largest accuracy gap" in text and "female" in text and "not in gap" in text


def test_no_gap_when_groups_are_alike():
    y, probs, meta = planted(good=0.8, bad=0.8, n=2000)
    rep = fx.fairness_report(y, probs, fx.group_values(meta, "sex"), NAMES, attribute="sex")
    assert rep["gaps"]["accuracy"]["gap"] < 0.05
    assert "positive_recall" not in rep["gaps"]  # no positive class given


@pytest.mark.parametrize("age,bucket", [(0, "<30"), (29.9, "<30"), (30, "30–44"), (44, "30–44"), (45, "45–59"),
                                        (59, "45–59"), (60, "60–74"), (74.5, "60–74"), (75, "75+"), (85, "75+"),
                                        (None, "unknown"), ("", "unknown"), ("n/a", "unknown"),
                                        (float("nan"), "unknown"), ("40", "30–44")])
def test_age_buckets(age, bucket):
    assert fx.age_bucket(age) == bucket


def test_group_values_age_order_and_numeric_quartiles():
    y, probs, meta = planted()
    groups = fx.group_values(meta, "age")
    rep = fx.fairness_report(y, probs, groups, NAMES, attribute="age")
    assert list(rep["groups"]) == ["<30", "30–44", "45–59", "60–74", "75+", "unknown"]
    vals = fx.group_values([{"bmi": float(v)} for v in range(40)] + [{"bmi": None}], "bmi")
    assert len(set(vals)) == 5 and vals[-1] == "unknown"  # four quartile bins + unknown
    assert fx.group_values([{"site": 1.0}, {"site": 2.0}, {"site": ""}], "site") == ["1", "2", "unknown"]


def test_small_groups_flagged_not_dropped():
    y, probs, meta = planted(n=300)
    groups = fx.group_values(meta, "age")
    rep = fx.fairness_report(y, probs, groups, NAMES, attribute="age", min_group=60)
    sizes = {g: r["n"] for g, r in rep["groups"].items()}
    assert sum(sizes.values()) == 300  # every example is in some group
    small = {g for g, n in sizes.items() if n < 60}
    assert small and {g for g, r in rep["groups"].items() if r["small"]} == small
    assert set(rep["excluded_from_gap"]) >= small and not set(rep["gap_groups"]) & small
    with pytest.raises(DPCoreError, match="min_group"):
        fx.fairness_report(y, probs, groups, NAMES, min_group=0)


def test_auc_is_none_with_a_reason_for_a_single_class_group():
    y = np.array([2, 2, 2, 2, 0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[[2, 2, 0, 2, 0, 1, 2, 1, 1, 2]] * 0.7 + 0.1
    groups = ["a"] * 4 + ["b"] * 6
    rep = fx.fairness_report(y, probs, groups, NAMES, min_group=1, positive="mel")
    a = rep["groups"]["a"]
    assert a["roc_auc"] is None and "only one class" in a["roc_auc_note"] and "nv" in a["roc_auc_note"]
    assert a["per_class_recall"]["mel"] is None and a["per_class_recall"]["nv"] == 0.75
    assert a["positive_recall"] is None and a["n_positive"] == 0
    assert rep["groups"]["b"]["roc_auc"] is not None
    assert rep["gaps"]["roc_auc"] is None  # only one group has an AUC
    assert rep["gaps"]["positive_recall"] is None  # too few melanomas anywhere


def test_available_attributes_skip_ids_and_constants():
    meta = [{"image_id": f"I{i}", "sex": "male" if i % 2 else "female", "age": float(i), "dx_type": "histo",
             "localization": "back" if i % 3 else "face"} for i in range(50)]
    assert fx.available_attributes(meta) == ["sex", "age", "localization"]
    assert fx.available_attributes([{} for _ in range(5)]) == []


def test_positive_class():
    assert fx.positive_class("ham10000", ["akiec", "bcc", "mel", "nv"]) == "mel"
    assert fx.positive_class("folder", ["benign", "malignant"]) == "malignant"
    assert fx.positive_class("folder", ["cat", "dog"]) is None
    with pytest.raises(DPCoreError, match="not a class"):
        fx.positive_class("folder", ["cat", "dog"], "mel")


def test_figure_groups_runs_and_annotates_gaps():
    y, probs, meta = planted()
    g = fx.group_values(meta, "sex")
    a = fx.fairness_report(y, probs, g, NAMES, attribute="sex")
    b = fx.fairness_report(y, np.eye(3)[y], g, NAMES, attribute="sex")
    a["run"], b["run"] = {"label": "DP ε=2"}, {"label": "non-private"}
    fig = fairness_figure([a, b], "accuracy")
    assert [t.name for t in fig.data] == ["DP ε=2", "non-private"]
    assert list(fig.data[0].x) == ["female", "male", "unknown"]
    note = fig.layout.annotations[0].text
    assert "DP ε=2: largest gap" in note and "male vs female" in note and "non-private: largest gap 0.0" in note
    assert fig.data[0].marker.pattern.shape[2] == "/"  # the unknown group is hatched


# -- folder data sets with a metadata CSV ------------------------------------------------------
def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def make_folder_set(root: Path, n_per_sex: int = 80, size: int = 12, seed: int = 0) -> list[dict]:
    """Two classes; for men the class shows in the image (bright vs dark), for women it does not (the same
    random grey either way): a group gap planted in the data. Metadata: sex, age, site."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(2 * n_per_sex):
        sex = "male" if i % 2 == 0 else "female"
        cls = "malignant" if (i // 2) % 2 else "benign"
        if sex == "male":
            level = int(rng.integers(170, 230)) if cls == "malignant" else int(rng.integers(25, 85))
        else:
            level = int(rng.integers(25, 230))
        arr = np.clip(rng.normal(level, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        rel = f"{cls}/img_{i:04d}.png"
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / rel)
        rows.append({"path": rel, "sex": sex, "age": str(20 + (i * 7) % 70) if i % 17 else "",
                     "site": "arm" if i % 3 else "leg"})
    _write_csv(root / "metadata.csv", rows)
    return rows


def test_folder_metadata_csv_is_read_per_image(tmp_path):
    rows = make_folder_set(tmp_path, n_per_sex=20)
    (tmp_path / "README.txt").write_text("x")
    s = load_dataset("folder", tmp_path, seed=0, test_fraction=0.25)
    by_path = {r["path"]: r for r in rows}
    for lst, meta in ((s.train, s.train_metadata), (s.test, s.test_metadata)):
        assert len(meta) == len(lst)
        for i, m in enumerate(meta):
            rel = Path(lst.source(i)).relative_to(tmp_path).as_posix()
            assert m["sex"] == by_path[rel]["sex"] and m["site"] == by_path[rel]["site"]
            assert m["age"] == (float(by_path[rel]["age"]) if by_path[rel]["age"] else None)
    assert s.split_info["metadata"]["columns"] == ["sex", "age", "site"]
    assert s.split_info["metadata"]["numeric_columns"] == ["age"]
    assert s.split_info["root_files_not_read"] == ["README.txt"]  # metadata.csv is read, not ignored


def test_folder_metadata_official_split_and_bare_file_names(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8)).save(tmp_path / split / c / f"{split}{c}{i}.png")
    rows = [{"filename": f"{sp}{c}{i}.png", "sex": "female" if i % 2 else "male"}
            for sp, n in (("train", 4), ("test", 2)) for c in ("a", "b") for i in range(n)]
    _write_csv(tmp_path / "metadata.csv", rows)
    s = load_dataset("folder", tmp_path)
    assert [m["sex"] for m in s.test_metadata] == ["male", "female", "male", "female"]
    assert s.split_info["metadata"]["key"] == "filename"


def test_folder_metadata_errors_name_the_problem(tmp_path):
    rows = make_folder_set(tmp_path, n_per_sex=10)
    _write_csv(tmp_path / "metadata.csv", rows[1:] + [{**rows[0], "path": "benign/nope.png"}])
    with pytest.raises(DataError, match=r"nope\.png") as e:
        load_dataset("folder", tmp_path)
    assert "img_0000.png" in str(e.value) and "have no row" in str(e.value)
    _write_csv(tmp_path / "metadata.csv", rows + [rows[3]])
    with pytest.raises(DataError, match="more than one row"):
        load_dataset("folder", tmp_path)
    _write_csv(tmp_path / "metadata.csv", [{"image_path": r["path"], "sex": r["sex"]} for r in rows])
    with pytest.raises(DataError, match="no column naming the image"):
        load_dataset("folder", tmp_path)
    _write_csv(tmp_path / "metadata.csv", [{"path": r["path"]} for r in rows])
    with pytest.raises(DataError, match="only the 'path' column"):
        load_dataset("folder", tmp_path)


# -- end to end: trained runs on a folder set with a planted gap -------------------------------
FAST = {"dataset": "folder", "backbone": "tiny_cnn", "image_size": 12, "batch_size": 64,
        "max_physical_batch_size": 64, "lr": 0.02, "device": "cpu", "test_fraction": 0.4, "seed": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = tmp_path_factory.mktemp("fair_data")
    make_folder_set(data, n_per_sex=120)
    store = RunStore(tmp_path_factory.mktemp("fair_runs"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np_run = train(RunConfig(data_dir=str(data), epochs=12, epsilon=None, **FAST), store)
        dp_run = train(RunConfig(data_dir=str(data), epochs=6, epsilon=8.0, clip_norm=1.0, **FAST), store)
    assert np_run.status == dp_run.status == "done"
    return store, dp_run.run_id, np_run.run_id


def test_end_to_end_training_finds_the_planted_gap(trained):
    store, _, np_id = trained
    assert fx.run_attributes(store, np_id) == ["sex", "age", "site"]
    rep = fx.run_fairness(store, np_id, "sex", min_group=10)
    gap = rep["gaps"]["accuracy"]
    assert gap["worst_group"] == "female" and gap["best_group"] == "male"
    assert rep["groups"]["male"]["accuracy"] > 0.9
    assert gap["gap"] > 0.2 and gap["ci95"][0] > 0
    assert rep["positive_class"] == "malignant"
    assert rep["run"]["label"] == "non-private"
    stored = json.loads((store.run_dir(np_id) / "fairness.json").read_text())
    assert any(r["attribute"] == "sex" for r in stored["reports"].values())
    assert (store.run_dir(np_id) / "test_metadata.json").is_file()
    age = fx.run_fairness(store, np_id, "age", min_group=10)
    assert set(age["groups"]) <= {"<30", "30–44", "45–59", "60–74", "75+", "unknown"} and "unknown" in age["groups"]
    with pytest.raises(DPCoreError, match="cannot be grouped by 'colour'"):
        fx.run_fairness(store, np_id, "colour")


def test_predictions_are_recomputed_from_the_model_when_absent(trained):
    store, dp_id, _ = trained
    path = store.run_dir(dp_id) / "test_predictions.npz"
    with np.load(path) as npz:
        before = npz["probs"].copy()
    path.unlink()
    rep = fx.run_fairness(store, dp_id, "sex", min_group=10, use_cache=False)
    assert "predicted from model.safetensors" in rep["predictions_source"]
    with np.load(path) as npz:
        np.testing.assert_allclose(npz["probs"], before, atol=1e-4)


def test_compare_dp_with_non_private(trained):
    store, dp_id, np_id = trained
    assert fx.default_partner(store, dp_id) == np_id and fx.default_partner(store, np_id) == dp_id
    comp = fx.compare(store, dp_id, np_id, "sex", min_group=10)
    assert comp["paired"] and comp["a"]["private"] and not comp["b"]["private"]
    assert [r["group"] for r in comp["rows"]] == ["female", "male"]
    d = comp["gap_difference"]["accuracy"]
    assert d == pytest.approx(comp["gaps_a"]["accuracy"]["gap"] - comp["gaps_b"]["accuracy"]["gap"])
    lo, hi = comp["accuracy_gap_difference_ci95"]
    assert lo <= hi and comp["verdict"]
    assert comp["gaps_a"]["accuracy"]["worst_group"] == "female"
    stored = json.loads((store.run_dir(dp_id) / "fairness.json").read_text())
    assert len(stored["comparisons"]) == 1
    text = fx.format_compare(comp)
    assert "verdict:" in text and "A−B" in text


def test_cli_prints_tables_and_a_json_last_line(trained, capsys):
    store, dp_id, np_id = trained
    assert cli(["fairness", "--run", dp_id, "--against", "auto", "--attribute", "sex", "--min-group", "10",
                "--runs-dir", str(store.root)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("fairness {")
    head = json.loads(out[-1][len("fairness "):])
    assert head["a"] == dp_id and head["b"] == np_id and head["gaps_a"]["accuracy"]["worst"] == "female"
    assert any(line.startswith("female") for line in out)
    assert cli(["fairness", "--run", np_id, "--attribute", "all", "--min-group", "10",
                "--runs-dir", str(store.root)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1][len("fairness "):])
    assert [h["attribute"] for h in last] == ["sex", "age", "site"]
    assert cli(["fairness", "--run", np_id, "--attribute", "colour", "--runs-dir", str(store.root)]) == 2
    assert "cannot be grouped" in capsys.readouterr().err


def test_cli_refuses_a_run_without_metadata(tmp_path, capsys):
    store = RunStore(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rid = train(RunConfig(dataset="digits", backbone="tiny_cnn", image_size=8, epochs=1, batch_size=128,
                              max_physical_batch_size=128, epsilon=None, device="cpu"), store).run_id
    assert cli(["fairness", "--run", rid, "--runs-dir", str(tmp_path)]) == 2
    assert "no per-example metadata" in capsys.readouterr().err


# -- the Runs page -----------------------------------------------------------------------------
APP = str(Path(__file__).resolve().parents[1] / "app.py")


def test_runs_page_fairness_section(trained, monkeypatch):
    store, dp_id, np_id = trained
    st.cache_resource.clear()
    st.cache_data.clear()
    monkeypatch.setenv("DPCORE_RUNS_DIR", str(store.root))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("pages/runs.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="rn_fair_run").value == dp_id  # newest first
    assert at.selectbox(key="rn_fair_against").value == np_id  # the other privacy kind, same data
    assert at.selectbox(key="rn_fair_attr").options == ["sex", "age", "site"]
    at.number_input(key="rn_fair_min").set_value(10).run()
    assert not at.exception, [e.value for e in at.exception]
    verdict = [i.value for i in at.info if str(i.value).startswith("Verdict")]
    assert verdict
    assert any("female" in str(df.value) for df in at.dataframe)
    at.selectbox(key="rn_fair_against").select_index(0).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Largest accuracy gap" in str(i.value) for i in at.info)
    st.cache_resource.clear()


# -- real HAM10000 -----------------------------------------------------------------------------
def test_real_ham10000_metadata_groups_and_a_planted_gap(shared_data):
    root = shared_data / "ham10000"
    if not (root / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"{root} has no HAM10000 metadata")
    s = load_dataset("ham10000", root, seed=0, test_fraction=0.2)
    meta = s.test_metadata
    assert fx.available_attributes(meta)[:3] == ["sex", "age", "localization"]
    sexes = fx.group_values(meta, "sex")
    assert {"male", "female"} <= set(sexes)
    ages = fx.group_values(meta, "age")
    assert set(ages) <= {"<30", "30–44", "45–59", "60–74", "75+", "unknown"} and len(set(ages)) >= 5
    # plant: right for every man, wrong for half of the women
    y = s.test.labels
    rng = np.random.default_rng(0)
    pred = np.where((np.array(sexes) == "female") & (rng.random(len(y)) < 0.5), (y + 1) % 7, y)
    probs = np.eye(7)[pred] * 0.9 + 0.1 / 7
    rep = fx.fairness_report(y, probs, sexes, s.class_names, positive=fx.positive_class("ham10000", s.class_names),
                             attribute="sex")
    assert rep["gaps"]["accuracy"]["worst_group"] == "female" and rep["groups"]["male"]["accuracy"] == 1.0
    assert rep["positive_class"] == "mel" and rep["groups"]["female"]["n_positive"] > 0
    loc = fx.fairness_report(y, probs, fx.group_values(meta, "localization"), s.class_names, attribute="loc")
    assert any(r["small"] for r in loc["groups"].values())  # rare sites (e.g. acral) are flagged
    assert not math.isnan(loc["overall"]["accuracy"])


@pytest.mark.slow
def test_real_ham10000_trained_runs_cli(shared_data, tmp_path, capsys):
    root = shared_data / "ham10000"
    store = RunStore(tmp_path)
    base = {"dataset": "ham10000", "data_dir": str(root), "backbone": "tiny_cnn", "image_size": 32, "epochs": 1,
            "batch_size": 256, "max_physical_batch_size": 256, "lr": 0.01, "device": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = train(RunConfig(epsilon=2.0, **base), store).run_id
        plain = train(RunConfig(epsilon=None, **base), store).run_id
    assert cli(["fairness", "--run", dp, "--against", plain, "--attribute", "sex", "--runs-dir", str(tmp_path)]) == 0
    head = json.loads(capsys.readouterr().out.strip().splitlines()[-1][len("fairness "):])
    assert head["a_label"].startswith("DP") and head["b_label"] == "non-private"
    assert head["gaps_a"]["accuracy"] is not None and "positive_recall" in head["gap_difference"]
