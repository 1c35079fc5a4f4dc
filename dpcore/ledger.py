"""Privacy-budget ledger: what every run has spent of each private data set, composed by the accountant.

Every training run on a data set releases something about it, tuning runs and failed runs included, so the
honest question is "what has this data set lost in total", not "what did the best run cost". The ledger
keeps one entry per run — its (σ, q, T, δ), or the fact that it was non-private — under the data set's
identity: a content hash of its training split (the files' bytes or the pixel arrays, with their class
names, order-free), so the same images reached by another path are the same data set and a changed split
is another one. Totals are the accountant's composition of all the entries' mechanisms (RDP and PLD, via
dp-accounting) next to basic composition (Σ ε, Σ δ). A non-private run voids every guarantee on its data
set (ε = ∞). The ledger is its own SQLite file beside the run store, so deleting a run keeps its entry.

Runs whose training split differs (another seed or test fraction) count as another data set here, though
they share individuals: compose such ledgers by hand, or keep the split fixed while tuning.
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import accounting
from .data import DataSplits, ImageList, hash_file_signatures
from .errors import DPCoreError

LEDGER_FILE = "ledger.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    key TEXT PRIMARY KEY, name TEXT NOT NULL, dataset TEXT, data_dir TEXT, n_train INTEGER,
    first_seen REAL NOT NULL, budget_epsilon REAL, budget_delta REAL);
CREATE TABLE IF NOT EXISTS entries (
    run_id TEXT PRIMARY KEY, dataset_key TEXT NOT NULL REFERENCES datasets(key), private INTEGER NOT NULL,
    noise_multiplier REAL, sample_rate REAL, steps INTEGER NOT NULL, delta REAL, accountant TEXT,
    epsilon REAL, status TEXT NOT NULL, label TEXT, recorded_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS hash_cache (signature TEXT PRIMARY KEY, content_hash TEXT NOT NULL);
"""


class LedgerError(DPCoreError):
    """A ledger request that cannot be answered (unknown data set, bad budget); names the fix."""


