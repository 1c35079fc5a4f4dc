"""The Audit page, driven headless by AppTest: renders with no runs, says before the Run button that the audit
is a non-private use recorded in the ledger, shows a stored audit.json of a finished run (table, ROC, ε vs
claimed ε, the confidence and its correction, the verdict in words), refuses an old audit's invalid bounds,
and launches an audit that runs in the background."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest

import apptest_support as support
from apptest_support import fresh_caches  # noqa: F401 - autouse

from dpcore.analysis import audit
from dpcore.config import RunConfig
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

PAGE = "pages/audit.py"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", scope="head", epsilon=1.0, epochs=2, batch_size=128,
                    device="cpu", image_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_id = train(cfg, store).run_id
    return root, run_id


def open_page(runs: Path, monkeypatch):
    return support.open_page(PAGE, runs, monkeypatch)


def texts(at) -> str:
    return support.texts(at, "subheader")


def test_page_renders_with_an_empty_runs_folder(tmp_path, monkeypatch):
    at = open_page(tmp_path / "runs", monkeypatch)
    assert "Membership-inference audit" in texts(at)
    assert "No finished run yet" in texts(at)


def test_page_says_the_audit_is_a_non_private_use_before_the_run_button(finished_run, monkeypatch):
    root, _ = finished_run
    at = open_page(root, monkeypatch)
    warning = next(w.value for w in at.warning if "privacy ledger" in w.value)
    assert "non-private use of the candidate images" in warning and "voids their per-image ε" in warning
    assert "covered by no differential-privacy guarantee" in warning
    assert any("Run the audit" in b.label for b in at.button)


def test_page_shows_a_stored_audit(finished_run, monkeypatch):
    root, run_id = finished_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = audit.audit_run(RunStore(root), run_id, audit.AuditSettings(shadows=2, pool_size=200))
    at = open_page(root, monkeypatch)
    shown = texts(at)
    assert "Result" in shown and "consistent with the claim" in shown
    assert "descriptive statistics" in shown and "Bonferroni over 3 attacks × 6 guess counts" in shown
    assert "Steinke" in shown and "Not covered by any guarantee" in shown
    df = next(d.value for d in at.dataframe if "attack" in d.value.columns)
    assert list(df["attack"]) == [audit.ATTACK_LABELS[a] for a in audit.ATTACKS]
    assert df["ROC-AUC"][0] == pytest.approx(result["attacks"]["loss"]["auc"])
    assert df["ε lower bound (95% joint)"][0] == pytest.approx(result["attacks"]["loss"]["epsilon_lb"])
    assert not any("optimistic" in c for c in df.columns)
    assert len(at.get("plotly_chart")) == 2
    assert any(m.label == "Claimed ε" for m in at.metric)
    assert any(m.label == "Empirical ε ≥ (95%)" for m in at.metric)


def test_page_refuses_an_old_audit_with_invalid_bounds(finished_run, monkeypatch, tmp_path):
    root, run_id = finished_run
    path = RunStore(root).run_dir(run_id) / audit.AUDIT_FILE
    saved = path.read_text() if path.exists() else None
    path.write_text(json.dumps({"audit_version": 1, "run_id": run_id, "summary": {"epsilon_lb": 3.0}}))
    try:
        at = open_page(root, monkeypatch)
        assert "older version" in texts(at) and "Result" not in texts(at)
    finally:
        if saved is None:
            path.unlink()
        else:
            path.write_text(saved)


def test_page_launches_an_audit_in_the_background(finished_run, monkeypatch):
    root, run_id = finished_run
    at = open_page(root, monkeypatch)
    at.slider(key="au_shadows").set_value(2)
    at.number_input(key="au_seed").set_value(3)
    at.number_input(key="au_pool").set_value(200)
    next(b for b in at.button if "Run the audit" in b.label).click().run()
    assert not at.exception, [e.value for e in at.exception]
    deadline = time.time() + 90
    while time.time() < deadline and audit.is_running(RunStore(root), run_id):
        time.sleep(0.5)
    assert audit.read_progress(RunStore(root), run_id)["status"] == "done"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert audit.read_audit(RunStore(root), run_id)["config"]["seed"] == 3
    assert "seed 3" in texts(at)
