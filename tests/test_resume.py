"""Checkpoints and resume: a DP run killed with SIGKILL mid-run (a real subprocess) continues from its last
checkpoint and finishes; its card states the planned (σ, q, T) and dp-accounting's ε for them, and the ledger
holds every noisy step ever taken (those redone after the kill under both entries)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpcore.privacy import accounting
from dpcore.training.checkpoint import CheckpointError
from dpcore.config import RunConfig
from dpcore.privacy.ledger import Ledger
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--dataset", "digits", "--backbone", "tiny_cnn", "--image-size", "16", "--epochs", "40", "--batch-size",
        "64", "--max-physical-batch-size", "64", "--epsilon", "2", "--device", "cpu", "--ema-decay", "0.9"]


def _kill_after_checkpoint(runs: Path, env: dict) -> str:
    proc = subprocess.Popen([sys.executable, "-m", "dpcore", "train", *ARGS, "--runs-dir", str(runs)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            ckpts = list(runs.glob("*/checkpoint.json"))
            if ckpts and json.loads(ckpts[0].read_text())["step"] >= 20:
                time.sleep(1.5)  # a few steps past the checkpoint: they will be redone
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return ckpts[0].parent.name
            if proc.poll() is not None:
                pytest.fail(f"the training process ended ({proc.returncode}) before a checkpoint was written")
            time.sleep(0.2)
        pytest.fail("no checkpoint within 240 s")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_run_resumes_from_its_checkpoint_and_the_ledger_counts_every_step(tmp_path, fresh_ledger):
    runs = tmp_path / "runs"
    env = dict(os.environ, DPCORE_CHECKPOINT_EVERY="1", PYTHONPATH=str(ROOT))
    run_id = _kill_after_checkpoint(runs, env)
    store = RunStore(runs)
    store.reap_orphans()
    assert store.get_run(run_id).status == "failed"
    ledger = Ledger()
    killed = ledger.entry(run_id)
    assert killed.status == "running" and killed.interrupted  # its process is gone; its reserved steps count
    from_step = json.loads((runs / run_id / "checkpoint.json").read_text())["step"]
    assert killed.steps > from_step  # it had gone past the checkpoint (reserved ≥ taken)

    result = train(store.get_run(run_id).config, store, run_id=run_id, resume=True, checkpoint_every=0)
    card = result.card
    assert result.status == "done" and store.get_run(run_id).status == "done"
    spe = -(-1437 // 64)  # digits: 1,437 training images
    q, T = 1 / spe, 40 * spe
    plan = accounting.plan(2.0, 1e-5, q, T, "rdp")
    assert card["sample_rate"] == pytest.approx(q) and card["steps"] == T
    assert card["noise_multiplier"] == pytest.approx(plan.noise_multiplier)
    assert card["epsilon"] == pytest.approx(accounting.epsilon(plan.noise_multiplier, q, T, 1e-5, "rdp"), rel=1e-9)
    resumed = card["privacy"]["resumed"]
    assert resumed["from_step"] == from_step and resumed["earlier_ledger_entries"] == [run_id]
    assert len(card["eval_history"]) == 40  # the evaluations before the checkpoint are kept
    again = ledger.entry(run_id + "+resume1")
    assert again.steps == T - from_step and again.status == "done"
    # every noisy step ever taken: the killed process's (reserved, ≥ taken) and the resumed ones
    assert ledger.entry(run_id).steps + again.steps > T
    assert not (runs / run_id / "checkpoint.json").exists()  # a finished run keeps no checkpoint


def test_resume_refuses_without_a_checkpoint_or_with_another_plan(tmp_path, fresh_ledger):
    store = RunStore(tmp_path / "runs")
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, batch_size=64, epsilon=2.0,
                    device="cpu")
    run_id = store.create_run(cfg)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg, store, run_id=run_id, resume=True)


def _cancelled_with_checkpoint(store: RunStore) -> str:
    """A DP run cancelled at step 30 with a checkpoint at every step (in this process: quick)."""
    import threading

    cancel = threading.Event()
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=3, batch_size=64, epsilon=2.0,
                    device="cpu")

    def listen(event):
        if event.kind == "step" and event.step >= 30:
            cancel.set()

    result = train(cfg, store, listener=listen, cancel=cancel, checkpoint_every=1e-9)
    assert result.status == "cancelled"
    return result.run_id


def test_the_runs_page_resumes_a_cancelled_run(tmp_path, fresh_ledger, monkeypatch):
    from apptest_support import open_page

    store = RunStore(tmp_path / "runs")
    run_id = _cancelled_with_checkpoint(store)
    at = open_page("pages/runs.py", tmp_path / "runs", monkeypatch)
    assert at.selectbox(key="rn_resume").value == run_id
    at.button(key=f"resume-{run_id}").click().run()
    assert not at.exception
    deadline = time.time() + 180
    while store.get_run(run_id).status in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
    card = store.card(run_id)
    assert card["status"] == "done" and card["steps"] == 3 * 23 and card["privacy"]["resumed"]["from_step"] == 30
