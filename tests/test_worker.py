"""Training runs in a worker process (dpcore.training.worker) supervised by the job manager: events reach the job,
cancel stops the child cleanly, and a child killed with SIGKILL fails its run with the reason while the
manager goes on with the next job."""
from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from dpcore.config import RunConfig
from dpcore.training.jobs import JobManager
from dpcore.store.runs import RunStore
from dpcore.training.worker import WorkerFailed, death_reason

TINY = dict(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, batch_size=64, max_physical_batch_size=64,
            epsilon=2.0, device="cpu")
SLOW = dict(TINY, epochs=200, evals_per_epoch=1)  # minutes: long enough to be killed or cancelled mid-run


def _running_pid(store: RunStore, run_id: str, timeout: float = 120) -> int:
    """The worker's pid once it has started training (it records itself as the run's owner)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with sqlite3.connect(store.db_path) as db:
            row = db.execute("SELECT status, pid FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        steps = [e for e in store.events(run_id) if e.kind == "step"]
        if row and row[0] == "running" and row[1] != os.getpid() and steps:
            return int(row[1])
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} never started training in a worker")


def test_a_run_trains_in_a_child_process_and_its_events_reach_the_job(tmp_path, fresh_ledger):
    store = RunStore(tmp_path / "runs")
    mgr = JobManager(store)
    job = mgr.submit(RunConfig(**TINY))
    mgr.wait(job.run_id, timeout=300)
    assert job.status == "done", job.error
    kinds = [e.kind for e in job.events.snapshot()]
    assert kinds[0] == "started" and "plan" in kinds and "step" in kinds and kinds[-1] == "finished"
    rec = store.get_run(job.run_id)
    assert rec.status == "done" and store.card(job.run_id)["status"] == "done"


def test_a_killed_worker_fails_its_run_with_the_reason_and_the_next_job_runs(tmp_path, fresh_ledger):
    store = RunStore(tmp_path / "runs")
    mgr = JobManager(store)
    victim = mgr.submit(RunConfig(**SLOW))
    after = mgr.submit(RunConfig(**TINY))
    os.kill(_running_pid(store, victim.run_id), signal.SIGKILL)
    mgr.wait(victim.run_id, timeout=60)
    assert victim.status == "failed" and "SIGKILL" in victim.error
    rec = store.get_run(victim.run_id)
    assert rec.status == "failed" and "killed" in rec.error and "SIGKILL" in rec.error
    assert victim.events.snapshot()[-1].kind == "failed"
    mgr.wait(after.run_id, timeout=300)
    assert after.status == "done", after.error  # the manager (and the app) went on


def test_cancel_stops_the_worker_cleanly(tmp_path, fresh_ledger):
    store = RunStore(tmp_path / "runs")
    mgr = JobManager(store)
    job = mgr.submit(RunConfig(**SLOW))
    pid = _running_pid(store, job.run_id)
    mgr.cancel(job.run_id)
    mgr.wait(job.run_id, timeout=60)
    assert job.status == "cancelled"
    assert store.get_run(job.run_id).status == "cancelled"
    assert store.card(job.run_id)["status"] == "cancelled"  # the trainer itself recorded it (SIGTERM, not a kill)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_failing_run_raises_with_the_trainers_message(tmp_path, fresh_ledger):
    from dpcore.training.worker import train_in_worker

    store = RunStore(tmp_path / "runs")
    with pytest.raises(WorkerFailed, match="names no patient"):
        train_in_worker(RunConfig(**dict(TINY, privacy_unit="patient")), store)
    assert store.list_runs()[0].status == "failed"


def test_death_reasons_read_plainly():
    assert "killed (out of memory, or by a user): SIGKILL" in death_reason(-9)
    assert "segmentation fault" in death_reason(-11, "Fatal Python error\nSegmentation fault\n")
    assert "exited with code 3" in death_reason(3)
