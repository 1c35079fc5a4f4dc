"""Progress events: the trainer emits them, listeners (CLI printer, run store, the app) only read them."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

KINDS = ("started", "plan", "step", "eval", "finished", "failed", "cancelled", "log")


@dataclass(frozen=True)
class Event:
    """One thing that happened in a run. `epsilon` is ε spent after `step` steps (None if not computed)."""

    kind: str
    run_id: str
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    epsilon: float | None = None
    metrics: dict[str, Any] | None = None
    elapsed: float = 0.0
    eta: float | None = None
    message: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Event":
        return cls(**d)


Listener = Callable[[Event], None]


class EventLog:
    """A thread-safe list of events: the trainer thread appends, a UI thread takes snapshots."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self._events)


def fan_out(*listeners: Listener | None) -> Listener:
    """One listener that calls each given listener in order (None entries are ignored)."""
    active = [lst for lst in listeners if lst is not None]

    def emit(event: Event) -> None:
        for lst in active:
            lst(event)

    return emit
