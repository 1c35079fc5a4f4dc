"""The Runs page, driven headless by AppTest on runs folders of recorded (not trained) runs: the frontier defaults
to the latest sweep's group, tables have no 'None' cells and one format per kind of number, the smallest-ε answer
is dpcore.analysis.frontier's, the frontier's score axis stays within [0, 1]."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from apptest_support import fresh_caches, open_page, texts  # noqa: F401 - fresh_caches is autouse
from dpcore.analysis import run_review
from dpcore.config import RunConfig
from dpcore.analysis.frontier import smallest_epsilon
from dpcore.store.runs import RunStore

PAGE = "pages/runs.py"
BASE = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, device="cpu")
# a head-only sweep: accuracy 80 % at ε=1, 95 % at ε=4 (90 % is reached between them), AUC rising too
SWEEP = {0.5: (0.62, 0.90), 1.0: (0.80, 0.93), 4.0: (0.95, 0.99), None: (0.97, 0.995)}


def _record(store: RunStore, config: RunConfig, accuracy: float, auc: float | None, run_id: str | None = None) -> str:
    """A finished run as the trainer records it (metrics and privacy record), without training."""
    run_id = run_id or store.create_run(config)
    eps = config.epsilon
    store.set_status(run_id, "running")
    store.record_results(run_id, {"accuracy": accuracy, "balanced_accuracy": accuracy - 0.02, "roc_auc": auc},
                         {"private": config.private, "epsilon": eps * 0.98 if eps else None, "unit": "image",
                          "guarantee_holds": True if config.private else None,
                          "guarantee_epsilon": eps * 0.98 if eps else None})
    store.set_status(run_id, "done")
    time.sleep(0.01)  # distinct finish times
    return run_id


def _sweep_runs(store: RunStore) -> list[str]:
    head = BASE.replace(scope="head")
    return [_record(store, head.replace(epsilon=e), *SWEEP[e]) for e in (0.5, 1.0, 4.0, None)]


def _table(at, column):
    return next(df for df in at.dataframe if column in df.value.columns)


def _columns(df) -> dict:
    return json.loads(df.proto.columns)


def test_the_frontier_defaults_to_the_latest_finished_runs_group_not_the_first_in_sort_order(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    _sweep_runs(store)  # group (digits, tiny_cnn, head, ...)
    latest = _record(store, BASE.replace(backbone="resnet18", epsilon=2.0), 0.7, 0.8)  # sorts first, finished last
    at = open_page(PAGE, tmp_path, monkeypatch)
    assert at.selectbox(key="rn_group").value == run_review.group_of(store.get_run(latest))
    _record(store, BASE.replace(epsilon=2.0), 0.85, 0.9)  # a newer run of another group: the default follows it
    at.run()
    assert at.selectbox(key="rn_group").value[:3] == ("digits", "tiny_cnn", "full")


def test_after_a_sweep_the_frontier_shows_the_sweeps_group(tmp_path, monkeypatch):
    import dpcore.training.worker

    def fake_train(config, store, listener=None, cancel=None, run_id=None, **_):
        acc, auc = SWEEP[config.epsilon]
        _record(store, config, acc, auc, run_id=run_id)
        eps = config.epsilon * 0.98 if config.epsilon else None
        return SimpleNamespace(run_id=run_id, status="done", card={
            "epsilon": eps, "test_accuracy": acc, "test_roc_auc": auc,
            "privacy": {"private": config.private, "target_epsilon": config.epsilon, "guarantee_holds": True}})

    monkeypatch.setattr(dpcore.training.worker, "train_in_worker", fake_train)
    store = RunStore(tmp_path)
    _record(store, BASE.replace(epsilon=2.0), 0.85, 0.9)  # the one 'full' point the page showed before
    at = open_page(PAGE, tmp_path, monkeypatch)
    assert at.selectbox(key="rn_group").value[2] == "full"
    from pages.common import manager

    job = manager().submit_sweep(BASE.replace(scope="head", epsilon=0.5), [0.5, 1.0, 4.0], non_private=True)
    manager().wait(job.run_id, 30)
    _record(store, BASE.replace(backbone="resnet18", epsilon=2.0), 0.7, 0.8)  # finished after the sweep
    at.session_state["rn_sweep"] = job.run_id
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="rn_group").value == run_review.group_of(store.get_run(job.run_ids[0]))
    assert "4 of 4 runs finished" in str([p.proto.text for p in at.get("progress")])
    points = _table(at, "target_epsilon")
    assert points.proto.placeholder == "—" and list(points.value["accuracy"]) == pytest.approx([62, 80, 95, 97])


def test_runs_table_has_no_none_cells_and_one_format_per_kind_of_number(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    ids = _sweep_runs(store)
    store.create_run(BASE.replace(epsilon=3.0))  # queued: no ε, no accuracy, no duration yet
    at = open_page(PAGE, tmp_path, monkeypatch)
    runs = _table(at, "test_accuracy")
    assert runs.proto.placeholder == "—"  # missing values read '—', not 'None'
    widths = [c.get("width") for c in _columns(runs).values() if c.get("width")]
    assert all(isinstance(w, int) for w in widths) and sum(widths) <= 940  # fits the wide layout: no cut-off
    cols = _columns(runs)
    assert cols["test_accuracy"]["type_config"]["format"] == "%.1f %%"
    assert cols["epsilon"]["type_config"]["format"] == "%.3g" and cols["test_roc_auc"]["type_config"]["format"] == "%.3f"
    by_id = runs.value.set_index("run_id")
    assert by_id.loc[ids[1], "test_accuracy"] == pytest.approx(80.0)  # percent, as fmt_pct writes it in text
    assert "None" not in set(by_id["duration"]) and by_id.loc[ids[1], "data"] == "digits / tiny_cnn"
    frontier = _table(at, "balanced_accuracy")
    assert frontier.proto.placeholder == "—"
    fcols = _columns(frontier)
    assert {fcols[c]["type_config"]["format"] for c in ("accuracy", "balanced_accuracy")} == {"%.1f %%"}


def test_the_smallest_epsilon_shown_is_dpcore_frontiers_answer(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    _sweep_runs(store)
    at = open_page(PAGE, tmp_path, monkeypatch)
    group = at.selectbox(key="rn_group").value
    dp, plain = run_review.frontier_points(store, *group)
    expected = smallest_epsilon(dp, "accuracy", 0.9, plain)
    assert expected.kind == "interpolated" and 0.98 < expected.epsilon < 3.92
    assert expected.sentence in texts(at)
    assert "costs privacy too" in texts(at) and any(el.proto.page.endswith("ledger") or "ledger" in el.proto.page
                                                  for el in at.get("page_link"))
    chart = json.loads(next(c for c in at.get("plotly_chart") if "frontier" in c.proto.id).proto.spec)
    marked = next(t for t in chart["data"] if t["name"] == "runs the answer comes from")
    assert sorted(marked["customdata"]) == sorted(expected.used)
    lo, hi = chart["layout"]["yaxis"]["range"]
    assert 0 <= lo and hi <= 1
    points = _table(at, "answer")
    assert set(points.value.loc[points.value["answer"], "run_id"]) == set(expected.used)

    at.radio(key="rn_fmetric").set_value("roc_auc").run()
    at.number_input(key="rn_target_roc_auc").set_value(0.99).run()
    auc = smallest_epsilon(dp, "roc_auc", 0.99, plain)
    assert auc.kind == "measured" and auc.sentence in texts(at)
    chart = json.loads(next(c for c in at.get("plotly_chart") if "frontier" in c.proto.id).proto.spec)
    assert chart["layout"]["yaxis"]["range"][1] <= 1

    at.radio(key="rn_fmetric").set_value("accuracy").run()
    at.number_input(key="rn_target_accuracy").set_value(99.0).run()
    assert "No DP run reaches" in texts(at, "warning")


def test_a_running_sweep_shows_its_progress_without_a_refresh_button_and_ends_by_itself(tmp_path, monkeypatch):
    import threading

    import dpcore.training.worker

    gate = threading.Event()

    def slow_train(config, store, listener=None, cancel=None, run_id=None, **_):
        gate.wait(30)
        acc, auc = SWEEP[config.epsilon]
        _record(store, config, acc, auc, run_id=run_id)
        return SimpleNamespace(run_id=run_id, status="done", card={"epsilon": config.epsilon, "test_accuracy": acc,
                                                                   "privacy": {"private": True}})

    monkeypatch.setattr(dpcore.training.worker, "train_in_worker", slow_train)
    at = open_page(PAGE, tmp_path, monkeypatch)
    from pages.common import manager

    job = manager().submit_sweep(BASE.replace(scope="head", epsilon=1.0), [1.0, 4.0])
    at.session_state["rn_sweep"] = job.run_id
    at.run()  # run_every never fires in AppTest: each run() is one tick of the fragment
    assert not at.exception, [e.value for e in at.exception]
    assert "0 of 2 runs finished" in str([p.proto.text for p in at.get("progress")])
    labels = [b.label for b in at.button]
    assert "Cancel sweep" in labels and "Refresh" not in labels  # it refreshes itself
    gate.set()
    manager().wait(job.run_id, 30)
    at.run()
    assert "2 of 2 runs finished" in str([p.proto.text for p in at.get("progress")])
    assert "Cancel sweep" not in [b.label for b in at.button]
    assert at.selectbox(key="rn_group").value[2] == "head"
