"""SIGTERM / SIGINT end a command-line training run as cancelled, cleanly: the run store, the card and the
privacy ledger say so (with the exact step count), and the run can be resumed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpcore.privacy.ledger import Ledger
from dpcore.store.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--dataset", "digits", "--backbone", "tiny_cnn", "--image-size", "16", "--epochs", "200", "--batch-size",
        "64", "--max-physical-batch-size", "64", "--epsilon", "2", "--device", "cpu"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_cancels_a_cli_run_cleanly(sig, tmp_path, fresh_ledger):
    runs = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DPCORE_CHECKPOINT_EVERY="1")
    proc = subprocess.Popen([sys.executable, "-m", "dpcore", "train", *ARGS, "--runs-dir", str(runs)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(runs.glob("*/checkpoint.json")):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    rec = RunStore(runs).list_runs()[0]
    assert rec.status == "cancelled", out[-2000:]
    card = RunStore(runs).card(rec.run_id)
    entry = Ledger().entry(rec.run_id)
    assert entry.status == "cancelled" and entry.steps == entry.steps_taken == card["steps"] > 0
    assert "Traceback" not in out
