"""ε sweeps: one ordinary stored run per target ε (plus an optional non-private baseline).

Each point is a normal run with its own card, events and model, so the Runs page, the frontier chart
and `load_run` treat it like any other. Sweeps default to scope "head": the frozen backbone's features
are extracted once (first run) and every later run reads them from the cache, and σ calibrations of
one plan share their accountant evaluations, so each further point costs little more than its steps.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from dpcore.config import RunConfig
from dpcore.errors import ConfigError
from dpcore.store.events import Event, Listener
from dpcore.store.runs import RunStore

DEFAULT_EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class SweepPoint:
    """One finished point of the frontier (epsilon None = the non-private baseline)."""

    run_id: str
    status: str
    target_epsilon: float | None
    epsilon: float | None
    accuracy: float | None
    roc_auc: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_epsilons(text: str | Sequence[float]) -> list[float]:
    """'0.25,0.5,1' (or a list) → sorted distinct positive finite floats; a clear error otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ConfigError("epsilons", f"{item!r} is not a number", "pass a comma-separated list like 0.5,1,2,4")
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError("epsilons", f"every ε must be a finite number > 0, got {value}",
                              "pass positive values like 0.5,1,2,4 (add --non-private for the baseline)")
        out.append(value)
    if not out:
        raise ConfigError("epsilons", "the list of ε is empty", "pass e.g. --epsilons 0.5,1,2,4,8")
    return sorted(set(out))


def sweep_configs(base: RunConfig, epsilons: Sequence[float], non_private: bool = False) -> list[RunConfig]:
    """The runs of a sweep: one per ε (ascending), then the non-private baseline when asked."""
    configs = [base.replace(epsilon=float(e)) for e in parse_epsilons(epsilons)]
    if non_private:
        configs.append(base.replace(epsilon=None))
    return configs


def point_of(result) -> SweepPoint:
    card = result.card or {}
    privacy = card.get("privacy") or {}
    # the ε the card guarantees (composed over the starting weights' lineage); a private run whose guarantee
    # does not hold (replayable noise, a non-private ancestor on these images) is at ε = ∞, off the frontier
    eps = card.get("guarantee_epsilon", card.get("epsilon"))
    if privacy.get("private") and privacy.get("guarantee_holds") is False:
        eps = math.inf
    return SweepPoint(run_id=result.run_id, status=result.status, target_epsilon=privacy.get("target_epsilon"),
                      epsilon=eps, accuracy=card.get("test_accuracy"), roc_auc=card.get("test_roc_auc"))


def run_sweep(configs: Sequence[RunConfig], store: RunStore, *, run_ids: Sequence[str] | None = None,
              listener: Listener | None = None, cancel: threading.Event | None = None,
              on_point: Callable[[SweepPoint], None] | None = None, train_fn=None) -> list[SweepPoint]:
    """Train the runs one after another; `on_point` sees each finished point at once.

    A failed run is recorded (by the trainer) and the sweep goes on with the next; a cancel stops the
    current run and marks the runs not yet started as cancelled.
    """
    if train_fn is None:
        from dpcore.training.trainer import train as train_fn
    cancel = cancel or threading.Event()
    # every point is stored as 'queued' up front, so the whole sweep shows in the Runs table at once
    run_ids = list(run_ids) if run_ids is not None else [store.create_run(c, status="queued") for c in configs]
    if len(run_ids) != len(configs):
        raise ValueError(f"{len(configs)} configs but {len(run_ids)} run ids")
    points = []
    for i, (config, run_id) in enumerate(zip(configs, run_ids)):
        if cancel.is_set():
            for later in run_ids[i:]:
                store.set_status(later, "cancelled", error="sweep cancelled before this run started")
            break
        try:
            result = train_fn(config, store, listener=listener, cancel=cancel, run_id=run_id)
            point = point_of(result)
        except Exception as exc:  # the trainer has stored the failure; the other points still run
            point = SweepPoint(run_id, "failed", config.epsilon, None, None, None)
            if listener is not None:
                listener(Event("log", run_id, message=f"sweep point failed: {type(exc).__name__}: {exc}"))
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


def format_header() -> str:
    return f"{'ε target':>9} {'ε spent':>9} {'accuracy':>9} {'AUC':>7}  {'status':<9} run id"


def format_point(p: SweepPoint) -> str:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"
    target = "nonDP" if p.target_epsilon is None and p.epsilon is None else num(p.target_epsilon, "g")
    return (f"{target:>9} {num(p.epsilon, '.4f'):>9} {num(p.accuracy, '.4f'):>9} {num(p.roc_auc, '.4f'):>7}  "
            f"{p.status:<9} {p.run_id}")
