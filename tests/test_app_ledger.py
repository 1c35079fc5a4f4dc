"""The Privacy budget page and the Train page's budget warning, driven headless by AppTest."""
from __future__ import annotations

import json
import warnings

import pytest

from apptest_support import fresh_caches, open_page, texts  # noqa: F401 - fresh_caches is autouse
from dpcore.config import RunConfig
from dpcore.privacy.ledger import Ledger
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

# the Train page's defaults on digits (seed 0, test fraction 0.2): the data set these runs spend
TINY = {"dataset": "digits", "backbone": "tiny_cnn", "image_size": 16, "epochs": 1, "batch_size": 64,
        "max_physical_batch_size": 64, "epsilon": 2.0, "device": "cpu"}


@pytest.fixture(scope="module")
def spent(tmp_path_factory):
    root = tmp_path_factory.mktemp("ledger_app")
    mp = pytest.MonkeyPatch()
    mp.setenv("DPCORE_LEDGER", str(root / "ledger.sqlite"))
    store = RunStore(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = [train(RunConfig(**TINY), store).run_id, train(RunConfig(**{**TINY, "epsilon": 1.0}), store).run_id]
    mp.undo()
    return root, ids


@pytest.fixture
def its_ledger(spent, monkeypatch):
    root, ids = spent
    monkeypatch.setenv("DPCORE_LEDGER", str(root / "ledger.sqlite"))
    return root, ids


def test_page_renders_with_no_runs(tmp_path, monkeypatch, fresh_ledger):
    at = open_page("pages/ledger.py", tmp_path / "runs", monkeypatch)
    assert "Privacy budget" in texts(at) and "No runs yet" in texts(at)


def test_page_shows_epsilon_per_image_and_saves_a_budget(its_ledger, monkeypatch):
    root, ids = its_ledger
    at = open_page("pages/ledger.py", root, monkeypatch)
    s = Ledger().summary("digits")
    metrics = {m.label: m.value for m in at.metric}
    acc = s.exposure.max_accountant
    assert acc in ("RDP", "PLD")  # every ε on the page says which accountant gave it
    assert metrics[f"Most-exposed image: ε ({acc})"] == f"{s.epsilon:.4g}"
    assert metrics["Images trained on"] == "1,437"
    df = at.dataframe[0].value
    assert list(df["use"]) == ids
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # the per-image histogram, and the total after each use (in an expander)
    hist = json.loads(charts[0].proto.spec)["data"][0]
    assert hist["y"] == [360, 1437] and hist["x"][0].startswith("0 (not trained on)")
    at.number_input(key="ledger_budget_eps").set_value(2.0)
    at.button[0].click().run()  # the form's submit button
    assert Ledger().summary("digits").budget_epsilon == 2.0
    Ledger().set_budget("digits", None)


def test_deleted_runs_stay_on_the_page(tmp_path, monkeypatch, fresh_ledger):
    store = RunStore(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_id = train(RunConfig(**TINY), store).run_id
    store.delete_run(run_id)
    at = open_page("pages/ledger.py", tmp_path, monkeypatch)
    assert list(at.dataframe[0].value["use"]) == [run_id]


def test_train_page_refuses_a_launch_past_the_budget_unless_overridden(its_ledger, monkeypatch):
    root, _ = its_ledger
    ledger = Ledger()
    ledger.set_budget("digits", ledger.summary("digits").epsilon + 0.01)  # any further run would exceed it
    try:
        at = open_page("pages/train.py", root, monkeypatch)
        error = "\n".join(w.value for w in at.error)
        assert "Privacy budget" in error and "past the budget" in error
        assert at.button(key="launch").disabled
        at.checkbox(key="tr_over").check().run()
        assert not at.button(key="launch").disabled
        ledger.set_budget("digits", 1000)
        at = open_page("pages/train.py", root, monkeypatch)
        assert "past the budget" not in "\n".join(w.value for w in at.error)
        assert "of a budget of 1000" in texts(at) and "Privacy unit" in texts(at)
    finally:
        ledger.set_budget("digits", None)


def test_the_page_works_composition_out_on_its_own_runs(its_ledger, monkeypatch):
    """Two runs on the same images: the sentence names their ε's, the composed ε (with its accountant) and their
    sum, and those numbers are the ledger's."""
    root, ids = its_ledger
    at = open_page("pages/ledger.py", root, monkeypatch)
    worked = Ledger().worst_composition("digits")
    assert [r["run_id"] for r in worked["runs"]] == ids
    assert worked["composed"] == Ledger().summary("digits").epsilon
    assert worked["composed"] < worked["sum"]  # composition is tighter than adding
    line = next(m.value for m in at.markdown if m.value.startswith("Composition:"))
    assert "two runs" in line and f"ε = {worked['composed']:.3g} ({worked['accountant']})" in line
    assert f"not {worked['sum']:.3g}" in line
    assert list(at.dataframe[0].value["accountant"]) == ["RDP", "RDP"]


def test_the_train_pages_budget_line_names_the_accountant(its_ledger, monkeypatch):
    """After runs planned with RDP, the per-image figure may be PLD's (smaller): the line says so, instead of
    an unexplained "1.82 spent" after a run at 1.99."""
    root, _ = its_ledger
    at = open_page("pages/train.py", root, monkeypatch)
    line = next(c.value for c in at.caption if c.value.startswith("Privacy budget (per image"))
    acc = Ledger().summary("digits").exposure.max_accountant
    assert f"({acc})" in line and "tighter of RDP and PLD" in line
