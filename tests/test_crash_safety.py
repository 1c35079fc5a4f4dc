"""The run store survives what a machine does to it: a training process killed mid-run (SIGKILL, SIGTERM),
pid reuse, a crash in the middle of writing an artefact, a full disk, a read-only runs folder, and an index
truncated or overwritten (rebuilt by `python -m dpcore reindex`)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import dpcore.store.runs as store_mod
from dpcore.cli import main as cli
from dpcore.config import RunConfig
from dpcore.store.events import Event
from dpcore.process import alive, own_token, start_token
from dpcore.store.runs import (LAST_ARTEFACT, RunStore, StoreCorruptError, StoreWriteError, atomic_write, reindex)

ROOT = Path(__file__).resolve().parents[1]
LINUX = Path("/proc/self/stat").exists()
TINY = {"dataset": "digits", "backbone": "tiny_cnn", "image_size": 16, "epochs": 1, "batch_size": 64,
        "max_physical_batch_size": 64, "epsilon": 2.0, "device": "cpu"}

CHILD = textwrap.dedent("""
    import sys, time
    from dpcore.config import RunConfig
    from dpcore.store.events import Event
    from dpcore.store.runs import RunStore
    store = RunStore(sys.argv[1])
    run_id = store.create_run(RunConfig())
    store.set_status(run_id, "running")
    time.sleep(0.6)
    store.add_event(Event("step", run_id, step=1, loss=0.5))
    print(run_id, flush=True)
    time.sleep(300)
