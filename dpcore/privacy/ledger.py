"""Privacy ledger: every use of every image on this machine, and the ε of each image over all of them.

Why per image: a data set's budget is spent by every run that touched any of its images — tuning runs,
failed and killed runs, runs on another seed's split (80 % of the images shared), on a 90 % subset, on a
resized copy in another folder, from another runs folder. So the ledger identifies each image by its
content (file bytes, and a pixel fingerprint that a resized or re-encoded copy shares:
`dpcore.privacy.fingerprint`; a false match can only over-count), records which images each run
trained on, and reports for each image the composition of every run that included it. A data set's
headline is its most-exposed image.

Fail closed: the trainer writes its entry (mechanism, images) before its first noisy step and
reserves steps ahead of taking them (`Spending`); a run that cannot write takes no step. A killed run
therefore leaves an entry with at least the steps it took (up to one reservation chunk more).

Uses that carry no guarantee — a non-private run, a replayable-noise debug run, `pretrain` on data
declared public, a membership audit (its shadow models and its statistics) — void the ε of every image
they used (ε = ∞). Test-split images are evaluated, not trained on: their metrics are released without
DP, which the ledger records ("evaluated") and shows beside their training ε.

One ledger per machine by default (``~/.dpcore/ledger.sqlite``; ``DPCORE_LEDGER`` overrides it), not one
per runs folder. It is an SQLite file created atomically; an empty, foreign or damaged file is refused
with an error, never silently replaced.
"""
from __future__ import annotations

import math
import os
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpcore.privacy import accounting
from dpcore.errors import DPCoreError
from dpcore.process import alive

LEDGER_ENV = "DPCORE_LEDGER"
SCHEMA_VERSION = "2"
KINDS = ("train", "pretrain", "audit", "backfill")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, fp BLOB NOT NULL, fp_version TEXT NOT NULL,
    merged_into INTEGER, first_seen REAL NOT NULL);
