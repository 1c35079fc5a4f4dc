"""The Privacy budget page and the Train page's budget warning, driven headless by AppTest."""
from __future__ import annotations

import warnings

import pytest

from apptest_support import fresh_caches, open_page, texts  # noqa: F401 - fresh_caches is autouse
from dpcore.config import RunConfig
from dpcore.ledger import Ledger
from dpcore.store import RunStore
from dpcore.trainer import train

# the Train page's defaults on digits (seed 0, test fraction 0.2): the data set these runs spend
TINY = {"dataset": "digits", "backbone": "tiny_cnn", "image_size": 16, "epochs": 1, "batch_size": 64,
        "max_physical_batch_size": 64, "epsilon": 2.0, "device": "cpu"}


@pytest.fixture(scope="module")
def spent(tmp_path_factory):
    root = tmp_path_factory.mktemp("ledger_app")
    store = RunStore(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = [train(RunConfig(**TINY), store).run_id, train(RunConfig(**{**TINY, "epsilon": 1.0}), store).run_id]
    return root, ids


def test_page_renders_with_no_runs(tmp_path, monkeypatch):
    at = open_page("pages/ledger.py", tmp_path / "runs", monkeypatch)
    assert "Privacy budget" in texts(at) and "No runs yet" in texts(at)


def test_page_shows_the_composed_total_and_saves_a_budget(spent, monkeypatch):
    root, ids = spent
    at = open_page("pages/ledger.py", root, monkeypatch)
    s = Ledger(root).summaries()[0]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Runs"] == "2"
    assert metrics["Total ε (accountant)"] == f"{s.epsilon:.4g}"
    assert metrics["Basic composition"] == f"{s.basic_epsilon:.4g}"
    df = at.dataframe[0].value
    assert list(df["run"]) == ids
    assert len(at.get("plotly_chart")) == 1
    at.number_input(key="ledger_budget_eps").set_value(2.0)
    at.button[0].click().run()  # the form's submit button
    assert Ledger(root).summaries()[0].budget_epsilon == 2.0
    Ledger(root).set_budget(s.key, None)


def test_deleted_runs_stay_on_the_page(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_id = train(RunConfig(**TINY), store).run_id
    store.delete_run(run_id)
    at = open_page("pages/ledger.py", tmp_path, monkeypatch)
    assert list(at.dataframe[0].value["run"]) == [run_id]


def test_train_page_warns_before_a_launch_past_the_budget(spent, monkeypatch):
    root, _ = spent
    ledger = Ledger(root)
    key = ledger.summaries()[0].key
    ledger.set_budget(key, ledger.summary(key).epsilon + 0.01)  # any further run would exceed it
    try:
        at = open_page("pages/train.py", root, monkeypatch)
        warning = "\n".join(w.value for w in at.warning)
        assert "Privacy budget" in warning and "past its budget" in warning
        ledger.set_budget(key, 1000)
        at = open_page("pages/train.py", root, monkeypatch)
        assert "past its budget" not in "\n".join(w.value for w in at.warning)
        assert "of a budget of 1000" in texts(at)
    finally:
        ledger.set_budget(key, None)