""")


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> tuple[Path, str]:
    """A runs folder with one finished DP run (card, weights, predictions) and one failed run (no card)."""
    from dpcore.training.trainer import train

    root = tmp_path_factory.mktemp("crash_runs")
    store = RunStore(root)
    result = train(RunConfig(**TINY), store)
    assert result.status == "done"
    failed = store.create_run(RunConfig(**TINY))
    store.set_status(failed, "running")
    store.add_event(Event("step", failed, step=1))
    store.set_status(failed, "failed", error="RuntimeError: boom")
    return root, result.run_id, failed


def _copy(finished_runs, tmp_path) -> tuple[Path, str, str]:
    src, done, failed = finished_runs
    root = tmp_path / "runs"
    shutil.copytree(src, root)
    return root, done, failed


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# -- 1. killed processes are reaped at the next opening, with the time of their last event ---------------
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_cli_run_is_failed_at_the_next_opening_with_its_true_duration(tmp_path, capsys, sig):
    root = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=str(ROOT))
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, "the child never created its run"
        assert RunStore(root).get_run(run_id).status == "running"  # alive: an opening leaves it alone
        time.sleep(1.5)
        killed_at = time.time()
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rec = RunStore(root).get_run(run_id)  # a fresh opening, as `python -m dpcore runs` does
    assert rec.status == "failed"
    assert f"pid {proc.pid}" in rec.error and "killed or crashed" in rec.error
    assert 0.4 <= rec.duration <= 1.4, rec.duration  # up to its last stored event, not until the reaping
    assert rec.finished_at < killed_at
    code, out, _ = _run_cli(capsys, "runs", "--runs-dir", str(root))
    assert code == 0 and run_id in out and "failed" in out and "running" not in out


def test_a_reused_pid_is_not_the_owner(tmp_path):
    store = RunStore(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ids = {name: store.create_run(RunConfig()) for name in ("live", "reused", "mine_reused", "mine", "legacy")}
        for run_id in ids.values():
            store.set_status(run_id, "running")
        with sqlite3.connect(store.db_path) as db:
            db.execute("UPDATE runs SET pid=?, pid_start=? WHERE run_id=?",
                       (other.pid, start_token(other.pid), ids["live"]))
            db.execute("UPDATE runs SET pid=?, pid_start=? WHERE run_id=?",
                       (other.pid, "another-boot/12345", ids["reused"]))
            db.execute("UPDATE runs SET pid_start=? WHERE run_id=?", ("another-boot/1", ids["mine_reused"]))
            db.execute("UPDATE runs SET pid=?, pid_start=NULL WHERE run_id=?", (other.pid, ids["legacy"]))
        status = {name: r.status for name, r in zip(ids, (RunStore(tmp_path).get_run(i) for i in ids.values()))}
    finally:
        other.kill()
        other.wait()
    expected_dead = {"reused", "mine_reused"} if LINUX else set()  # without /proc: the pid alone
    assert {n for n, s in status.items() if s == "failed"} == expected_dead
    assert status["live"] == status["mine"] == status["legacy"] == "running"


@pytest.mark.skipif(not LINUX, reason="start times come from /proc")
def test_start_tokens_come_from_proc_stat_field_22():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert start_token(child.pid).endswith("/" + fields[19])  # field 22 of the whole line
        assert start_token(child.pid) != own_token() and own_token() == start_token(os.getpid())
        assert alive(child.pid, start_token(child.pid)) and not alive(child.pid, "x/1")
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid, None)


@pytest.mark.skipif(not LINUX, reason="zombies are read from /proc")
def test_an_exited_child_not_yet_waited_for_is_dead(tmp_path):
    store = RunStore(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    token = None
    deadline = time.time() + 30
    while time.time() < deadline:  # until it has exited (a zombie: its parent has not waited yet)
        raw = Path(f"/proc/{child.pid}/stat").read_text()
        token = token or start_token(child.pid)
        if raw.rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    run_id = store.create_run(RunConfig())
    store.set_status(run_id, "running")
    with sqlite3.connect(store.db_path) as db:
        db.execute("UPDATE runs SET pid=?, pid_start=? WHERE run_id=?", (child.pid, token, run_id))
    try:
        assert store.reap_orphans() == [run_id]
    finally:
        child.wait()


def test_a_queued_run_of_a_dead_process_and_a_legacy_index(tmp_path):
    """An index made before start times and event times were stored opens, gains the columns and is reaped."""
    root = tmp_path / "runs"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    config = RunConfig()
    old_schema = """
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, status TEXT NOT NULL, dataset TEXT NOT NULL,
            backbone TEXT NOT NULL, private INTEGER NOT NULL, target_epsilon REAL, config TEXT NOT NULL,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL, metrics TEXT, privacy TEXT, error TEXT,
            pid INTEGER);
        CREATE TABLE events (run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, step INTEGER,
            body TEXT NOT NULL, PRIMARY KEY (run_id, seq));"""
    now = time.time()
    with sqlite3.connect(root / "index.sqlite") as db:
        db.executescript(old_schema)
        for seq, (rid, status, started) in enumerate([("20260101-000000-aaaaaa", "queued", None),
                                                      ("20260101-000001-bbbbbb", "running", now - 100)], 1):
            (root / rid).mkdir()
            (root / rid / "config.json").write_text(config.to_json())
            db.execute("INSERT INTO runs (run_id, seq, status, dataset, backbone, private, config, created_at, "
                       "started_at, pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (rid, seq, status, config.dataset, config.backbone, 1, config.to_json(), now - 200, started,
                        pid))
        body = Event("step", "20260101-000001-bbbbbb", step=3, elapsed=42.0).to_dict()
        db.execute("INSERT INTO events VALUES (?, 1, 'step', 3, ?)", ("20260101-000001-bbbbbb", json.dumps(body)))
    store = RunStore(root)
    queued, running = store.list_runs()
    assert queued.status == running.status == "failed"
    assert "queued it" in queued.error and f"pid {pid}" in running.error
    assert running.duration == pytest.approx(42.0, abs=0.01)  # from the event's own clock: no stored time
    with sqlite3.connect(root / "index.sqlite") as db:
        assert {"pid_start", "reaped_at"} <= {r[1] for r in db.execute("PRAGMA table_info(runs)")}
        assert "at" in {r[1] for r in db.execute("PRAGMA table_info(events)")}


def test_a_run_that_wrote_its_card_but_not_its_status_is_reaped_as_done(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run(RunConfig())
    store.set_status(run_id, "running")
    store.write_json(run_id, LAST_ARTEFACT, {"status": "done", "test_metrics": {"accuracy": 0.75},
                                            "privacy": {"epsilon": 1.5}, "training": {"duration_s": 12.0}})
    with sqlite3.connect(store.db_path) as db:
        db.execute("UPDATE runs SET pid=999999999, pid_start=NULL WHERE run_id=?", (run_id,))
    rec = RunStore(tmp_path).get_run(run_id)
    assert rec.status == "done" and rec.metrics == {"accuracy": 0.75} and rec.privacy == {"epsilon": 1.5}
    assert rec.duration == pytest.approx(12.0) and rec.error is None


def test_a_supervisor_can_replace_the_reapers_reason(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run(RunConfig())
    store.set_status(run_id, "running")
    with sqlite3.connect(store.db_path) as db:
        db.execute("UPDATE runs SET pid=999999999, pid_start=NULL WHERE run_id=?", (run_id,))
    assert store.reap_orphans() == [run_id]
    assert store.record_death(run_id, "failed", "the training process was killed: SIGKILL")
    assert "SIGKILL" in store.get_run(run_id).error
    done = store.create_run(RunConfig())
    store.set_status(done, "done")
    assert not store.record_death(done, "failed", "late")  # it recorded its own outcome
    assert store.get_run(done).status == "done"


# -- 2. atomic artefacts ---------------------------------------------------------------------------------
def test_atomic_write_replaces_whole_files_or_nothing(tmp_path):
    path = tmp_path / "card.json"
    atomic_write(path, '{"a": 1}')
    assert json.loads(path.read_text()) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # like an ordinary file, not mkstemp's 0600
    atomic_write(path, b'{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}

    def half_then_crash(tmp):
        Path(tmp).write_text('{"a": 3, "trunc')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]  # no temporary file left behind

    npz = tmp_path / "test_predictions.npz"  # np.savez adds .npz unless the name ends with it: the temp does
    atomic_write(npz, lambda tmp: np.savez(tmp, probs=np.eye(2)))
    assert np.load(npz)["probs"].tolist() == [[1, 0], [0, 1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json", "test_predictions.npz"]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_write_json_is_atomic_and_durable(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    run_id = store.create_run(RunConfig())
    store.write_json(run_id, "card.json", {"v": 1})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", no_rename)
    with pytest.raises(StoreWriteError, match="full"):
        store.write_json(run_id, "card.json", {"v": 2})
    monkeypatch.undo()
    assert json.loads((store.run_dir(run_id) / "card.json").read_text()) == {"v": 1}
    assert synced, "the temporary file was not fsynced"
    assert sorted(p.name for p in store.run_dir(run_id).iterdir()) == ["card.json", "config.json"]
    assert store.is_complete(run_id)
    assert not RunStore(tmp_path).is_complete(store.create_run(RunConfig()))


def test_save_model_writes_a_temporary_file_then_renames_it(tmp_path, monkeypatch):
    import torch

    from dpcore.store import model_io

    path = tmp_path / "model.safetensors"
    model = torch.nn.Linear(3, 2)
    model_io.save_model(model, path, ["a", "b"], {"input_size": [3]}, "r1")
    before = path.read_bytes()
    real = model_io._st_save_model
    seen = []

    def crash_midway(m, filename, metadata=None):
        seen.append(filename)
        real(m, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:20])  # half written, then the process "dies"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io, "_st_save_model", crash_midway)
    with pytest.raises(OSError):
        model_io.save_model(torch.nn.Linear(3, 2), path, ["a", "b"], {"input_size": [3]}, "r2")
    assert seen and Path(seen[0]).parent == tmp_path and Path(seen[0]) != path
    assert path.read_bytes() == before and model_io.read_metadata(path)["run_id"] == "r1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# -- 3. a full disk, a read-only runs folder ----------------------------------------------------------------
def test_failure_paths_raise_a_clear_error_on_a_full_disk(tmp_path, monkeypatch, capsys):
    store = RunStore(tmp_path)
    run_id = store.create_run(RunConfig())
    store.set_status(run_id, "running")
    real = sqlite3.connect
    with monkeypatch.context() as m:
        m.setattr(store_mod.sqlite3, "connect", lambda *a, **k: _capped(real(*a, **k)))
        with pytest.raises(StoreWriteError) as info:
            store.add_events([Event("log", run_id, message="x" * 4000) for _ in range(40)])
        assert "full" in str(info.value) and "Fix:" in str(info.value)
        assert not isinstance(info.value, sqlite3.Error)
        with pytest.raises(StoreWriteError, match="full"):
            store.set_status(run_id, "failed", error="RuntimeError: boom\n" + "trace " * 5000)
        code, out, _ = _run_cli(capsys, "runs", "--runs-dir", str(tmp_path))  # reading still works
        assert code == 0 and run_id in out


def _capped(db: sqlite3.Connection) -> sqlite3.Connection:
    """SQLite's own SQLITE_FULL, as on a full disk: the file may not grow past its current size."""
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
    return db


