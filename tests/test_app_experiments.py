"""The Experiments page, driven headless by AppTest: renders with no runs, shows a finished experiment's table
and chart from the stored runs, launches an experiment as background jobs and follows it, reports bad files."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import apptest_support as support
from apptest_support import fresh_caches  # noqa: F401 - autouse

from dpcore.analysis import experiments as ex
from dpcore.store.runs import RunStore

PAGE = "pages/experiments.py"
TINY = """
name = "tiny"
version = 1
title = "Tiny digits experiment"
description = "digits, tiny CNN at 16 px, one epoch: one ε and the non-private baseline"

[base]
dataset = "digits"
backbone = "tiny_cnn"
image_size = 16
epochs = 1
batch_size = 64
max_physical_batch_size = 64
device = "cpu"
epsilon = 2

[[arms]]
label = "DP ε=2"

[[arms]]
label = "non-private"
non_private = true
"""


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    d = tmp_path / "experiments"
    d.mkdir()
    (d / "tiny.toml").write_text(TINY)
    return d


def open_page(runs: Path, monkeypatch, experiments: Path | None = None):
    env = {ex.EXPERIMENTS_ENV: str(experiments)} if experiments is not None else None
    return support.open_page(PAGE, runs, monkeypatch, env)


def texts(at) -> str:
    return support.texts(at, "subheader")


def table(at: AppTest):
    return next(df.value for df in at.dataframe if "arm" in df.value.columns and "status" in df.value.columns)


def test_page_renders_with_an_empty_runs_folder_and_the_shipped_experiments(tmp_path, monkeypatch):
    monkeypatch.delenv(ex.EXPERIMENTS_ENV, raising=False)
    at = open_page(tmp_path / "runs", monkeypatch)
    names = at.selectbox(key="ex_name").options
    assert any("dp-vs-nonprivate" in n for n in names) and any("seed-pneumonia-beit22k-eps0.5" in n for n in names)
    shown = texts(at)
    assert "No stored runs of this experiment version yet" in shown
    assert "Everything the chosen arms need" in shown or "This machine lacks" in shown


def test_page_shows_a_finished_experiment_from_the_stored_runs(tmp_path, tiny_dir, monkeypatch):
    runs = tmp_path / "runs"
    comp = ex.run_experiment("tiny", RunStore(runs), directory=tiny_dir)
    assert comp.done == 2
    at = open_page(runs, monkeypatch, tiny_dir)
    assert "Tiny digits experiment" in texts(at)
    df = table(at)
    assert list(df["arm"]) == ["DP ε=2", "non-private"]
    assert list(df["status"]) == ["done", "done"]
    assert df["epsilon"][0] == pytest.approx(comp.rows[0]["epsilon"]) and df["epsilon"][0] <= 2.0001
    assert df["accuracy"][1] == pytest.approx(100 * comp.rows[1]["accuracy"])  # shown in percent, as in text
    ex_table = next(d for d in at.dataframe if "arm" in d.value.columns and "status" in d.value.columns)
    formats = {k: v.get("type_config", {}).get("format") for k, v in json.loads(ex_table.proto.columns).items()}
    assert formats["accuracy"] == formats["balanced_accuracy"] == "%.1f %%" and formats["epsilon"] == "%.3g"
    assert ex_table.proto.placeholder == "—"  # a non-private arm's ε reads '—', not 'None'
    assert len(at.get("plotly_chart")) == 1
    assert "2 of 2 arms finished" in texts(at)
    # the same comparison on the Runs page
    at.switch_page("pages/runs.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Experiment comparisons" in texts(at)
    runs_df = next(d.value for d in at.dataframe if "arm" in d.value.columns)
    assert list(runs_df["arm"]) == ["DP ε=2", "non-private"]
    assert runs_df["accuracy"][1] == pytest.approx(100 * comp.rows[1]["accuracy"])


def test_page_launches_an_experiment_and_follows_it(tmp_path, tiny_dir, monkeypatch):
    at = open_page(tmp_path / "runs", monkeypatch, tiny_dir)
    assert "Everything the chosen arms need is on this machine" in texts(at)
    at.button(key="ex_launch_btn").click().run()
    assert not at.exception, [e.value for e in at.exception]
    deadline = time.time() + 120
    while time.time() < deadline:  # run_every never fires in AppTest: each run() is one tick
        time.sleep(0.5)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if "2 of 2 arms finished" in texts(at):
            break
    else:
        pytest.fail("the launched experiment never finished on the page:\n" + texts(at))
    df = table(at)
    assert list(df["status"]) == ["done", "done"]
    tags = ex.read_tags(tmp_path / "runs")
    assert sorted(t["arm"] for t in tags.values()) == ["DP ε=2", "non-private"]


def test_an_invalid_experiment_file_is_shown_with_its_fix(tmp_path, monkeypatch):
    d = tmp_path / "experiments"
    d.mkdir()
    (d / "broken.toml").write_text('name = "broken"\nversion = 1\ndescription = "x"\n[[arms]]\nlabel = "a"\nepsilonn = 1\n')
    at = open_page(tmp_path / "runs", monkeypatch, d)
    err = " ".join(e.value for e in at.error)
    assert "epsilonn" in err and "Fix:" in err
