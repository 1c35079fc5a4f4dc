"""Persisted runs: a folder per run plus an SQLite index of status, config, metrics and all events.

Each write opens its own short-lived connection, so the store is safe to use from the training
thread and from UI threads at once (SQLite serialises writers; WAL lets readers go on).

What survives what:

* The run folders are the truth; the index (`index.sqlite`) is rebuilt from them by
  `python -m dpcore reindex` (`reindex`) if it is lost or damaged. Every artefact is written with
  `atomic_write` (a temporary file in the same folder, fsync, rename, fsync of the folder), so a crash
  leaves either the old file or the new one, never half of one.
* A training writes `config.json` first (at creation) and `card.json` LAST (`LAST_ARTEFACT`): after the
  weights and the test predictions, and before the index says `done`. A folder without `card.json` is an
  unfinished run (failed, queued, killed). Later analyses (fairness, audits) may add files after it.
* A run's owner is its process: pid plus start time (`dpcore.process.start_token`). Opening the store
  (`RunStore(...)`) and `list_runs` mark queued/running runs whose owner is gone as failed ("reaping"),
  with the time of their last stored event as their finish time; a read-only store is not reaped.
* Failures to write (disk full, read-only folder, locked) raise `StoreWriteError`, a damaged index raises
  `StoreCorruptError`; both say what to do. A runs folder that may not be written is opened read-only.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from dpcore.config import RunConfig
from dpcore.errors import DPCoreError
from dpcore.store.events import Event
from dpcore.process import alive, own_token

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
INDEX = "index.sqlite"
LAST_ARTEFACT = "card.json"  # written last by a finishing run: a folder without it is incomplete
SQLITE_HEADER = b"SQLite format 3\x00"
RUN_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    dataset TEXT NOT NULL,
    backbone TEXT NOT NULL,
    private INTEGER NOT NULL,
    target_epsilon REAL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    metrics TEXT,
    privacy TEXT,
    error TEXT,
    pid INTEGER,
    pid_start TEXT,
    reaped_at REAL
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER,
    body TEXT NOT NULL,
    at REAL,
    PRIMARY KEY (run_id, seq)
);
"""
# Columns added after the first stores were made: (table, column, type). Older index files get them on
# their first writable opening; a read-only opening reads them as they are.
_MIGRATIONS = (("runs", "pid", "INTEGER"),  # the owning process
               ("runs", "pid_start", "TEXT"),  # its start token (pid reuse)
               ("runs", "reaped_at", "REAL"),  # when the store marked the run failed because its owner died
               ("events", "at", "REAL"))  # when the event was stored (a reaped run's finish time)

_CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
_FULL, _IOERR, _READONLY, _PERM, _CANTOPEN, _BUSY, _LOCKED = 13, 10, 8, 3, 14, 5, 6


class RunNotFound(DPCoreError):
    pass


class StoreError(DPCoreError):
    """The run store could not be read or written."""


class StoreWriteError(StoreError):
    """Something could not be written to the runs folder (disk full, read-only, locked): says which and the fix."""


class StoreCorruptError(StoreError):
    """The index is missing, empty or damaged while run folders exist; `python -m dpcore reindex` rebuilds it."""