def test_failure_paths_raise_a_clear_error_when_the_index_turns_read_only(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    run_id = store.create_run(RunConfig())
    store.set_status(run_id, "running")
    real = sqlite3.connect

    def read_only(database, *args, **kwargs):  # e.g. the file system was remounted read-only mid-run
        kwargs.pop("uri", None)
        return real(Path(database).resolve().as_uri() + "?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(store_mod.sqlite3, "connect", read_only)
    for status in ("failed", "cancelled"):
        with pytest.raises(StoreWriteError, match="may not be written") as info:
            store.set_status(run_id, status, error="interrupted")
        assert "Fix:" in str(info.value)
    with pytest.raises(StoreWriteError):
        store.add_events([Event("failed", run_id, message="boom")])


def test_the_trainers_failure_handler_reports_a_store_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    """`_Run.fail` records what it could; the message names the store problem, not a bare sqlite error."""
    from dpcore.training.trainer import _Run

    store = RunStore(tmp_path)
    run_id = store.create_run(RunConfig())
    store.set_status(run_id, "running")
    run = _Run(RunConfig(), store.add_event, __import__("threading").Event(), time.time(), run_id=run_id,
               store=store)
    monkeypatch.setattr(store, "readonly", True)
    run.fail("failed", "RuntimeError: boom")
    err = capsys.readouterr().err
    assert "StoreWriteError" in err and "read-only" in err and "OperationalError" not in err


def test_read_only_runs_folder_lists_and_prints_cards_without_writing(finished_runs, tmp_path, monkeypatch, capsys):
    """chmod -w on the folder and its files. As root chmod does not stop writes, so the probe of writability
    is told the truth (not writable) as well: the store must then open the index with SQLite's mode=ro."""
    root, done, failed = _copy(finished_runs, tmp_path)
    orphan = RunStore(root).create_run(RunConfig())
    with sqlite3.connect(root / "index.sqlite") as db:  # a dead process's run: not reaped without write access
        db.execute("UPDATE runs SET status='running', pid=999999999, pid_start=NULL WHERE run_id=?", (orphan,))
    paths = [root, *root.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)
    if os.geteuid() == 0:
        monkeypatch.setattr(store_mod, "_can_write", lambda path: False)
    try:
        before = _snapshot(root)
        store = RunStore(root)
        assert store.readonly
        code, out, err = _run_cli(capsys, "runs", "--runs-dir", str(root))
        assert code == 0, err
        assert done in out and failed in out and orphan in out
        code, out, err = _run_cli(capsys, "card", done, "--runs-dir", str(root))
        assert code == 0 and f"run {done}" in out, err
        assert len(store.events(done)) > 0 and store.get_run(orphan).status == "running"
        with pytest.raises(StoreWriteError, match="read-only"):
            store.set_status(orphan, "failed", error="x")
        with pytest.raises(StoreWriteError, match="read-only"):
            store.create_run(RunConfig())
        with pytest.raises(StoreWriteError, match="read-only"):
            store.write_json(done, "fairness.json", {})
        assert _snapshot(root) == before  # nothing written: no -wal, no -shm, no reaping
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))