# -- the data set's identity ---------------------------------------------------------------------------
def _signature(images: ImageList, class_names: list[str]) -> str:
    """Cheap stand-in for the content (paths, sizes, mtimes / array bytes): the cache key of the content hash."""
    h = hashlib.sha256(json.dumps(class_names).encode())
    h.update(np.ascontiguousarray(np.asarray(images.labels, dtype=np.int64)).tobytes())
    array = getattr(images, "array", None)
    if isinstance(array, np.ndarray):
        h.update(str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
        return "a:" + h.hexdigest()
    hash_file_signatures(h, images)
    return "p:" + h.hexdigest()


def content_hash(images: ImageList, class_names: list[str]) -> str:
    """sha256 of the multiset {(sha256(image bytes), class name)}: independent of paths and of order."""
    array = getattr(images, "array", None)
    labels = np.asarray(images.labels, dtype=np.int64)
    items = []
    for i in range(len(images)):
        if isinstance(array, np.ndarray):
            blob = np.ascontiguousarray(array[i]).tobytes() + str(array[i].shape).encode()
        else:
            with open(images.source(i), "rb") as fh:
                blob = fh.read()
        items.append(hashlib.sha256(blob).hexdigest() + ":" + class_names[int(labels[i])])
    h = hashlib.sha256()
    for item in sorted(items):
        h.update(item.encode() + b"\n")
    return h.hexdigest()


def dataset_name(dataset: str, data_dir: str | None, n_train: int) -> str:
    where = f" ({Path(data_dir).name})" if data_dir else ""
    return f"{dataset}{where}, {n_train:,} training images"


# -- the records ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    run_id: str
    dataset_key: str
    private: bool
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int
    delta: float | None
    accountant: str | None
    epsilon: float | None  # the run's own ε (its card's), None for a non-private run
    status: str
    label: str | None
    recorded_at: float


@dataclass(frozen=True)
class DatasetSummary:
    """The ledger's verdict for one data set: composed ε under RDP and PLD, basic composition, budget."""

    key: str
    name: str
    runs: int
    private_runs: int
    non_private_runs: list[str]
    delta: float | None  # the δ of the composed ε (the budget's, else the smallest of the entries')
    epsilon_rdp: float | None  # None: no private steps yet (0 spent); inf: void
    epsilon_pld: float | None
    basic_epsilon: float | None  # Σ ε_i
    basic_delta: float | None  # Σ δ_i
    budget_epsilon: float | None
    entries: list[Entry] = field(default_factory=list)

    @property
    def void(self) -> bool:
        return bool(self.non_private_runs)

    @property
    def epsilon(self) -> float:
        """The tightest valid composed ε at `delta` (the smaller of PLD and RDP); 0 when nothing was spent."""
        if self.void:
            return math.inf
        vals = [v for v in (self.epsilon_pld, self.epsilon_rdp) if v is not None]
        return min(vals) if vals else 0.0

    def epsilon_of(self, accountant: str | None = None) -> float:
        """The composed ε under one accountant ("rdp" or "pld"), or the tighter of both (None)."""
        if accountant is None:
            return self.epsilon
        if accountant not in accounting.ACCOUNTANTS:
            raise LedgerError(f"unknown accountant {accountant!r}. Fix: use one of {accounting.ACCOUNTANTS}")
        if self.void:
            return math.inf
        value = self.epsilon_rdp if accountant == "rdp" else self.epsilon_pld
        return 0.0 if value is None else value

    @property
    def remaining(self) -> float | None:
        return None if self.budget_epsilon is None else self.budget_epsilon - self.epsilon

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("entries")
        d.update(void=self.void, epsilon=self.epsilon, remaining=self.remaining)
        return d


@dataclass(frozen=True)
class Verdict:
    """What a planned run would do to a data set's budget."""

    dataset_key: str
    current: float
    after: float
    budget: float | None
    exceeds: bool
    message: str


def compose(events: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε of all the DP-SGD mechanisms (σ, q, T) run on one data set, composed by the accountant, at δ."""
    live = [(s, q, t) for s, q, t in events if t > 0]
    if not live:
        return 0.0
    if any(s == 0 for s, _, _ in live):
        return math.inf
    acc = accounting.make_accountant(accountant)
    for s, q, t in live:
        acc.compose(accounting.dp_sgd_event(s, q, t))
    return float(acc.get_epsilon(delta))


class Ledger:
    """The ledger file of one runs folder (``<runs>/ledger.sqlite``)."""

    def __init__(self, runs_dir: str | Path = "runs"):
        self.root = Path(runs_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / LEDGER_FILE
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    # -- identity --------------------------------------------------------------------------------------
    def identify(self, splits: DataSplits, dataset: str, data_dir: str | None = None) -> tuple[str, str]:
        """(key, name) of the training split; the content hash is computed once per file signature."""
        sig = _signature(splits.train, list(splits.class_names))
        with self._connect() as db:
            row = db.execute("SELECT content_hash FROM hash_cache WHERE signature = ?", (sig,)).fetchone()
        if row is None:
            key = content_hash(splits.train, list(splits.class_names))[:32]
            with self._connect() as db:
                db.execute("INSERT OR REPLACE INTO hash_cache VALUES (?, ?)", (sig, key))
        else:
            key = row["content_hash"]
        name = dataset_name(dataset, data_dir, len(splits.train))
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO datasets (key, name, dataset, data_dir, n_train, first_seen) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (key, name, dataset, data_dir, len(splits.train), time.time()))
        return key, name

    # -- writing ---------------------------------------------------------------------------------------
    def record(self, run_id: str, dataset_key: str, privacy: dict[str, Any], status: str,
               label: str | None = None) -> Entry:
        """One run's spending: (σ, q, T, δ) of a private run, or the steps of a non-private one."""
        private = bool(privacy.get("private"))
        steps = int(privacy.get("steps") or 0)
        entry = Entry(run_id=run_id, dataset_key=dataset_key, private=private,
                      noise_multiplier=privacy.get("noise_multiplier") if private else None,
                      sample_rate=privacy.get("sample_rate") if private else None, steps=steps,
                      delta=privacy.get("delta") if private else None,
                      accountant=privacy.get("accountant") if private else None,
                      epsilon=privacy.get("epsilon") if private else None, status=status, label=label,
                      recorded_at=time.time())
        if private and steps > 0 and (entry.noise_multiplier is None or entry.sample_rate is None
                                      or entry.delta is None):
            raise LedgerError(f"run {run_id}: a private run's entry needs σ, q and δ, got {privacy}. Fix: pass the "
                              "run's privacy record (card['privacy'])")
        with self._connect() as db:
            if db.execute("SELECT 1 FROM datasets WHERE key = ?", (dataset_key,)).fetchone() is None:
                raise LedgerError(f"unknown data set {dataset_key!r}. Fix: identify() the data set first")
            db.execute("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (entry.run_id, entry.dataset_key, int(entry.private), entry.noise_multiplier,
                        entry.sample_rate, entry.steps, entry.delta, entry.accountant, entry.epsilon, entry.status,
                        entry.label, entry.recorded_at))
        return entry

    def set_budget(self, dataset_key: str, epsilon: float | None, delta: float | None = None) -> None:
        """The total ε (at δ) the data set's owner allows over all runs; None removes it."""
        if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
            raise LedgerError(f"budget ε must be a positive number, got {epsilon}. Fix: e.g. 4")
        if delta is not None and not 0 < delta < 1:
            raise LedgerError(f"budget δ must be in (0, 1), got {delta}. Fix: e.g. 1e-5")
        key = self.resolve(dataset_key)
        with self._connect() as db:
            db.execute("UPDATE datasets SET budget_epsilon = ?, budget_delta = ? WHERE key = ?", (epsilon, delta, key))

    # -- reading ---------------------------------------------------------------------------------------
    def datasets(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            return [dict(r) for r in db.execute("SELECT * FROM datasets ORDER BY first_seen")]

    def resolve(self, key_or_name: str) -> str:
        """A data set's key from its key, a key prefix or (part of) its name; errors name the choices."""
        rows = self.datasets()
        hits = [r for r in rows if r["key"] == key_or_name] or \
            [r for r in rows if r["key"].startswith(key_or_name) or key_or_name.lower() in r["name"].lower()]
        if len(hits) != 1:
            have = "; ".join(f"{r['key'][:12]} = {r['name']}" for r in rows) or "none yet"
            what = "no data set" if not hits else f"{len(hits)} data sets"
            raise LedgerError(f"{what} in the ledger match {key_or_name!r}. Fix: use one of: {have}")
        return hits[0]["key"]

    def entries(self, dataset_key: str | None = None) -> list[Entry]:
        q, args = "SELECT * FROM entries", ()
        if dataset_key is not None:
            q, args = q + " WHERE dataset_key = ?", (dataset_key,)
        with self._connect() as db:
            rows = db.execute(q + " ORDER BY recorded_at", args).fetchall()
        return [Entry(**{**dict(r), "private": bool(r["private"])}) for r in rows]

    def summary(self, dataset_key: str, entries: list[Entry] | None = None) -> DatasetSummary:
        key = self.resolve(dataset_key)
        ds = next(r for r in self.datasets() if r["key"] == key)
        entries = self.entries(key) if entries is None else entries
        spent = [e for e in entries if e.private and e.steps > 0]
        deltas = [e.delta for e in spent]
        delta = ds["budget_delta"] or (min(deltas) if deltas else None)
        events = [(e.noise_multiplier, e.sample_rate, e.steps) for e in spent]
        void = [e.run_id for e in entries if not e.private and e.steps > 0]
        return DatasetSummary(
            key=key, name=ds["name"], runs=len(entries), private_runs=len([e for e in entries if e.private]),
            non_private_runs=void, delta=delta,
            epsilon_rdp=compose(events, delta, "rdp") if spent else None,
            epsilon_pld=compose(events, delta, "pld") if spent else None,
            basic_epsilon=sum(e.epsilon for e in spent) if spent else None,
            basic_delta=sum(deltas) if spent else None, budget_epsilon=ds["budget_epsilon"], entries=entries)

    def summaries(self) -> list[DatasetSummary]:
        return [self.summary(d["key"]) for d in self.datasets()]

    def cumulative(self, dataset_key: str, accountant: str = "rdp") -> list[dict[str, Any]]:
        """Composed ε after each entry in order (for the chart): [{run_id, epsilon, basic}]."""
        s = self.summary(dataset_key)
        out, events, basic, void = [], [], 0.0, False
        for e in s.entries:
            if e.private and e.steps > 0:
                events.append((e.noise_multiplier, e.sample_rate, e.steps))
                basic += e.epsilon or 0.0
            elif not e.private and e.steps > 0:
                void = True
            eps = math.inf if void else (compose(events, s.delta, accountant) if events else 0.0)
            out.append({"run_id": e.run_id, "label": e.label, "private": e.private, "epsilon": eps,
                        "basic": math.inf if void else basic, "recorded_at": e.recorded_at})
        return out

    def would_exceed(self, dataset_key: str, noise_multiplier: float | None, sample_rate: float, steps: int,
                     delta: float) -> Verdict:
        """Whether one more run (σ, q, T; σ None = non-private) would take the data set past its budget."""
        s = self.summary(dataset_key)
        current = s.epsilon
        if noise_multiplier is None:
            after = math.inf
        else:
            events = [(e.noise_multiplier, e.sample_rate, e.steps) for e in s.entries if e.private and e.steps > 0]
            events.append((noise_multiplier, sample_rate, steps))
            d = s.delta or delta
            after = math.inf if s.void else min(compose(events, d, "rdp"), compose(events, d, "pld"))
        budget = s.budget_epsilon
        exceeds = budget is not None and after > budget
        if budget is None:
            msg = f"{s.name}: no budget set; {current:.3g} spent so far, {after:.3g} after this run."
        elif exceeds:
            msg = (f"{s.name}: this run would take the data set's total ε from {current:.3g} to {after:.3g}, past "
                   f"its budget of {budget:g}. Fix: plan this run with a smaller ε, or raise the budget "
                   "on the Privacy budget page if the data's owner agrees.")
        else:
            msg = f"{s.name}: total ε {current:.3g} → {after:.3g} of a budget of {budget:g}."
        return Verdict(s.key, current, after, budget, exceeds, msg)


def backfill(runs_dir: str | Path, store=None) -> list[str]:
    """Record the stored runs the ledger does not know yet (e.g. runs made before the ledger existed), from
    their cards; returns the run ids added. Runs without a card (queued, failed before training) are skipped."""
    from .data import load_dataset
    from .store import RunStore

    store = store or RunStore(runs_dir)
    ledger = Ledger(runs_dir)
    known = {e.run_id for e in ledger.entries()}
    keys: dict[tuple, str] = {}
    added = []
    for rec in store.list_runs():
        if rec.run_id in known or not (store.run_dir(rec.run_id) / "card.json").is_file():
            continue
        card = store.card(rec.run_id)
        cfg = rec.config
        split = (cfg.dataset, cfg.data_dir, cfg.seed, cfg.test_fraction, cfg.medmnist_size)
        if split not in keys:
            splits = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction,
                                  medmnist_size=cfg.medmnist_size, cache_dir=cfg.cache_dir)
            keys[split] = ledger.identify(splits, cfg.dataset, cfg.data_dir)[0]
        privacy = card.get("privacy") or {"private": False, "steps": card.get("steps") or 0}
        label = f"{cfg.backbone}, " + (f"ε={cfg.epsilon:g}" if cfg.private else "non-private")
        ledger.record(rec.run_id, keys[split], privacy, card.get("status", rec.status), label=label)
        added.append(rec.run_id)
    return added


def record_training(runs_dir: str | Path, run_id: str, splits: DataSplits, dataset: str, data_dir: str | None,
                    privacy: dict[str, Any], status: str, label: str | None = None) -> Entry:
    """The trainer's hook: identify the training split and record the run's spending."""
    ledger = Ledger(runs_dir)
    key, _ = ledger.identify(splits, dataset, data_dir)
    return ledger.record(run_id, key, privacy, status, label)


__all__ = ["LEDGER_FILE", "DatasetSummary", "Entry", "Ledger", "LedgerError", "Verdict", "backfill", "compose",
           "content_hash", "record_training"]