CREATE INDEX IF NOT EXISTS images_root ON images(merged_into);
CREATE TABLE IF NOT EXISTS datasets (
    key TEXT PRIMARY KEY, name TEXT NOT NULL, dataset TEXT, data_dir TEXT, first_seen REAL NOT NULL,
    budget_epsilon REAL, budget_delta REAL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, kind TEXT NOT NULL, dataset_key TEXT NOT NULL, private INTEGER NOT NULL,
    insecure INTEGER NOT NULL DEFAULT 0, noise_multiplier REAL, sample_rate REAL,
    steps INTEGER NOT NULL, steps_taken INTEGER, planned_steps INTEGER, delta REAL, accountant TEXT,
    epsilon REAL, status TEXT NOT NULL, label TEXT, unit TEXT, runs_dir TEXT, n_train INTEGER, n_test INTEGER,
    over_budget INTEGER NOT NULL DEFAULT 0, note TEXT, pid INTEGER, started_at REAL NOT NULL,
    updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS run_images (
    run_id TEXT NOT NULL, image_id INTEGER NOT NULL, role TEXT NOT NULL,
    PRIMARY KEY (run_id, image_id, role)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS run_images_image ON run_images(image_id);
CREATE TABLE IF NOT EXISTS dataset_images (
    dataset_key TEXT NOT NULL, image_id INTEGER NOT NULL, PRIMARY KEY (dataset_key, image_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dataset_images_image ON dataset_images(image_id);
CREATE TABLE IF NOT EXISTS run_owners (
    run_id TEXT NOT NULL, image_id INTEGER NOT NULL, owner TEXT NOT NULL, PRIMARY KEY (run_id, image_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS run_owners_owner ON run_owners(owner);
CREATE TABLE IF NOT EXISTS compose_cache (
    signature TEXT NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL, epsilon REAL NOT NULL,
    PRIMARY KEY (signature, delta, accountant)) WITHOUT ROWID;
"""


class LedgerError(DPCoreError):
    """A ledger request that cannot be answered or written; names the fix."""


class LedgerCorrupt(LedgerError):
    """The ledger file is empty, damaged or not a ledger: nothing is written until a person decides."""


class BudgetExceeded(LedgerError):
    """A planned run would take an image past a data set's budget."""


def default_ledger_path() -> Path:
    env = os.environ.get(LEDGER_ENV)
    return Path(env).expanduser() if env else Path.home() / ".dpcore" / "ledger.sqlite"


def _text(value: str | None) -> str | None:
    """Text SQLite can store whatever the file system gave (non-UTF-8 names arrive as surrogates)."""
    if value is None:
        return None
    return os.fsencode(value).decode("utf-8", "backslashreplace") if isinstance(value, str) else str(value)


def dataset_key(dataset: str, data_dir: str | None) -> str:
    """A data set's name in the ledger: its loader and folder (images are matched by content anyway)."""
    where = str(Path(data_dir).expanduser().resolve()) if data_dir else ""
    return _text(f"{dataset}:{where}")


def dataset_name(dataset: str, data_dir: str | None) -> str:
    return _text(f"{dataset} ({Path(data_dir).name})" if data_dir else dataset)


# -- records --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One use of images: a training run (its mechanism, or the fact that it was not private), a
    pretraining, an audit."""

    run_id: str
    kind: str
    dataset_key: str
    private: bool
    insecure: bool
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int  # the steps counted: reserved while running (≥ taken), exact once finished
    steps_taken: int | None
    planned_steps: int | None
    delta: float | None
    accountant: str | None
    epsilon: float | None  # the run's own ε (its card's), None when it carries no guarantee
    status: str
    label: str | None
    unit: str | None
    runs_dir: str | None
    n_train: int | None
    n_test: int | None
    over_budget: bool
    note: str | None
    pid: int | None
    started_at: float
    updated_at: float

    @property
    def guaranteed(self) -> bool:
        """A DP-SGD mechanism with secret noise: composable. Anything else voids what it used."""
        return self.private and not self.insecure and self.noise_multiplier is not None

    @property
    def voids(self) -> bool:
        return self.steps > 0 and not self.guaranteed

    @property
    def event(self) -> tuple[float, float, int]:
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))

    @property
    def per_unit(self) -> bool:
        """A patient-level (or lesion-level) run: it sampled and clipped owners, not images."""
        return self.unit not in (None, "image")

    def event_for(self, multi: bool) -> tuple:
        """The event this run is for one of its images: a patient-level run is replace-one for an image whose
        patient had other images in it (their clipped gradient changes), add/remove otherwise."""
        return self.event + (accounting.REPLACE,) if self.per_unit and multi else self.event

    @property
    def interrupted(self) -> bool:
        """Still 'running' here, but its process is gone (killed): its reserved steps count."""
        return self.status == "running" and not alive(self.pid)

    @property
    def shown_status(self) -> str:
        return "interrupted" if self.interrupted else self.status


@dataclass(frozen=True)
class Exposure:
    """What a set of images has spent: the ε of each image (composed over every run that trained on it)."""

    image_ids: np.ndarray
    epsilon: np.ndarray  # per image: min(RDP, PLD) composed ε at `delta`; inf = void; 0 = never trained on
    epsilon_rdp: np.ndarray
    epsilon_pld: np.ndarray
    runs_per_image: np.ndarray
    evaluated: np.ndarray  # bool: the image was in some run's test split (its metrics released without DP)
    delta: float
    void_runs: list[str]

    @property
    def max_epsilon(self) -> float:
        return float(self.epsilon.max()) if len(self.epsilon) else 0.0

    @property
    def max_accountant(self) -> str | None:
        """Which accountant gave the most-exposed image's ε (each is a valid bound; per image the smaller is
        reported), so every number shown can say where it came from; None when nothing was spent."""
        if not len(self.epsilon) or not np.isfinite(self.max_epsilon) or self.max_epsilon == 0:
            return None
        k = int(self.epsilon.argmax())
        return "PLD" if self.epsilon_pld[k] <= self.epsilon_rdp[k] else "RDP"

    def max_label(self) -> str:
        """'1.82 (PLD)': the most-exposed image's ε with its accountant."""
        acc = self.max_accountant
        return _f(self.max_epsilon) + (f" ({acc})" if acc else "")

    def histogram(self) -> list[tuple[float, int]]:
        """(ε, number of images) for each distinct ε, ascending (∞ last)."""
        counts = Counter(np.round(self.epsilon, 6).tolist())
        return sorted(counts.items())


@dataclass(frozen=True)
class DatasetSummary:
    key: str
    name: str
    n_images: int
    n_trained: int  # images some run trained on
    runs: list[Entry]
    exposure: Exposure
    budget_epsilon: float | None
    budget_delta: float | None

    @property
    def delta(self) -> float:
        return self.exposure.delta

    @property
    def epsilon(self) -> float:
        """The most-exposed image's ε (the tighter valid accountant per image); ∞ when any image is void."""
        return self.exposure.max_epsilon

    def epsilon_of(self, accountant: str | None = None) -> float:
        if accountant is None:
            return self.epsilon
        if accountant not in accounting.ACCOUNTANTS:
            raise LedgerError(f"unknown accountant {accountant!r}. Fix: use one of {accounting.ACCOUNTANTS}")
        arr = self.exposure.epsilon_rdp if accountant == "rdp" else self.exposure.epsilon_pld
        return float(arr.max()) if len(arr) else 0.0

    @property
    def void(self) -> bool:
        return math.isinf(self.epsilon)

    @property
    def n_void(self) -> int:
        return int(np.isinf(self.exposure.epsilon).sum())

    @property
    def remaining(self) -> float | None:
        return None if self.budget_epsilon is None else self.budget_epsilon - self.epsilon

    def to_dict(self) -> dict[str, Any]:
        e = self.exposure
        finite = e.epsilon[np.isfinite(e.epsilon)]
        return {"key": self.key, "name": self.name, "n_images": self.n_images, "n_trained": self.n_trained,
                "runs": len(self.runs), "private_runs": sum(r.guaranteed for r in self.runs),
                "void_runs": e.void_runs, "n_void_images": self.n_void, "delta": e.delta,
                "epsilon_max": self.epsilon, "epsilon_max_rdp": self.epsilon_of("rdp"),
                "epsilon_max_pld": self.epsilon_of("pld"),
                "epsilon_median": float(np.median(e.epsilon)) if len(e.epsilon) else 0.0,
                "epsilon_max_finite": float(finite.max()) if len(finite) else None,
                "n_evaluated_and_trained": int((e.evaluated & (e.runs_per_image > 0)).sum()),
                "budget_epsilon": self.budget_epsilon, "budget_delta": self.budget_delta,
                "remaining": self.remaining, "unit": "image"}


@dataclass(frozen=True)
class OwnerExposure:
    """Per patient (lesion): every run that trained on any of their images, composed.

    A patient-level run counts with its own mechanism (add/remove one patient). An image-level run counts
    as its mechanism when it held one image of the patient, and by group privacy of its own (ε, δ) when it
    held k ≥ 2: (kε, k·e^{(k−1)ε}·δ), added by basic composition (ε and δ add) to the accountant's ε of
    the rest — valid, not tight. A run that voids its images voids their owners (ε = ∞)."""

    owners: list[str]
    epsilon: np.ndarray
    delta: np.ndarray
    images: np.ndarray  # images per owner over all runs
    delta_base: float
    n_without_owner_record: int  # train images of runs that recorded no owners (runs before owners were kept)

    @property
    def worst(self) -> int | None:
        return int(np.argmax(self.epsilon)) if len(self.epsilon) else None

    def to_dict(self) -> dict[str, Any]:
        w = self.worst
        return {"n_owners": len(self.owners), "epsilon_max": None if w is None else float(self.epsilon[w]),
                "delta_of_max": None if w is None else float(self.delta[w]),
                "worst_owner": None if w is None else self.owners[w].split("\t", 1)[-1],
                "epsilon_median": float(np.median(self.epsilon)) if len(self.epsilon) else None,
                "delta_base": self.delta_base, "n_without_owner_record": self.n_without_owner_record}


@dataclass(frozen=True)
class Verdict:
    """What a planned run would do to the most-exposed of its images, against every budget they fall under."""

    current: float
    after: float
    budget: float | None
    budget_dataset: str | None
    exceeds: bool
    message: str
    n_images: int
    n_known: int  # of the planned images, how many the ledger has seen before


def compose(events: Sequence[tuple], delta: float, accountant: str) -> float:
    """ε of DP-SGD mechanisms (σ, q, T[, "replace"]) run on the same image, composed by the accountant at δ."""
    return accounting.compose_events(events, delta, accountant)


# -- the ledger -----------------------------------------------------------------------------------------
class Ledger:
    """The machine's ledger file (``default_ledger_path()`` unless a path is given)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path is not None else default_ledger_path()
        if self.path.is_dir():
            self.path = self.path / "ledger.sqlite"
        self.ledger_id = self._open()

    # -- the file --------------------------------------------------------------------------------------
    def _open(self) -> str:
        if not self.path.exists():
            self._create()
        if self.path.stat().st_size == 0:
            raise LedgerCorrupt(
                f"the privacy ledger {self.path} is an empty file (truncated?): what it recorded is lost, and "
                "starting afresh would hide that. Fix: restore it from a backup; or, if you accept losing its "
                f"record, move it away (mv {self.path} {self.path}.lost) and rebuild what the run stores still "
                "know with `python -m dpcore ledger --backfill --runs-dir RUNS`")
        try:
            with self._connect() as db:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "meta" not in tables:
                    old = " (an older per-runs-folder ledger)" if "entries" in tables else ""
                    raise LedgerCorrupt(
                        f"{self.path} is not a DP Explorer ledger{old}. Fix: point {LEDGER_ENV} at a ledger file, "
                        "or move this file away; `python -m dpcore ledger --backfill --runs-dir RUNS` records the "
                        "stored runs of a runs folder again")
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                db.executescript(_SCHEMA)  # tables added by later versions
        except sqlite3.DatabaseError as exc:
            raise LedgerCorrupt(f"the privacy ledger {self.path} cannot be read ({exc}). Fix: restore it from a "
                                f"backup, or move it away and rebuild with `python -m dpcore ledger --backfill`") from exc
        if meta.get("schema") != SCHEMA_VERSION or not meta.get("ledger_id"):
            raise LedgerCorrupt(f"{self.path} has ledger schema {meta.get('schema')!r}, this version reads "
                                f"{SCHEMA_VERSION!r}. Fix: use the DP Explorer version that wrote it")
        return meta["ledger_id"]

    def _create(self) -> None:
        """Write a complete empty ledger under a temporary name, then link it into place (atomic; a
        concurrent creator's file wins and ours is dropped)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        db = sqlite3.connect(tmp)
        try:
            db.executescript(_SCHEMA)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema", SCHEMA_VERSION), ("ledger_id", uuid.uuid4().hex), ("created_at", repr(time.time()))])
            db.commit()
        finally:
            db.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if write:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            else:
                yield db
        finally:
            db.close()

    def check(self) -> None:
        """SQLite's own consistency check; raises LedgerCorrupt when it finds damage."""
        with self._connect() as db:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise LedgerCorrupt(f"the privacy ledger {self.path} is damaged ({result}). Fix: restore it from a backup")

    def stamp(self) -> tuple:
        """Changes whenever anything is written (for caches of summaries)."""
        with self._connect() as db:
            row = db.execute("SELECT COUNT(*), COALESCE(MAX(updated_at), 0), "
                             "(SELECT COUNT(*) FROM images) FROM runs").fetchone()
        wal = self.path.with_name(self.path.name + "-wal")
        return tuple(row) + (self.path.stat().st_mtime_ns, wal.stat().st_mtime_ns if wal.exists() else 0)

    # -- images ----------------------------------------------------------------------------------------
    def identify(self, images, workers: int = 2):
        """Content identities of an ImageList (cached by file signature in this ledger's file)."""
        from dpcore.privacy import fingerprint

        return fingerprint.identify(images, cache=fingerprint.FingerprintCache(self.path), workers=workers)

    def _known(self, db: sqlite3.Connection):
        rows = db.execute("SELECT id, sha256, fp, COALESCE(merged_into, id) AS root FROM images").fetchall()
        by_sha = {r["sha256"]: r["root"] for r in rows}
        if rows:
            fps = np.frombuffer(b"".join(r["fp"] for r in rows), dtype=np.uint8).reshape(len(rows), -1)
        else:
            fps = np.zeros((0, 0), dtype=np.uint8)
        roots = np.array([r["root"] for r in rows], dtype=np.int64)
        return by_sha, fps, roots

    def _match(self, db: sqlite3.Connection, ids) -> tuple[np.ndarray, list[list[int]]]:
        """For each identity: the root ids of known images it matches (exactly or by fingerprint), and
        the components of mutually matching new identities. Read-only."""
        from dpcore.privacy import fingerprint

        n = len(ids.sha256)
        by_sha, fps, roots = self._known(db)
        parent = list(range(n))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j in fingerprint.near_matches(ids.fp, ids.fp):
            a, b = find(int(i)), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
        matched: list[set[int]] = [set() for _ in range(n)]
        for i, sha in enumerate(ids.sha256):
            if sha in by_sha:
                matched[i].add(int(by_sha[sha]))
        if len(fps) and fps.shape[1] == ids.fp.shape[1]:
            for i, j in fingerprint.near_matches(ids.fp, fps):
                matched[int(i)].add(int(roots[int(j)]))
        comp: dict[int, list[int]] = {}
        for i in range(n):
            comp.setdefault(find(i), []).append(i)
        known_of_comp = {c: sorted(set().union(*(matched[i] for i in members))) for c, members in comp.items()}
        return known_of_comp, comp

    def _register(self, db: sqlite3.Connection, ids) -> np.ndarray:
        """Root image id of every identity, inserting new images and merging known ones that a new image
        joins (a merge can only make two images count as one: over-counting, never under-)."""
        from dpcore.privacy import fingerprint

        known_of_comp, comp = self._match(db, ids)
        out = np.zeros(len(ids.sha256), dtype=np.int64)
        now = time.time()
        for c, members in comp.items():
            known = known_of_comp[c]
            if known:
                root = known[0]
                for other in known[1:]:
                    self._merge(db, other, root)
            else:
                first = members[0]
                cur = db.execute("INSERT INTO images (sha256, fp, fp_version, merged_into, first_seen) "
                                 "VALUES (?, ?, ?, NULL, ?)",
                                 (ids.sha256[first], ids.fp[first].tobytes(), fingerprint.FP_VERSION, now))
                root = int(cur.lastrowid)
            for i in members:
                db.execute("INSERT OR IGNORE INTO images (sha256, fp, fp_version, merged_into, first_seen) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (ids.sha256[i], ids.fp[i].tobytes(), fingerprint.FP_VERSION, root, now))
                out[i] = root
        return out

    @staticmethod
    def _merge(db: sqlite3.Connection, old: int, root: int) -> None:
        if old == root:
            return
        db.execute("UPDATE images SET merged_into = ? WHERE id = ? OR merged_into = ?", (root, old, old))
        db.execute("INSERT OR IGNORE INTO run_images SELECT run_id, ?, role FROM run_images WHERE image_id = ?",
                   (root, old))
        db.execute("DELETE FROM run_images WHERE image_id = ?", (old,))
        db.execute("INSERT OR IGNORE INTO run_owners SELECT run_id, ?, owner FROM run_owners WHERE image_id = ?",
                   (root, old))
        db.execute("DELETE FROM run_owners WHERE image_id = ?", (old,))
        db.execute("INSERT OR IGNORE INTO dataset_images SELECT dataset_key, ? FROM dataset_images WHERE image_id = ?",
                   (root, old))
        db.execute("DELETE FROM dataset_images WHERE image_id = ?", (old,))

    def lookup(self, ids) -> tuple[list[list[int]], int]:
        """Read-only: for each identity the known root ids it matches ([] = new); and how many are known."""
        with self._connect() as db:
            known_of_comp, comp = self._match(db, ids)
        out: list[list[int]] = [[] for _ in range(len(ids.sha256))]
        for c, members in comp.items():
            for i in members:
                out[i] = known_of_comp[c]
        return out, sum(1 for k in out if k)

    # -- writing ---------------------------------------------------------------------------------------
    def _dataset(self, db: sqlite3.Connection, dataset: str, data_dir: str | None, name: str | None) -> str:
        key = dataset_key(dataset, data_dir)
        db.execute("INSERT OR IGNORE INTO datasets (key, name, dataset, data_dir, first_seen) VALUES (?, ?, ?, ?, ?)",
                   (key, _text(name) or dataset_name(dataset, data_dir), dataset, _text(data_dir), time.time()))
        return key

    def begin(self, run_id: str, *, train, test=None, dataset: str, data_dir: str | None = None,
              name: str | None = None, kind: str = "train", private: bool, insecure: bool = False,
              noise_multiplier: float | None = None, sample_rate: float | None = None,
              planned_steps: int | None = None, delta: float | None = None, accountant: str | None = None,
              label: str | None = None, unit: str = "image", runs_dir: str | None = None,
              over_budget: bool = False, note: str | None = None, owners=None) -> "Spending":
        """Record a use before it starts (0 steps counted yet): which images it trains on (and evaluates
        on), under which mechanism. Raises (and records nothing) when the ledger cannot be written.

        ``owners``: one patient / lesion id per training image (None: unknown, the image is its own owner),
        for the per-patient view (`owner_exposure`) and, in a patient-level run (``unit`` not "image"), for
        telling which images' owners had several images (replace-one for them: `Entry.event_for`)."""
        if kind not in KINDS:
            raise LedgerError(f"unknown use {kind!r}. Fix: one of {KINDS}")
        if owners is not None and len(owners) != len(train.sha256):
            raise LedgerError(f"run {run_id}: {len(owners)} owner ids for {len(train.sha256)} training images")
        if unit != "image" and owners is None:
            raise LedgerError(f"run {run_id}: a {unit}-level run's entry needs each image's {unit}. Fix: pass owners")
        if private and not insecure and (noise_multiplier is None or sample_rate is None or delta is None):
            raise LedgerError(f"run {run_id}: a private run's entry needs σ, q and δ. Fix: pass the privacy plan")
        self.check()
        now = time.time()
        with self._connect(write=True) as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
                raise LedgerError(f"run {run_id} is in the ledger already. Fix: use a new run id")
            key = self._dataset(db, dataset, data_dir, name)
            train_ids = self._register(db, train)
            test_ids = self._register(db, test) if test is not None and len(test.sha256) else np.zeros(0, np.int64)
            db.execute(
                "INSERT INTO runs (run_id, kind, dataset_key, private, insecure, noise_multiplier, sample_rate, steps,"
                " steps_taken, planned_steps, delta, accountant, epsilon, status, label, unit, runs_dir, n_train,"
                " n_test, over_budget, note, pid, started_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,0,NULL,?,?,?,NULL,'running',?,?,?,?,?,?,?,?,?,?)",
                (run_id, kind, key, int(private), int(insecure), noise_multiplier if private else None,
                 sample_rate if private else None, planned_steps, delta if private else None,
                 accountant if private else None, _text(label), unit, _text(runs_dir), len(train_ids),
                 len(test_ids), int(over_budget), _text(note), os.getpid(), now, now))
            db.executemany("INSERT OR IGNORE INTO run_images VALUES (?, ?, 'train')",
                           [(run_id, int(i)) for i in np.unique(train_ids)])
            if owners is not None:
                db.executemany("INSERT OR IGNORE INTO run_owners VALUES (?, ?, ?)",
                               [(run_id, int(i), f"{key}\t{o}" if o is not None else f"image\t{int(i)}")
                                for i, o in zip(train_ids, owners)])
            db.executemany("INSERT OR IGNORE INTO run_images VALUES (?, ?, 'test')",
                           [(run_id, int(i)) for i in np.unique(test_ids)])
            db.executemany("INSERT OR IGNORE INTO dataset_images VALUES (?, ?)",
                           [(key, int(i)) for i in np.unique(np.concatenate([train_ids, test_ids]))])
        return Spending(self, run_id, planned_steps or 0, private and not insecure)

    def reserve(self, run_id: str, steps: int) -> None:
        """Count `steps` for a running use (written before they are taken)."""
        with self._connect(write=True) as db:
            cur = db.execute("UPDATE runs SET steps = MAX(steps, ?), updated_at = ? WHERE run_id = ?",
                             (int(steps), time.time(), run_id))
            if cur.rowcount != 1:
                raise LedgerError(f"run {run_id} is not in the ledger {self.path}")

    def finish(self, run_id: str, status: str, steps_taken: int, epsilon: float | None = None,
               note: str | None = None) -> None:
        """The exact count once known (never less than was taken: Opacus' own record)."""
        with self._connect(write=True) as db:
            cur = db.execute("UPDATE runs SET status = ?, steps = ?, steps_taken = ?, epsilon = ?, "
                             "note = COALESCE(?, note), updated_at = ? WHERE run_id = ?",
                             (status, int(steps_taken), int(steps_taken), epsilon, _text(note), time.time(), run_id))
            if cur.rowcount != 1:
                raise LedgerError(f"run {run_id} is not in the ledger {self.path}")

    def record_use(self, run_id: str, *, kind: str, train, dataset: str, data_dir: str | None = None,
                   label: str | None = None, note: str | None = None, runs_dir: str | None = None) -> "RecordedUse":
        """A use with no guarantee (an audit: its shadow models and its statistics), recorded before it starts;
        every image in `train` is void from then on. Returns the hold to pass to what it trains."""
        spending = self.begin(run_id, train=train, dataset=dataset, data_dir=data_dir, kind=kind, private=False,
                              label=label, note=note, runs_dir=runs_dir, planned_steps=1)
        spending.ensure(1)
        self.finish(run_id, "recorded", 1, note=note)
        return RecordedUse(run_id)

    def set_budget(self, key: str, epsilon: float | None, delta: float | None = None) -> None:
        """The largest ε (at δ) the data set's owner allows for any one of its images; None removes it."""
        if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
            raise LedgerError(f"budget ε must be a positive number, got {epsilon}. Fix: e.g. 4")
        if delta is not None and not 0 < delta < 1:
            raise LedgerError(f"budget δ must be in (0, 1), got {delta}. Fix: e.g. 1e-5")
        key = self.resolve(key)
        with self._connect(write=True) as db:
            db.execute("UPDATE datasets SET budget_epsilon = ?, budget_delta = ? WHERE key = ?", (epsilon, delta, key))

    # -- reading ---------------------------------------------------------------------------------------
    def datasets(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT d.*, (SELECT COUNT(*) FROM dataset_images di WHERE di.dataset_key = d.key) "
                              "AS n_images FROM datasets d ORDER BY first_seen").fetchall()
        return [dict(r) for r in rows]

    def resolve(self, key_or_name: str) -> str:
        """A data set's key from its key or (part of) its name; errors name the choices."""
        rows = self.datasets()
        hits = [r for r in rows if r["key"] == key_or_name] or \
            [r for r in rows if key_or_name.lower() in r["key"].lower() or key_or_name.lower() in r["name"].lower()]
        if len(hits) != 1:
            have = "; ".join(r["name"] for r in rows) or "none yet"
            what = "no data set" if not hits else f"{len(hits)} data sets"
            raise LedgerError(f"{what} in the ledger match {key_or_name!r}. Fix: use one of: {have}")
        return hits[0]["key"]

    def entries(self, dataset_key: str | None = None) -> list[Entry]:
        """Uses, oldest first: of one data set (those that used any of its images), or all."""
        with self._connect() as db:
            if dataset_key is None:
                rows = db.execute("SELECT * FROM runs ORDER BY started_at").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM runs WHERE run_id IN (SELECT DISTINCT ri.run_id FROM run_images ri JOIN "
                    "dataset_images di ON di.image_id = ri.image_id WHERE di.dataset_key = ?) OR dataset_key = ? "
                    "ORDER BY started_at", (dataset_key, dataset_key)).fetchall()
        return [_entry(r) for r in rows]

    def entry(self, run_id: str) -> Entry | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _entry(row) if row else None

    def run_image_ids(self, run_id: str, role: str = "train") -> np.ndarray:
        with self._connect() as db:
            rows = db.execute("SELECT image_id FROM run_images WHERE run_id = ? AND role = ?", (run_id, role)).fetchall()
        return np.unique(np.array([r[0] for r in rows], dtype=np.int64))

    def _uses(self, db: sqlite3.Connection, image_ids: Sequence[int] | None, dataset: str | None):
        """{image_id: (train run ids, evaluated)} for the given images or a data set's images."""
        if dataset is not None:
            img_rows = db.execute("SELECT image_id FROM dataset_images WHERE dataset_key = ?", (dataset,)).fetchall()
            ids = [r[0] for r in img_rows]
        else:
            ids = [int(i) for i in image_ids]
        db.execute("CREATE TEMP TABLE IF NOT EXISTS q_images (id INTEGER PRIMARY KEY)")
        db.execute("DELETE FROM q_images")
        db.executemany("INSERT OR IGNORE INTO q_images VALUES (?)", [(i,) for i in ids])
        uses: dict[int, tuple[set[str], bool]] = {i: (set(), False) for i in ids}
        for image_id, run_id, role in db.execute(
                "SELECT ri.image_id, ri.run_id, ri.role FROM run_images ri JOIN q_images q ON q.id = ri.image_id"):
            runs, ev = uses[image_id]
            if role == "train":
                runs.add(run_id)
            else:
                uses[image_id] = (runs, True)
        db.execute("DELETE FROM q_images")
        return uses

    def _compose_cached(self, events: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
        sig = ";".join(",".join(repr(v) if isinstance(v, float) else str(v) for v in e) for e in sorted(events))
        with self._connect() as db:
            row = db.execute("SELECT epsilon FROM compose_cache WHERE signature=? AND delta=? AND accountant=?",
                             (sig, delta, accountant)).fetchone()
        if row is not None:
            return float(row[0])
        eps = compose(events, delta, accountant)
        try:
            with self._connect(write=True) as db:
                db.execute("INSERT OR REPLACE INTO compose_cache VALUES (?, ?, ?, ?)", (sig, delta, accountant, eps))
        except sqlite3.Error:  # a read-only ledger still answers, uncached
            pass
        return eps

    def _exposure(self, uses: dict[int, tuple[set[str], bool]], runs: dict[str, Entry], delta: float,
                  extra: Sequence[tuple[float, float, int]] = (), extra_void: bool = False) -> Exposure:
        """Per image: compose the mechanisms of the runs that trained on it (+ a planned one)."""
        image_ids = np.array(sorted(uses), dtype=np.int64)
        eps_rdp = np.zeros(len(image_ids))
        eps_pld = np.zeros(len(image_ids))
        n_runs = np.zeros(len(image_ids), dtype=np.int64)
        evaluated = np.zeros(len(image_ids), dtype=bool)
        memo: dict[frozenset, tuple[float, float]] = {}
        void_runs: set[str] = set()
        multi = self._multi_owner_images([r for r, e in runs.items() if e.per_unit and e.guaranteed])
        for k, image_id in enumerate(image_ids):
            run_ids, ev = uses[int(image_id)]
            live = frozenset((r, int(image_id) in multi.get(r, ())) for r in run_ids
                             if r in runs and runs[r].steps > 0)
            evaluated[k] = ev
            n_runs[k] = len(live) + len(extra) + (1 if extra_void else 0)
            if live not in memo:
                voiding = [r for r, _ in live if runs[r].voids]
                if voiding or extra_void:
                    void_runs.update(voiding)
                    memo[live] = (math.inf, math.inf)
                else:
                    events = [runs[r].event_for(m) for r, m in live] + list(extra)
                    memo[live] = (self._compose_cached(events, delta, "rdp") if events else 0.0,
                                  self._compose_cached(events, delta, "pld") if events else 0.0)
            eps_rdp[k], eps_pld[k] = memo[live]
        return Exposure(image_ids=image_ids, epsilon=np.minimum(eps_rdp, eps_pld), epsilon_rdp=eps_rdp,
                        epsilon_pld=eps_pld, runs_per_image=n_runs, evaluated=evaluated, delta=delta,
                        void_runs=sorted(void_runs))

    def _multi_owner_images(self, run_ids: Sequence[str]) -> dict[str, set[int]]:
        """For patient-level runs: the images whose owner had more than one image in that run."""
        if not run_ids:
            return {}
        out: dict[str, set[int]] = {}
        for run_id in run_ids:
            owners = self.owners_of(run_id)
            counts = Counter(owners.values())
            out[run_id] = {i for i, o in owners.items() if counts[o] > 1}
        return out

    def owners_of(self, run_id: str) -> dict[int, str]:
        """{image id: owner} recorded for a run (empty where its data named no owners)."""
        with self._connect() as db:
            return {int(i): o for i, o in db.execute("SELECT image_id, owner FROM run_owners WHERE run_id = ?",
                                                      (run_id,)).fetchall()}

    def _runs(self) -> dict[str, Entry]:
        return {e.run_id: e for e in self.entries()}

    def _delta(self, ds: dict[str, Any] | None, runs: list[Entry], fallback: float = 1e-5) -> float:
        if ds is not None and ds.get("budget_delta"):
            return float(ds["budget_delta"])
        deltas = [e.delta for e in runs if e.guaranteed and e.delta]
        return min(deltas) if deltas else fallback

    def summary(self, key_or_name: str) -> DatasetSummary:
        """The data set's per-image ε (every run that trained on each of its images, from any data set)."""
        key = self.resolve(key_or_name)
        ds = next(d for d in self.datasets() if d["key"] == key)
        runs = self._runs()
        with self._connect() as db:
            uses = self._uses(db, None, key)
        used = sorted({r for rs, _ in uses.values() for r in rs} | {e.run_id for e in runs.values()
                                                                     if e.dataset_key == key})
        involved = [runs[r] for r in used if r in runs]
        exposure = self._exposure(uses, runs, self._delta(ds, involved))
        return DatasetSummary(key=key, name=ds["name"], n_images=len(uses),
                              n_trained=int((exposure.runs_per_image > 0).sum()), runs=involved, exposure=exposure,
                              budget_epsilon=ds["budget_epsilon"], budget_delta=ds["budget_delta"])

    def worst_composition(self, key_or_name: str, summary: DatasetSummary | None = None) -> dict[str, Any] | None:
        """The most-exposed image's runs, each with the ε it reported alone, against their composed ε and their
        sum: the worked example of composition the budget page shows. None when no private run spent anything.
        `summary`: the data set's summary when the caller has it already (composing every image is the cost)."""
        s = summary or self.summary(key_or_name)
        e = s.exposure
        if not len(e.epsilon) or e.max_epsilon == 0 or math.isinf(e.max_epsilon):
            return None
        image_id = int(e.image_ids[int(e.epsilon.argmax())])
        with self._connect() as db:
            run_ids, _ = self._uses(db, [image_id], None)[image_id]
        runs = {r.run_id: r for r in s.runs}
        used = [runs[r] for r in sorted(run_ids, key=lambda r: runs[r].started_at or 0)
                if r in runs and runs[r].guaranteed and runs[r].steps > 0]
        alone = [{"run_id": r.run_id, "label": r.label, "epsilon": r.epsilon, "delta": r.delta,
                  "accountant": (r.accountant or "").upper() or None} for r in used]
        total = sum(a["epsilon"] for a in alone if a["epsilon"] is not None)
        return {"runs": alone, "composed": e.max_epsilon, "accountant": e.max_accountant, "delta": e.delta,
                "sum": total, "same_delta": all(a["delta"] == e.delta for a in alone)}

    def owner_exposure(self, key_or_name: str) -> OwnerExposure:
        """The data set's per-patient (per-lesion) ε over every run that recorded owners (see OwnerExposure)."""
        key = self.resolve(key_or_name)
        summary = self.summary(key)
        delta = summary.delta
        runs = {e.run_id: e for e in summary.runs}
        per_owner: dict[str, dict[str, int]] = {}  # owner -> {run: images of the owner in it}
        missing = 0
        for run_id, e in runs.items():
            if e.steps <= 0:
                continue
            owners = self.owners_of(run_id)
            if not owners:
                missing += int(e.n_train or 0)
            for owner, k in Counter(owners.values()).items():
                per_owner.setdefault(owner, {})[run_id] = k
        owners = sorted(per_owner)
        eps, dels, imgs = np.zeros(len(owners)), np.zeros(len(owners)), np.zeros(len(owners), dtype=np.int64)
        memo: dict[frozenset, tuple[float, float]] = {}
        for n, owner in enumerate(owners):
            held = frozenset(per_owner[owner].items())
            imgs[n] = max(per_owner[owner].values())
            if held not in memo:
                memo[held] = self._owner_epsilon(held, runs, delta)
            eps[n], dels[n] = memo[held]
        return OwnerExposure(owners=owners, epsilon=eps, delta=dels, images=imgs, delta_base=delta,
                             n_without_owner_record=missing)

    def _owner_epsilon(self, held, runs: dict[str, Entry], delta: float) -> tuple[float, float]:
        from dpcore.privacy.group_privacy import group_guarantee

        events, extra_eps, extra_delta = [], 0.0, 0.0
        for run_id, k in held:
            e = runs[run_id]
            if e.voids:
                return math.inf, math.inf
            if e.per_unit or k == 1:
                events.append(e.event)
                continue
            run_eps = e.epsilon if e.epsilon is not None else min(
                self._compose_cached([e.event], e.delta or delta, "rdp"),
                self._compose_cached([e.event], e.delta or delta, "pld"))
            ge, gd = group_guarantee(run_eps, e.delta or delta, k)
            extra_eps, extra_delta = extra_eps + ge, extra_delta + gd
        base = min(self._compose_cached(events, delta, "rdp"), self._compose_cached(events, delta, "pld")) \
            if events else 0.0
        return base + extra_eps, delta + extra_delta

    def summaries(self) -> list[DatasetSummary]:
        return [self.summary(d["key"]) for d in self.datasets()]

    def exposure_of(self, image_ids: Sequence[int], delta: float, runs: Sequence[str] | None = None,
                    extra: Sequence[tuple[float, float, int]] = (), extra_void: bool = False) -> Exposure:
        """Per-image ε of given images over all runs (or only `runs`: e.g. a model's lineage), plus a planned one."""
        all_runs = self._runs()
        if runs is not None:
            all_runs = {r: e for r, e in all_runs.items() if r in set(runs)}
        with self._connect() as db:
            uses = self._uses(db, image_ids, None)
        return self._exposure(uses, all_runs, delta, extra=extra, extra_void=extra_void)

    def verdict(self, train_ids, *, dataset: str, data_dir: str | None, noise_multiplier: float | None,
                sample_rate: float | None, steps: int, delta: float, insecure: bool = False,
                per_unit: bool = False) -> Verdict:
        """What a planned run (σ, q, T; σ None = non-private) would do to its images, against every budget
        set on a data set holding any of them (and on its own data set). Read-only."""
        matches, n_known = self.lookup(train_ids)
        known = sorted({i for m in matches for i in m})
        own_key = dataset_key(dataset, data_dir)
        datasets = {d["key"]: d for d in self.datasets()}
        with self._connect() as db:
            holders: dict[str, set[int]] = {}
            if known:
                uses_ds = db.execute("SELECT dataset_key, image_id FROM dataset_images WHERE image_id IN (%s)"
                                     % ",".join(str(int(i)) for i in known)).fetchall()
                for k, i in uses_ds:
                    holders.setdefault(k, set()).add(int(i))
        budgets = {k: d for k, d in datasets.items() if d["budget_epsilon"] is not None
                   and (k in holders or k == own_key)}
        d_ = min([float(d["budget_delta"]) for d in budgets.values() if d["budget_delta"]] or [delta])
        void = noise_multiplier is None or insecure
        extra = [] if void else [(float(noise_multiplier), float(sample_rate), int(steps))
                                 + ((accounting.REPLACE,) if per_unit else ())]  # per image: replace-one, at most
        now = self.exposure_of(known, d_)
        after = self.exposure_of(known, d_, extra=extra, extra_void=void)
        fresh = sum(1 for m in matches if not m)
        fresh_rdp = math.inf if void else (compose(extra, d_, "rdp") if steps else 0.0)
        fresh_pld = compose(extra, d_, "pld") if fresh and not void and steps else math.inf
        fresh_after = min(fresh_rdp, fresh_pld)
        current = max(now.max_epsilon, 0.0)
        worst_after = max(after.max_epsilon, fresh_after if fresh else 0.0)
        now_text = now.max_label()
        if fresh and fresh_after > after.max_epsilon:  # an image never used before is the most exposed after it
            after_text = _f(fresh_after) + ("" if void else " (PLD)" if fresh_pld < fresh_rdp else " (RDP)")
        else:
            after_text = after.max_label()
        binding, exceeds, budget = None, False, None
        for k, d in budgets.items():
            ids = holders.get(k, set())
            mask = np.isin(after.image_ids, list(ids)) if ids else np.zeros(len(after.image_ids), bool)
            top = float(after.epsilon[mask].max()) if mask.any() else 0.0
            if k == own_key and fresh:
                top = max(top, fresh_after)
            if top > d["budget_epsilon"] and (binding is None or not exceeds):
                binding, exceeds, budget = k, True, float(d["budget_epsilon"])
            elif binding is None:
                binding, budget = k, float(d["budget_epsilon"])
        name = datasets[binding]["name"] if binding else dataset_name(dataset, data_dir)
        seen = f"{n_known:,} of its {len(matches):,} images have been used before"
        how = (f"per image, at δ = {d_:g}, composed over every run that trained on it by the tighter of RDP and PLD "
               "(both valid bounds), so it can be below the ε a run was planned at with one accountant")
        if budget is None:
            msg = (f"{name}: no budget set. {seen}; the most-exposed of them is at ε = {now_text} now and "
                   f"would be at {after_text} after this run ({how}).")
        elif exceeds:
            msg = (f"{name}: this run would take its most-exposed image from ε = {now_text} to {after_text}, "
                   f"past the budget of {budget:g} ({how}; {seen}). Fix: plan this run with a "
                   "smaller ε or on other images, raise the budget on the Privacy budget page if the data's owner "
                   "agrees, or pass --allow-over-budget (recorded in the ledger).")
        else:
            msg = (f"{name}: most-exposed image ε = {now_text} → {after_text} of a budget of {budget:g} "
                   f"({how}; {seen}).")
        return Verdict(current=current, after=worst_after, budget=budget, budget_dataset=name if budget else None,
                       exceeds=exceeds, message=msg, n_images=len(matches), n_known=n_known)

    def cumulative(self, key_or_name: str) -> list[dict[str, Any]]:
        """The most-exposed image's ε after each use in order (for the chart)."""
        s = self.summary(key_or_name)
        with self._connect() as db:
            uses = self._uses(db, None, s.key)
        out = []
        for k in range(1, len(s.runs) + 1):
            upto = {e.run_id: e for e in s.runs[:k]}
            ex = self._exposure(uses, upto, s.delta)
            basic = 0.0
            for e in s.runs[:k]:
                if e.guaranteed and e.steps and e.epsilon is not None:
                    basic += e.epsilon
                elif e.voids:
                    basic = math.inf
            e = s.runs[k - 1]
            out.append({"run_id": e.run_id, "label": e.label, "private": e.guaranteed, "kind": e.kind,
                        "epsilon": ex.max_epsilon, "accountant": ex.max_accountant,
                        "epsilon_rdp": float(ex.epsilon_rdp.max()) if len(ex.epsilon_rdp) else 0.0,
                        "epsilon_pld": float(ex.epsilon_pld.max()) if len(ex.epsilon_pld) else 0.0,
                        "run_epsilon": e.epsilon if e.guaranteed else None,
                        "basic": basic, "recorded_at": e.started_at})
        return out


def composition_sentence(c: dict[str, Any] | None) -> str:
    """The worked example in words: 'two runs at ε = 1.99 compose to 2.65 (PLD), not 3.98'."""
    if not c or not c["runs"]:
        return ""
    runs = c["runs"]
    acc = f" ({c['accountant']})" if c["accountant"] else ""
    if len(runs) == 1:
        r = runs[0]
        return (f"The most-exposed image was trained on by one run, {r['run_id']}, which reported ε = {_f(r['epsilon'])}"
                f"{' (' + r['accountant'] + ')' if r['accountant'] else ''} alone; the ledger holds it at "
                f"{_f(c['composed'])}{acc} at δ = {c['delta']:g}: per image it keeps the tighter of RDP and PLD, "
                "both valid bounds.")
    each = sorted({_f(r["epsilon"]) for r in runs if r["epsilon"] is not None})
    at = f"at ε = {each[0]} each" if len(each) == 1 else "at ε = " + ", ".join(_f(r["epsilon"]) for r in runs)
    words = {2: "two", 3: "three", 4: "four", 5: "five"}.get(len(runs), str(len(runs)))
    return (f"Composition: the most-exposed image was in {words} runs {at}; together they compose to "
            f"ε = {_f(c['composed'])}{acc} at δ = {c['delta']:g}, not {_f(c['sum'])} (their sum, basic composition: "
            "also a valid bound, just a loose one). The accountant composes the runs' mechanisms (σ, q, T) "
            "themselves, not their ε's.")


def _f(v: float) -> str:
    return "∞" if math.isinf(v) else f"{v:.3g}"


def _entry(r: sqlite3.Row) -> Entry:
    d = dict(r)
    return Entry(**{**d, "private": bool(d["private"]), "insecure": bool(d["insecure"]),
                    "over_budget": bool(d["over_budget"])})


class RecordedUse:
    """The hold of a use already recorded as carrying no guarantee (`Ledger.record_use`): its images are
    void whatever the number of steps, so the steps of the models it trains need no further writes."""

    reserved = math.inf

    def __init__(self, run_id: str):
        self.run_id = run_id

    def ensure(self, step: int) -> None:
        return None

    def finish(self, *args, **kwargs) -> None:
        return None


class Spending:
    """A running use's hold on the ledger: steps are counted here before the optimizer takes them.

    Private runs reserve in chunks (≈2 % of the plan), so a killed run is over-counted by less than one
    chunk and the ledger is written ~50 times per run, not every step; a failed write raises, and the
    step it guarded is not taken.
    """

    def __init__(self, ledger: Ledger, run_id: str, planned_steps: int, private: bool):
        self.ledger, self.run_id, self.planned = ledger, run_id, max(int(planned_steps), 0)
        self.chunk = max(1, math.ceil(self.planned / 50)) if private else max(self.planned, 1)
        self.reserved = 0

    def ensure(self, step: int) -> None:
        """Before step number `step` (1-based) is taken: make sure the ledger counts it."""
        if step <= self.reserved:
            return
        target = max(step, min(self.reserved + self.chunk, max(self.planned, step)))
        self.ledger.reserve(self.run_id, target)
        self.reserved = target

    def finish(self, status: str, steps_taken: int, epsilon: float | None = None, note: str | None = None) -> None:
        self.ledger.finish(self.run_id, status, steps_taken, epsilon, note)


__all__ = ["BudgetExceeded", "DatasetSummary", "Entry", "Exposure", "LEDGER_ENV", "Ledger", "LedgerCorrupt",
           "LedgerError", "RecordedUse", "Spending", "Verdict", "compose", "dataset_key", "default_ledger_path"]