# -- files ----------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], Any]) -> Path:
    """Replace `path` all at once: the old content or the new one survives a crash, never a mix.

    `data` is the content (bytes, or text written as UTF-8), or a callable that writes the file at the
    path it is given (e.g. ``lambda tmp: np.savez(tmp, ...)``; that path ends with the same suffix as
    `path`, so writers that add a suffix do not). The temporary file lives in the same folder (one file
    system, so the rename is atomic), is flushed and fsynced, renamed over `path` with `os.replace`, and
    the folder is fsynced so the rename itself survives a power cut. On any error the temporary file is
    removed and the error raised; `path` is untouched. Returns `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        if callable(data):
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _can_write(path: Path) -> bool:
    """Whether this process may write `path` (a folder: create files in it). Tests replace it."""
    return os.access(path, os.W_OK)


def _os_fix(exc: OSError, root: Path) -> str:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"the disk holding {root} is full. Fix: free space there (`df -h {root}`), or point --runs-dir / "
                "DPCORE_RUNS_DIR at a folder on another disk, and run again")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"{root} may not be written (a read-only file system or its permissions). Fix: make the folder "
                "and its files writable by this user, or point --runs-dir / DPCORE_RUNS_DIR at a writable folder")
    return f"Fix: check the disk holding {root} (`df -h {root}`) and run again"


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    status: str
    dataset: str
    backbone: str
    private: bool
    target_epsilon: float | None
    config: RunConfig
    created_at: float
    started_at: float | None
    finished_at: float | None
    metrics: dict[str, Any] | None
    privacy: dict[str, Any] | None
    error: str | None

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at


class BufferedEventWriter:
    """Listener that writes a run's events to the store in batches.

    Step events are held for at most `max_delay` seconds (or `max_events`); any other event (eval,
    log, finished, failed, ...) flushes at once, so nothing is lost when a run ends or crashes.
    Live views read the job's in-memory event log, so the delay only affects other processes.
    """

    def __init__(self, store: "RunStore", max_events: int = 100, max_delay: float = 1.0):
        self.store, self.max_events, self.max_delay = store, max_events, max_delay
        self._pending: list[Event] = []
        self._last_flush = time.time()

    def __call__(self, event: Event) -> None:
        self._pending.append(event)
        if (event.kind != "step" or len(self._pending) >= self.max_events
                or time.time() - self._last_flush >= self.max_delay):
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self.store.add_events(pending)
        self._last_flush = time.time()


class RunStore:
    """`runs/` (or any folder): `index.sqlite` + `RUN_ID/{config.json, model.safetensors, card.json}`.

    ``readonly=None`` (the default) opens the store read-only when the folder or the index may not be
    written (reads work, writes raise `StoreWriteError`, nothing is reaped); True forces that, False
    requires write access. Opening checks the index (`StoreCorruptError` when it is missing or empty
    while run folders exist, or damaged) and reaps the runs of dead processes.
    """

    def __init__(self, root: str | Path = "runs", *, readonly: bool | None = None):
        self.root = Path(root)
        self.db_path = self.root / INDEX
        self._readonly_reason = "it was opened read-only"
        if readonly is None:
            if not self.root.exists():
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    readonly, self._readonly_reason = True, f"it could not be created ({exc.strerror})"
            if readonly is None:
                readonly = not (_can_write(self.root) and (not self.db_path.exists() or _can_write(self.db_path)))
                if readonly:
                    self._readonly_reason = "this user may not write it"
        elif not readonly:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreWriteError(f"cannot create the runs folder {self.root}: {exc.strerror}. "
                                      f"{_os_fix(exc, self.root)}") from exc
        self.readonly = bool(readonly)
        self._check_index()
        if not self.readonly:
            try:
                self._initialise()
            except StoreWriteError as exc:  # e.g. a full disk while migrating: reading still works
                self.readonly, self._readonly_reason = True, f"preparing the index failed ({exc})"
        self._reap_quietly()

    # -- opening -----------------------------------------------------------------------------
    def _check_index(self) -> None:
        """Refuse a missing, empty or non-SQLite index while run folders exist (it would read as 'no runs')."""
        try:
            size = self.db_path.stat().st_size
        except FileNotFoundError:
            size = None
        except OSError as exc:
            raise StoreError(f"cannot read {self.db_path}: {exc.strerror}. {_os_fix(exc, self.root)}") from exc
        if not size:
            folders = run_folders(self.root)
            if folders:
                what = "missing" if size is None else "empty (0 bytes)"
                raise StoreCorruptError(
                    f"the run index {self.db_path} is {what}, but {len(folders)} run folder(s) are in {self.root}: "
                    f"the index was lost (truncated by a crash or a full disk, or deleted), the runs were not. "
                    f"{self._reindex_fix()}")
            return
        try:
            with open(self.db_path, "rb") as fh:
                head = fh.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise StoreError(f"cannot read {self.db_path}: {exc.strerror}. {_os_fix(exc, self.root)}") from exc
        if head != SQLITE_HEADER:
            raise StoreCorruptError(f"the run index {self.db_path} is not an SQLite database (its first bytes were "
                                    f"overwritten or it is another file). {self._reindex_fix()}")
        with self._connect(what="check the index") as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "runs" in tables:
                result = [r[0] for r in db.execute("PRAGMA quick_check(runs)")]
                if result != ["ok"]:
                    raise StoreCorruptError(f"the run index {self.db_path} is damaged (SQLite's check: "
                                            f"{'; '.join(map(str, result[:3]))}). {self._reindex_fix()}")

    def _initialise(self) -> None:
        with self._connect(write=True, what="prepare the index") as db:
            db.executescript(_SCHEMA)
            for table, column, kind in _MIGRATIONS:
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    try:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    except sqlite3.OperationalError as exc:  # another process added it first
                        if "duplicate column" not in str(exc):
                            raise

    def _reindex_fix(self) -> str:
        return (f"Fix: `python -m dpcore reindex --runs-dir {self.root}` rebuilds the index from the run folders "
                "(it keeps the old file beside it; stored step events can be lost, cards and weights are not)")

    def _open(self) -> sqlite3.Connection:
        if not self.readonly:
            db = sqlite3.connect(self.db_path, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
        elif not self.db_path.exists():
            db = sqlite3.connect(":memory:")  # nothing stored yet: an empty index
            db.executescript(_SCHEMA)
        else:
            uri = self.db_path.resolve().as_uri()
            db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30)
            try:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                # WAL needs its -shm file, which a read-only folder cannot hold: read the file as it is.
                db.close()
                db = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True)
        db.row_factory = sqlite3.Row
        return db

    def _require_writable(self, what: str) -> None:
        if self.readonly:
            raise StoreWriteError(
                f"cannot {what}: the runs folder {self.root} is open read-only ({self._readonly_reason}). "
                f"Fix: make {self.root} and {self.db_path} writable by this user (and free disk space if it is "
                "full), or point --runs-dir / DPCORE_RUNS_DIR at a writable folder")

    @contextmanager
    def _connect(self, write: bool = False, what: str = "read the index") -> Iterator[sqlite3.Connection]:
        if write:
            self._require_writable(what)
        try:
            db = self._open()
            try:
                with db:
                    yield db
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                raise  # a bug, not the disk
            raise self._translate(exc, what, write) from exc

    def _translate(self, exc: sqlite3.Error, what: str, write: bool) -> StoreError:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(exc)
        if primary in _CORRUPT_CODES or "not a database" in text or "malformed" in text:
            return StoreCorruptError(f"the run index {self.db_path} is damaged ({text}). {self._reindex_fix()}")
        if primary == _FULL or "full" in text:
            fix = (f"The disk holding {self.root} is full. Fix: free space there (`df -h {self.root}`) or point "
                   "--runs-dir / DPCORE_RUNS_DIR at a folder on another disk; what was stored before is kept")
        elif primary in (_READONLY, _PERM, _CANTOPEN) or "readonly" in text or "read-only" in text:
            fix = (f"{self.root} may not be written (a read-only file system or its permissions). Fix: make the "
                   "folder and index.sqlite writable by this user, or point --runs-dir / DPCORE_RUNS_DIR at a "
                   "writable folder")
        elif primary in (_BUSY, _LOCKED) or "locked" in text:
            fix = "Another process held the index locked for 30 s. Fix: wait for it to finish (or stop it) and retry"
        elif primary == _IOERR or "I/O" in text:
            fix = (f"The disk reported an I/O error (full, removed or failing). Fix: check it (`df -h {self.root}`), "
                   "free space and retry")
        else:
            fix = f"Fix: check {self.db_path} and the disk it is on"
        cls = StoreWriteError if write or primary in (_FULL, _READONLY) else StoreError
        return cls(f"could not {what} in {self.db_path} (SQLite: {text}). {fix}")

    # -- writing ---------------------------------------------------------------------------
    def create_run(self, config: RunConfig, status: str = "queued") -> str:
        self._require_writable("create a run")
        run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        run_dir = self.run_dir(run_id)
        try:
            run_dir.mkdir(parents=True)
            atomic_write(run_dir / "config.json", config.to_json())
        except OSError as exc:
            raise StoreWriteError(f"could not create the folder of a new run in {self.root}: {exc}. "
                                  f"{_os_fix(exc, self.root)}") from exc
        with self._connect(write=True, what=f"record the new run {run_id}") as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM runs").fetchone()[0]
            db.execute(
                "INSERT INTO runs (run_id, seq, status, dataset, backbone, private, target_epsilon, config, created_at,"
                " pid, pid_start) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, seq, status, config.dataset, config.backbone, int(config.private), config.epsilon,
                 config.to_json(), time.time(), os.getpid(), own_token()),
            )
        return run_id

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        """Record a status; "running" (and "queued" again) makes this process (pid + start time) the run's owner."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = time.time()
        with self._connect(write=True, what=f"record run {run_id} as {status}") as db:
            if status == "running":
                cur = db.execute("UPDATE runs SET status=?, started_at=?, pid=?, pid_start=?, reaped_at=NULL "
                                 "WHERE run_id=?",
                                 (status, now, os.getpid(), own_token(), run_id))
            elif status == "queued":  # queued again (a resume): this process will start it, so it owns it now
                cur = db.execute("UPDATE runs SET status=?, pid=?, pid_start=?, reaped_at=NULL WHERE run_id=?",
                                 (status, os.getpid(), own_token(), run_id))
            elif status in ("done", "failed", "cancelled"):
                cur = db.execute("UPDATE runs SET status=?, finished_at=?, error=?, reaped_at=NULL WHERE run_id=?",
                                 (status, now, error, run_id))
            else:
                cur = db.execute("UPDATE runs SET status=? WHERE run_id=?", (status, run_id))
            if cur.rowcount == 0:
                raise RunNotFound(f"no run {run_id!r} in {self.root}")

    def record_results(self, run_id: str, metrics: dict[str, Any] | None, privacy: dict[str, Any] | None) -> None:
        with self._connect(write=True, what=f"record the results of run {run_id}") as db:
            db.execute("UPDATE runs SET metrics=?, privacy=? WHERE run_id=?",
                       (json.dumps(metrics), json.dumps(privacy), run_id))

    def add_event(self, event: Event) -> None:
        self.add_events([event])

    def add_events(self, events: list[Event]) -> None:
        """Append events in one transaction (one commit per step costs ~10 ms; a batch costs the same)."""
        if not events:
            return
        now = time.time()
        with self._connect(write=True, what=f"store {len(events)} event(s) of run {events[0].run_id}") as db:
            for event in events:
                seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id=?",
                                 (event.run_id,)).fetchone()[0]
                db.execute("INSERT INTO events (run_id, seq, kind, step, body, at) VALUES (?, ?, ?, ?, ?, ?)",
                           (event.run_id, seq, event.kind, event.step, json.dumps(event.to_dict()), now))

    def write_json(self, run_id: str, name: str, payload: dict[str, Any]) -> Path:
        """Write `<run>/<name>` atomically and durably (`atomic_write`)."""
        path = self.run_dir(run_id) / name
        text = json.dumps(payload, indent=2, sort_keys=True, default=str)
        self._require_writable(f"write {name} of run {run_id}")
        try:
            return atomic_write(path, text)
        except OSError as exc:
            raise StoreWriteError(f"could not write {path}: {exc.strerror or exc}. {_os_fix(exc, self.root)}") from exc

    def reap_orphans(self) -> list[str]:
        """Mark queued/running runs whose process has died as failed, so they don't look alive forever.

        A run belongs to the process that queued or trains it (its pid and start time are recorded); if that
        process is gone, nothing will ever finish the run. Its finish time is its last stored event. A run
        whose card was written (it finished, the index was not told) gets the card's status instead.
        Returns the run ids it marked; a read-only store reaps nothing.
        """
        if self.readonly:
            return []
        with self._connect(what="look for runs of dead processes") as db:
            rows = db.execute("SELECT * FROM runs WHERE status IN ('queued', 'running')").fetchall()
        return self._reap_rows(rows)

    def _reap_quietly(self, rows: list[sqlite3.Row] | None = None) -> list[str]:
        """Reaping when the store is opened or listed: a store that cannot be written just isn't reaped now."""
        if self.readonly:
            return []
        try:
            return self.reap_orphans() if rows is None else self._reap_rows(rows)
        except StoreWriteError:
            return []

    def _reap_rows(self, rows: list[sqlite3.Row]) -> list[str]:
        dead = [r for r in rows if r["status"] in ACTIVE and not alive(r["pid"], _get(r, "pid_start"))]
        return [r["run_id"] for r in dead if self._reap(r)]

    def _reap(self, row: sqlite3.Row) -> bool:
        run_id, pid, status = row["run_id"], row["pid"], row["status"]
        card = self._card_if_any(run_id)
        with self._connect(write=True, what=f"mark run {run_id} interrupted") as db:
            last = self._last_event_time(db, run_id, row["started_at"])
            started = row["started_at"]
            if card is not None and card.get("status") in ("done", "cancelled"):
                # It finished (the card is written last) but died before the index said so.
                duration = (card.get("training") or {}).get("duration_s")
                finished = started + duration if started is not None and duration is not None else (
                    last or time.time())
                cur = db.execute(
                    "UPDATE runs SET status=?, finished_at=?, metrics=?, privacy=?, error=NULL, reaped_at=? "
                    "WHERE run_id=? AND status=? AND pid IS ?",
                    (card["status"], finished, json.dumps(card.get("test_metrics")), json.dumps(card.get("privacy")),
                     time.time(), run_id, status, pid))
                return cur.rowcount > 0
            if status == "running":
                error = f"interrupted: its process (pid {pid}) ended without finishing: killed or crashed"
            else:
                error = f"interrupted: the process that queued it (pid {pid}) ended before it started"
            finished = max(t for t in (last, started, row["created_at"]) if t is not None)
            cur = db.execute("UPDATE runs SET status='failed', finished_at=?, error=?, reaped_at=? "
                             "WHERE run_id=? AND status=? AND pid IS ?",
                             (finished, error, time.time(), run_id, status, pid))
            return cur.rowcount > 0

    @staticmethod
    def _last_event_time(db: sqlite3.Connection, run_id: str, started_at: float | None) -> float | None:
        """When the run's last event was stored (events stored before times were kept: its own clock)."""
        last = db.execute("SELECT MAX(at) FROM events WHERE run_id=?", (run_id,)).fetchone()[0]
        if last is None and started_at is not None:
            try:
                elapsed = db.execute("SELECT MAX(json_extract(body, '$.elapsed')) FROM events WHERE run_id=?",
                                     (run_id,)).fetchone()[0]
            except sqlite3.OperationalError:  # an SQLite without JSON functions
                elapsed = None
            last = started_at + float(elapsed) if elapsed else None
        return last

    def record_death(self, run_id: str, status: str, reason: str) -> bool:
        """For a supervisor whose child process died: mark the run `status` with `reason` unless it recorded
        its own outcome. A run the store already reaped (failed with a generic reason) gets this one instead.
        Its finish time is its last stored event. Returns whether anything was written."""
        if status not in ("failed", "cancelled"):
            raise ValueError(f"a death is failed or cancelled, not {status!r}")
        with self._connect(write=True, what=f"record run {run_id} as {status}") as db:
            row = db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(f"no run {run_id!r} in {self.root}")
            if row["status"] not in ACTIVE and not (row["status"] == "failed" and _get(row, "reaped_at")):
                return False
            last = self._last_event_time(db, run_id, row["started_at"])
            finished = max(t for t in (last, row["started_at"], row["created_at"]) if t is not None)
            db.execute("UPDATE runs SET status=?, finished_at=?, error=?, reaped_at=NULL WHERE run_id=?",
                       (status, finished, reason, run_id))
            return True

    def delete_run(self, run_id: str) -> None:
        self.get_run(run_id)
        with self._connect(write=True, what=f"delete run {run_id}") as db:
            db.execute("DELETE FROM events WHERE run_id=?", (run_id,))
            db.execute("DELETE FROM runs WHERE run_id=?", (run_id,))
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RunNotFound(f"{run_id!r} is not a run id")
        return self.root / run_id

    def is_complete(self, run_id: str) -> bool:
        """Whether the run's folder holds every artefact of a finished training (its card, written last)."""
        return (self.run_dir(run_id) / LAST_ARTEFACT).is_file()

    def list_runs(self) -> list[RunRecord]:
        """All runs, oldest first (runs of dead processes are marked failed first)."""
        with self._connect(what="list the runs") as db:
            rows = db.execute("SELECT * FROM runs ORDER BY seq").fetchall()
        if self._reap_quietly([r for r in rows if r["status"] in ACTIVE]):
            with self._connect(what="list the runs") as db:
                rows = db.execute("SELECT * FROM runs ORDER BY seq").fetchall()
        return [self._record(r) for r in rows]

    def get_run(self, run_id: str) -> RunRecord:
        # Not reaped here: a supervisor (dpcore.training.worker) reads its dead child's run to record how it died.
        with self._connect(what=f"read run {run_id}") as db:
            row = db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.root}; `python -m dpcore runs --runs-dir {self.root}` "
                              "lists the runs")
        return self._record(row)

    def events(self, run_id: str, kind: str | None = None) -> list[Event]:
        query = "SELECT body FROM events WHERE run_id=?" + (" AND kind=?" if kind else "") + " ORDER BY seq"
        args = (run_id, kind) if kind else (run_id,)
        with self._connect(what=f"read the events of run {run_id}") as db:
            rows = db.execute(query, args).fetchall()
        return [Event.from_dict(json.loads(r["body"])) for r in rows]

    def card(self, run_id: str) -> dict[str, Any]:
        path = self.run_dir(run_id) / "card.json"
        if not path.exists():
            raise RunNotFound(f"run {run_id} has no model card (status: {self.get_run(run_id).status})")
        return json.loads(path.read_text())

    def _card_if_any(self, run_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.run_dir(run_id) / LAST_ARTEFACT).read_text())
        except (OSError, ValueError):
            return None

    def check(self) -> list[str]:
        """SQLite's full `quick_check` of the index (every table): ["ok"] when it is sound."""
        with self._connect(what="check the index") as db:
            return [str(r[0]) for r in db.execute("PRAGMA quick_check")]

    @staticmethod
    def _record(row: sqlite3.Row) -> RunRecord:
        return RunRecord(
            run_id=row["run_id"], status=row["status"], dataset=row["dataset"], backbone=row["backbone"],
            private=bool(row["private"]), target_epsilon=row["target_epsilon"],
            config=RunConfig.from_json(row["config"]), created_at=row["created_at"],
            started_at=row["started_at"], finished_at=row["finished_at"],
            metrics=json.loads(row["metrics"]) if row["metrics"] else None,
            privacy=json.loads(row["privacy"]) if row["privacy"] else None, error=row["error"],
        )


