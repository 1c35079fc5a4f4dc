"""The engine side of the Runs page and the shared text formats: dpcore.analysis.labels and runs_overview."""
import math
from types import SimpleNamespace

import pytest

from dpcore.analysis import labels
from dpcore.analysis import runs_overview as ov
from dpcore.config import RunConfig
from dpcore.store.runs import RunStore
from dpcore.training.sweep import SweepPoint


def test_text_formats():
    assert labels.fmt_eps(None) == "∞ (no DP)" and labels.fmt_eps(math.inf) == "∞" and labels.fmt_eps(1.23456) == "1.23"
    assert labels.fmt_pct(0.2941) == "29.4 %" and labels.fmt_pct(None) == "—" and labels.fmt_pct(math.nan) == "—"
    assert labels.fmt_num(0.123456) == "0.123" and labels.fmt_num(0.001234, ".4g") == "0.001234"
    assert labels.fmt_num(None) == "—"
    assert labels.fmt_duration(None) == "—" and labels.fmt_duration(math.nan) == "—"
    assert labels.fmt_duration(42.4) == "42 s" and labels.fmt_duration(125) == "2 min 05 s"
    assert labels.fmt_duration(3 * 3600 + 7 * 60) == "3 h 07 min"
    assert labels.fmt_time(None) == "—" and len(labels.fmt_time(0.0)) == len("1970-01-01 00:00")


def test_run_labels():
    dp = SimpleNamespace(run_id="r1", dataset="digits", backbone="tiny_cnn", private=True, target_epsilon=2.0,
                         status="done")
    plain = SimpleNamespace(run_id="r2", dataset="digits", backbone="resnet18", private=False, target_epsilon=None,
                            status="failed")
    assert labels.run_label(dp) == "r1 · digits · tiny_cnn · ε=2 · done"
    assert labels.run_label(plain) == "r2 · digits · resnet18 · non-private · failed"
    assert labels.compare_label(dp) == "r1 (tiny_cnn, ε=2)" and labels.compare_label(plain) == "r2 (resnet18, non-private)"


@pytest.fixture
def store(tmp_path):
    """A finished DP run, a finished non-private pretrained run, and a cancelled run with a checkpoint."""
    st = RunStore(tmp_path / "runs")
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, epsilon=2.0)
    dp = st.create_run(cfg)
    st.set_status(dp, "running")
    st.record_results(dp, {"accuracy": 0.8, "balanced_accuracy": 0.75, "roc_auc": 0.9},
                      {"private": True, "epsilon": 1.9, "unit": "image"})
    st.set_status(dp, "done")
    npv = st.create_run(cfg.replace(epsilon=None, pretrained="hub", scope="head"))
    st.set_status(npv, "running")
    st.record_results(npv, {"accuracy": 0.95, "balanced_accuracy": 0.94, "roc_auc": 0.99},
                      {"private": False, "epsilon": None})
    st.set_status(npv, "done")
    stopped = st.create_run(cfg.replace(epsilon=4.0))
    st.set_status(stopped, "running")
    st.set_status(stopped, "cancelled")
    (st.run_dir(stopped) / "checkpoint.json").write_text("{}")
    return st, {"dp": dp, "npv": npv, "stopped": stopped}


def test_overview_rows(store):
    st, ids = store
    rows = {r["run_id"]: r for r in ov.overview_rows(st)}
    assert list(rows) == [ids["dp"], ids["npv"], ids["stopped"]]
    assert rows[ids["dp"]]["data"] == "digits / tiny_cnn" and rows[ids["dp"]]["recipe"] == "full, scratch"
    assert rows[ids["npv"]]["recipe"] == "head, pretrained"
    assert all(r["duration"] == labels.fmt_duration(r["duration_s"]) for r in rows.values())
    assert rows[ids["dp"]]["duration"].endswith(" s")


