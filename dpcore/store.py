"""Persisted runs: a folder per run plus an SQLite index of status, config, metrics and all events.

Each write opens its own short-lived connection, so the store is safe to use from the training
thread and from UI threads at once (SQLite serialises writers; WAL lets readers go on).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .config import RunConfig
from .errors import DPCoreError
from .process import alive
from .events import Event

STATUSES = ("queued", "running", "done", "failed", "cancelled")

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
    pid INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER,
    body TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""


class RunNotFound(DPCoreError):
    pass


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
    """`runs/` (or any folder): `index.sqlite` + `RUN_ID/{config.json, model.safetensors, card.json}`."""

    def __init__(self, root: str | Path = "runs"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "index.sqlite"
        with self._connect() as db:
            db.executescript(_SCHEMA)
            if "pid" not in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:
                db.execute("ALTER TABLE runs ADD COLUMN pid INTEGER")  # stores made before pids were kept

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.row_factory = sqlite3.Row
            with db:
                yield db
        finally:
            db.close()

    # -- writing ---------------------------------------------------------------------------
    def create_run(self, config: RunConfig, status: str = "queued") -> str:
        run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(config.to_json())
        with self._connect() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM runs").fetchone()[0]
            db.execute(
                "INSERT INTO runs (run_id, seq, status, dataset, backbone, private, target_epsilon, config, created_at,"
                " pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, seq, status, config.dataset, config.backbone, int(config.private), config.epsilon,
                 config.to_json(), time.time(), os.getpid()),
            )
        return run_id

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = time.time()
        with self._connect() as db:
            if status == "running":
                cur = db.execute("UPDATE runs SET status=?, started_at=?, pid=? WHERE run_id=?",
                                 (status, now, os.getpid(), run_id))
            elif status in ("done", "failed", "cancelled"):
                cur = db.execute("UPDATE runs SET status=?, finished_at=?, error=? WHERE run_id=?",
                                 (status, now, error, run_id))
            else:
                cur = db.execute("UPDATE runs SET status=? WHERE run_id=?", (status, run_id))
            if cur.rowcount == 0:
                raise RunNotFound(f"no run {run_id!r} in {self.root}")

    def record_results(self, run_id: str, metrics: dict[str, Any] | None, privacy: dict[str, Any] | None) -> None:
        with self._connect() as db:
            db.execute("UPDATE runs SET metrics=?, privacy=? WHERE run_id=?",
                       (json.dumps(metrics), json.dumps(privacy), run_id))

    def add_event(self, event: Event) -> None:
        self.add_events([event])

    def add_events(self, events: list[Event]) -> None:
        """Append events in one transaction (one commit per step costs ~10 ms; a batch costs the same)."""
        if not events:
            return
        with self._connect() as db:
            for event in events:
                seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id=?",
                                 (event.run_id,)).fetchone()[0]
                db.execute("INSERT INTO events (run_id, seq, kind, step, body) VALUES (?, ?, ?, ?, ?)",
                           (event.run_id, seq, event.kind, event.step, json.dumps(event.to_dict())))

    def write_json(self, run_id: str, name: str, payload: dict[str, Any]) -> Path:
        path = self.run_dir(run_id) / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        tmp.replace(path)
        return path

    def reap_orphans(self) -> list[str]:
        """Mark queued/running runs whose process has died as failed, so they don't look alive forever.

        A run belongs to the process that queued or trains it (its pid is recorded); if that process is
        gone, nothing will ever finish the run. Returns the run ids it marked.
        """
        with self._connect() as db:
            rows = db.execute("SELECT run_id, pid FROM runs WHERE status IN ('queued', 'running')").fetchall()
        dead = [r["run_id"] for r in rows if not alive(r["pid"])]
        for run_id in dead:
            self.set_status(run_id, "failed", error="interrupted: the process that queued or trained this run "
                                                    "stopped before it finished")
        return dead

    def delete_run(self, run_id: str) -> None:
        self.get_run(run_id)
        with self._connect() as db:
            db.execute("DELETE FROM events WHERE run_id=?", (run_id,))
            db.execute("DELETE FROM runs WHERE run_id=?", (run_id,))
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RunNotFound(f"{run_id!r} is not a run id")
        return self.root / run_id

    def list_runs(self) -> list[RunRecord]:
        """All runs, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY seq").fetchall()
        return [self._record(r) for r in rows]

    def get_run(self, run_id: str) -> RunRecord:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.root}; `python -m dpcore runs --runs-dir {self.root}` "
                              "lists the runs")
        return self._record(row)

    def events(self, run_id: str, kind: str | None = None) -> list[Event]:
        query = "SELECT body FROM events WHERE run_id=?" + (" AND kind=?" if kind else "") + " ORDER BY seq"
        args = (run_id, kind) if kind else (run_id,)
        with self._connect() as db:
            rows = db.execute(query, args).fetchall()
        return [Event.from_dict(json.loads(r["body"])) for r in rows]

    def card(self, run_id: str) -> dict[str, Any]:
        path = self.run_dir(run_id) / "card.json"
        if not path.exists():
            raise RunNotFound(f"run {run_id} has no model card (status: {self.get_run(run_id).status})")
        return json.loads(path.read_text())

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