def _get(row: sqlite3.Row, key: str) -> Any:
    """A column that index files made before it existed (opened read-only) lack."""
    return row[key] if key in row.keys() else None


def run_folders(root: str | Path) -> list[Path]:
    """The run folders under `root` (named like a run id, holding config.json), oldest first."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    return sorted(Path(e.path) for e in entries
                  if RUN_ID_PATTERN.match(e.name) and e.is_dir() and os.path.isfile(os.path.join(e.path, "config.json")))


# -- rebuilding the index -------------------------------------------------------------------------
@dataclass
class ReindexReport:
    """What `reindex` did: the runs it indexed, from where, and what could not be recovered."""

    root: Path
    runs: list[tuple[str, str, str]] = field(default_factory=list)  # (run id, status, "card" | "old index" | "folder")
    events_kept: dict[str, int] = field(default_factory=dict)  # run id -> events recovered from the old index
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (folder, why)
    dropped: list[str] = field(default_factory=list)  # old index rows whose folder is gone
    old_index: Path | None = None  # where the previous index file was moved (never deleted)
    old_state: str = "absent"  # absent | empty | damaged | sound

    @property
    def events_lost(self) -> list[str]:
        return [rid for rid, _, _ in self.runs if rid not in self.events_kept]


def _utc_of_run_id(run_id: str) -> float | None:
    try:
        return datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def _salvage(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]], str]:
    """What can still be read from an old index file: its runs rows, its events per run, and its state."""
    rows: dict[str, dict[str, Any]] = {}
    events: dict[str, list[dict[str, Any]]] = {}
    try:
        size = path.stat().st_size
    except OSError:
        return rows, events, "absent"
    if size == 0:
        return rows, events, "empty"
    try:
        with open(path, "rb") as fh:
            if fh.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                return rows, events, "damaged"
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except (OSError, sqlite3.Error):
        return rows, events, "damaged"
    state = "sound"
    db.row_factory = sqlite3.Row
    try:
        try:
            if [r[0] for r in db.execute("PRAGMA quick_check")] != ["ok"]:
                state = "damaged"
        except sqlite3.Error:
            state = "damaged"
        try:
            for r in db.execute("SELECT * FROM runs"):
                rows[r["run_id"]] = dict(r)
        except sqlite3.Error:
            state = "damaged"
        for run_id in rows:
            try:
                events[run_id] = [dict(r) for r in db.execute("SELECT * FROM events WHERE run_id=? ORDER BY seq",
                                                              (run_id,))]
            except sqlite3.Error:
                state = "damaged"
                events.pop(run_id, None)
    finally:
        db.close()
    return rows, events, state


def _row_from_folder(folder: Path, config: RunConfig) -> tuple[dict[str, Any], str]:
    """The index row a run folder implies: finished (card.json) or not."""
    run_id = folder.name
    created = _utc_of_run_id(run_id) or (folder / "config.json").stat().st_mtime
    row: dict[str, Any] = {"run_id": run_id, "status": "failed", "created_at": created, "started_at": None,
                           "finished_at": None, "metrics": None, "privacy": None, "pid": None, "pid_start": None,
                           "reaped_at": None}
    try:
        card = json.loads((folder / LAST_ARTEFACT).read_text())
    except (OSError, ValueError):
        card = None
    if isinstance(card, dict) and card.get("status") in ("done", "cancelled"):
        try:
            finished = datetime.fromisoformat(card["date"]).timestamp()
        except (KeyError, TypeError, ValueError):
            finished = (folder / LAST_ARTEFACT).stat().st_mtime
        duration = (card.get("training") or {}).get("duration_s")
        row.update(status=card["status"], finished_at=finished,
                   started_at=finished - duration if isinstance(duration, (int, float)) else None,
                   metrics=json.dumps(card.get("test_metrics")), privacy=json.dumps(card.get("privacy")), error=None)
        return row, "card"
    why = "its card.json is unreadable" if (folder / LAST_ARTEFACT).exists() else "it has no card.json"
    row["error"] = (f"recovered by reindex: {why}, so the run never finished (it failed, was cancelled while queued, "
                    "or its process was killed); its reason and events were lost with the old index")
    return row, "folder"


def reindex(root: str | Path = "runs") -> ReindexReport:
    """Rebuild `root/index.sqlite` from the run folders (each has config.json; card.json once finished).

    Whatever the old index file still holds (run rows, events) is kept for runs whose folder exists; a
    run the old index cannot tell about is `done`/`cancelled` from its card, else `failed` (incomplete).
    The new index is built beside the old one and renamed into place; the old file (and its -wal/-shm)
    is moved aside as `index.damaged-<time>.sqlite` (or `index.old-<time>.sqlite` if it was sound),
    never deleted. Refuses while a run of the old index is still training in a live process.
    """
    root = Path(root)
    report = ReindexReport(root=root)
    if not root.is_dir():
        raise StoreError(f"{root} is not a folder of runs. Fix: pass the runs folder with --runs-dir")
    if not _can_write(root):
        raise StoreWriteError(f"cannot rebuild the index in {root}: this user may not write it. Fix: make it writable "
                              "(or run as its owner)")
    db_path = root / INDEX
    old_rows, old_events, report.old_state = _salvage(db_path)
    live = [rid for rid, r in old_rows.items() if r.get("status") in ACTIVE and alive(r.get("pid"), r.get("pid_start"))]
    if live:
        raise StoreError(f"run(s) {', '.join(live)} are still queued or training in a live process; rebuilding "
                         f"the index now would lose what they write. Fix: let them finish (or stop them), then "
                         f"run reindex again")
    tmp = root / f".index.rebuilding-{secrets.token_hex(4)}.sqlite"
    try:
        db = sqlite3.connect(tmp)
        try:
            with db:
                db.executescript(_SCHEMA)
                seq = 0
                folders = run_folders(root)
                known = {f.name for f in folders}
                report.dropped = sorted(set(old_rows) - known)
                entries = []
                for folder in folders:
                    try:
                        config = RunConfig.from_json((folder / "config.json").read_text())
                    except Exception as exc:  # noqa: BLE001 - any unreadable config: skip, say why
                        report.skipped.append((folder.name, f"config.json unreadable ({type(exc).__name__}: {exc})"))
                        continue
                    old = old_rows.get(folder.name)
                    if old is not None:
                        row, source = dict(old), "old index"
                    else:
                        row, source = _row_from_folder(folder, config)
                    entries.append((row["created_at"], folder.name, row, source, config))
                for _, run_id, row, source, config in sorted(entries, key=lambda e: (e[0], e[1])):
                    seq += 1
                    db.execute(
                        "INSERT INTO runs (run_id, seq, status, dataset, backbone, private, target_epsilon, config, "
                        "created_at, started_at, finished_at, metrics, privacy, error, pid, pid_start, reaped_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (run_id, seq, row["status"], config.dataset, config.backbone, int(config.private),
                         config.epsilon, config.to_json(), row["created_at"], row.get("started_at"),
                         row.get("finished_at"), row.get("metrics"), row.get("privacy"), row.get("error"),
                         row.get("pid"), row.get("pid_start"), row.get("reaped_at")))
                    report.runs.append((run_id, row["status"], source))
                    kept = old_events.get(run_id) or []
                    for ev in kept:
                        db.execute("INSERT INTO events (run_id, seq, kind, step, body, at) VALUES (?, ?, ?, ?, ?, ?)",
                                   (run_id, ev["seq"], ev["kind"], ev.get("step"), ev["body"], ev.get("at")))
                    if kept:
                        report.events_kept[run_id] = len(kept)
        finally:
            db.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if db_path.exists() or any((root / (INDEX + s)).exists() for s in ("-wal", "-shm")):
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            kind = "old" if report.old_state == "sound" else "damaged"
            aside = root / f"index.{kind}-{stamp}.sqlite"
            n = 1
            while aside.exists():
                n += 1
                aside = root / f"index.{kind}-{stamp}-{n}.sqlite"
            for suffix in ("", "-wal", "-shm"):  # SQLite finds a file's journal by name: keep them together
                if (root / (INDEX + suffix)).exists():
                    os.replace(root / (INDEX + suffix), root / (aside.name + suffix))
            report.old_index = aside
        os.replace(tmp, db_path)
        _fsync_dir(root)
    except OSError as exc:
        raise StoreWriteError(f"could not rebuild the index in {root}: {exc}. {_os_fix(exc, root)}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return report