def test_an_unreadable_wal_needs_no_write_access(tmp_path, monkeypatch):
    """A read-only opening of an index in WAL mode whose -shm cannot be made falls back to immutable reading."""
    store = RunStore(tmp_path)
    run_id = store.create_run(RunConfig())
    real = sqlite3.connect
    calls = []

    def no_shm(database, *args, **kwargs):
        calls.append(str(database))
        if kwargs.get("uri") and "immutable" not in str(database):
            db = real(":memory:")
            db.execute("PRAGMA query_only = 1")

            class Failing:  # the first query of a mode=ro WAL index in a read-only folder fails like this
                def execute(self, *a, **k):
                    raise sqlite3.OperationalError("unable to open database file")

                def close(self):
                    db.close()
            return Failing()
        return real(database, *args, **kwargs)

    monkeypatch.setattr(store_mod.sqlite3, "connect", no_shm)
    ro = RunStore(tmp_path, readonly=True)
    assert [r.run_id for r in ro.list_runs()] == [run_id]
    assert any("immutable=1" in c for c in calls)


# -- 4. a lost or damaged index, and reindex ----------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "bad pages"])
def test_a_damaged_index_is_named_with_the_fix(finished_runs, tmp_path, capsys, damage):
    root, done, failed = _copy(finished_runs, tmp_path)
    index = root / "index.sqlite"
    if damage == "truncated":
        index.write_bytes(b"")
    elif damage == "garbage":
        index.write_bytes(os.urandom(8192))
    elif damage == "missing":
        index.unlink()
    else:
        raw = bytearray(index.read_bytes())
        for offset in range(4096, len(raw), 4096):
            raw[offset:offset + 64] = b"\xff" * 64
        index.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="reindex"):
        RunStore(root)
    code, out, err = _run_cli(capsys, "runs", "--runs-dir", str(root))
    assert code == 2 and "no runs" not in out and "Traceback" not in err
    assert "reindex --runs-dir" in err
    code, out, _ = _run_cli(capsys, "reindex", "--check", "--runs-dir", str(root))
    assert code == 1 and "damaged" in out


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_reindex_restores_the_runs_with_their_status_and_metrics(finished_runs, tmp_path, capsys, damage):
    root, done, failed = _copy(finished_runs, tmp_path)
    original = {r.run_id: r for r in RunStore(root).list_runs()}
    index = root / "index.sqlite"
    index.write_bytes(b"" if damage == "truncated" else os.urandom(6000))
    damaged = index.read_bytes()
    code, out, _ = _run_cli(capsys, "reindex", "--runs-dir", str(root))
    assert code == 0, out
    summary = json.loads(out.strip().splitlines()[-1].split(" ", 1)[1])
    assert summary["runs"][done] == {"status": "done", "source": "card"}
    assert summary["runs"][failed]["status"] == "failed" and "LOST" in out
    aside = Path(summary["old_index"])
    assert aside.parent == root and aside.name.startswith("index.damaged-") and aside.read_bytes() == damaged
    store = RunStore(root)
    runs = {r.run_id: r for r in store.list_runs()}
    assert list(runs) == [done, failed]
    rec = runs[done]
    assert rec.status == "done" and rec.metrics == original[done].metrics
    assert rec.privacy["epsilon"] == pytest.approx(original[done].privacy["epsilon"])
    assert rec.config == original[done].config
    assert abs(rec.duration - original[done].duration) < 2.0
    assert runs[failed].status == "failed" and "reindex" in runs[failed].error
    assert store.card(done)["run_id"] == done
    code, out, _ = _run_cli(capsys, "runs", "--runs-dir", str(root))
    assert code == 0 and done in out and "done" in out
    code, out, _ = _run_cli(capsys, "reindex", "--check", "--runs-dir", str(root))
    assert code == 0 and "index sound" in out