def test_compare_and_resume(store):
    st, ids = store
    records = {r.run_id: r for r in st.list_runs()}
    runs = ov.compare_events(st, records, [ids["dp"], ids["npv"]])
    assert list(runs) == [f"{ids['dp']} (tiny_cnn, ε=2)", f"{ids['npv']} (tiny_cnn, non-private)"]
    assert runs[f"{ids['dp']} (tiny_cnn, ε=2)"] == st.events(ids["dp"])
    assert ov.resumable_runs(st, records) == [ids["stopped"]]
    assert ov.fairness_candidates(st) == []  # digits has no metadata; no run has a model file either
    assert not ov.has_metadata(records[ids["dp"]])
    assert ov.has_metadata(SimpleNamespace(dataset="ham10000", config=None))
    assert ov.stored_experiments(st) == []  # nothing tagged


def test_sweep_and_frontier_rows():
    pts = [SweepPoint("a", "done", 1.0, 0.98, 0.7, 0.8), SweepPoint("b", "done", None, None, 0.9, 0.95)]
    rows = ov.sweep_point_rows(pts, "patient")
    assert [r["unit"] for r in rows] == ["patient", None] and rows[0]["epsilon"] == 0.98
    assert ov.sweep_run_ids([SimpleNamespace(run_ids=["x"])]) == []  # not a sweep job
    dp = [{"run_id": "a", "epsilon": 0.98, "unit": "image", "accuracy": 0.7, "balanced_accuracy": 0.6,
           "roc_auc": 0.8}]
    plain = [{"run_id": "b", "epsilon": None, "accuracy": 0.9, "balanced_accuracy": 0.85, "roc_auc": 0.95}]
    rows = ov.frontier_rows(dp, plain, used=("a",))
    assert [(r["run_id"], r["answer"], r["unit"]) for r in rows] == [("a", True, "image"), ("b", False, None)]
    assert not any(r["answer"] for r in ov.frontier_rows(dp, plain))


def test_fairness_rows():
    rep = {"positive_class": "mel", "gap_groups": ["f"], "excluded_from_gap": {"m": "fewer than 20"},
           "groups": {"f": {"n": 30, "accuracy": 0.8, "majority_baseline": 0.6, "balanced_accuracy": 0.7,
                            "roc_auc": 0.9, "positive_recall": 0.5, "roc_auc_note": None},
                      "m": {"n": 5, "accuracy": 0.6, "balanced_accuracy": 0.5, "roc_auc": None,
                            "positive_recall": None, "roc_auc_note": "one class"}}}
    rows = ov.fairness_rows(rep)
    assert rows[0] == {"group": "f", "n": 30, "accuracy": 0.8, "majority share": 0.6, "balanced accuracy": 0.7,
                       "ROC-AUC": 0.9, "mel recall": 0.5, "in gap": True, "note": ""}
    assert rows[1]["note"] == "fewer than 20" and rows[1]["majority share"] is None and not rows[1]["in gap"]
    comp = {"reports": [{"positive_class": None}], "a": {"label": "DP"}, "b": {"label": "non-DP"},
            "rows": [{"group": "f", "n": 30, "small": False, "unknown": False, "majority_baseline": 0.6,
                      **{f"{m}_{s}": v for m in ("accuracy", "balanced_accuracy", "roc_auc", "positive_recall")
                         for s, v in (("a", 0.7), ("b", 0.8))}}],
            "gaps_a": {"accuracy": {"gap": 0.1, "worst_group": "m"}}, "gaps_b": {},
            "gap_difference": {"accuracy": 0.05}}
    row = ov.fairness_compare_rows(comp)[0]
    assert row["in gap"] and row["accuracy DP"] == 0.7 and row["AUC non-DP"] == 0.8 and row["pos. recall DP"] == 0.7
    assert ov.fairness_gap_rows(comp) == [{"metric": "accuracy", "gap DP": 0.1, "worst DP": "m", "gap non-DP": None,
                                           "worst non-DP": None, "difference": 0.05}]
