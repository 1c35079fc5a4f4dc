"""The run store: SQLite index + folders, safe from several threads."""
import threading

import pytest

from dpcore.config import RunConfig
from dpcore.store.events import Event
from dpcore.store.runs import RunNotFound, RunStore


def test_lifecycle_and_ordering(tmp_path):
    store = RunStore(tmp_path / "runs")
    a = store.create_run(RunConfig(epsilon=1.0))
    b = store.create_run(RunConfig(epsilon=None))
    assert [r.run_id for r in store.list_runs()] == [a, b]
    assert store.get_run(a).status == "queued"
    store.set_status(a, "running")
    store.add_event(Event("step", a, step=1, loss=0.5, epsilon=0.1))
    store.add_event(Event("eval", a, step=1, metrics={"accuracy": 0.9}))
    store.record_results(a, {"accuracy": 0.9}, {"epsilon": 0.8})
    store.set_status(a, "done")
    rec = store.get_run(a)
    assert rec.status == "done" and rec.metrics["accuracy"] == 0.9 and rec.privacy["epsilon"] == 0.8
    assert rec.config == RunConfig(epsilon=1.0)
    assert [e.kind for e in store.events(a)] == ["step", "eval"]
    assert store.events(a, "eval")[0].metrics == {"accuracy": 0.9}
    assert (store.run_dir(a) / "config.json").exists()
    store.delete_run(b)
    assert [r.run_id for r in store.list_runs()] == [a]
    with pytest.raises(RunNotFound):
        store.get_run(b)


def test_failed_run_keeps_what_was_recorded(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create_run(RunConfig())
    store.set_status(rid, "running")
    store.add_event(Event("step", rid, step=1))
    store.set_status(rid, "failed", error="RuntimeError: boom")
    rec = store.get_run(rid)
    assert rec.status == "failed" and "boom" in rec.error
    assert len(store.events(rid)) == 1


def test_concurrent_writers(tmp_path):
    store = RunStore(tmp_path)
    ids = [store.create_run(RunConfig()) for _ in range(4)]

    def write(rid):
        for i in range(25):
            store.add_event(Event("step", rid, step=i))

    threads = [threading.Thread(target=write, args=(rid,)) for rid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(store.events(rid)) == 25 for rid in ids)


def test_bad_run_ids_are_rejected(tmp_path):
    store = RunStore(tmp_path)
    for bad in ["../etc", "", ".hidden"]:
        with pytest.raises(RunNotFound):
            store.run_dir(bad)


def test_orphaned_runs_of_dead_processes_are_marked_failed(tmp_path):
    import sqlite3
    import subprocess
    import sys

    store = RunStore(tmp_path)
    mine = store.create_run(RunConfig())
    store.set_status(mine, "running")
    orphan = store.create_run(RunConfig())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with sqlite3.connect(store.db_path) as db:  # as if a now-dead process had started it
        db.execute("UPDATE runs SET status='running', pid=? WHERE run_id=?", (int(dead.stdout), orphan))
    assert store.reap_orphans() == [orphan]
    assert store.get_run(orphan).status == "failed" and "interrupted" in store.get_run(orphan).error
    assert store.get_run(mine).status == "running"  # this process is alive