def test_reindex_of_a_sound_index_keeps_its_rows_and_events(finished_runs, tmp_path, capsys):
    root, done, failed = _copy(finished_runs, tmp_path)
    before = RunStore(root)
    events = {rid: len(before.events(rid)) for rid in (done, failed)}
    errors = {r.run_id: r.error for r in before.list_runs()}
    report = reindex(root)
    assert report.old_state == "sound" and report.old_index.name.startswith("index.old-")
    assert report.events_kept == events and not report.events_lost
    after = RunStore(root)
    assert {r.run_id: r.error for r in after.list_runs()} == errors  # "RuntimeError: boom" survives
    assert {rid: len(after.events(rid)) for rid in (done, failed)} == events


def test_reindex_refuses_while_a_run_trains_in_a_live_process(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run(RunConfig())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with sqlite3.connect(store.db_path) as db:
            db.execute("UPDATE runs SET status='running', pid=?, pid_start=? WHERE run_id=?",
                       (other.pid, start_token(other.pid), run_id))
        with pytest.raises(store_mod.StoreError, match="still queued or training"):
            reindex(tmp_path)
        assert [r.run_id for r in RunStore(tmp_path).list_runs()] == [run_id]
    finally:
        other.kill()
        other.wait()


def test_the_app_names_a_damaged_index_and_the_fix(tmp_path, monkeypatch):
    """With error details hidden (client.showErrorDetails), the app still says what is wrong and what to do.
    (Home: app.py runs it through st.navigation, which catches the store's errors.)"""
    import streamlit as st

    from apptest_support import open_page, texts

    root = tmp_path / "runs"
    RunStore(root).create_run(RunConfig())
    (root / "index.sqlite").write_bytes(b"")
    st.cache_resource.clear()
    try:
        at = open_page("pages/home.py", root, monkeypatch)
        assert "is empty (0 bytes)" in texts(at) and "reindex --runs-dir" in texts(at)
    finally:
        st.cache_resource.clear()
