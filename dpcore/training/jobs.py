"""A process-wide queue of training jobs run one at a time, each in its own worker process.

The app holds one JobManager (via `st.cache_resource`) so every tab and every rerun sees the same
jobs; its background thread starts and supervises one training process at a time (`dpcore.training.worker`: the
training never shares the app's GIL, and a worker that dies cannot take the app down) and feeds each
job's thread-safe event log from the worker's events; it never touches any UI.
Jobs are created as 'queued' runs in the store at submission, so a queue survives in the Runs table.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from dpcore.config import RunConfig
from dpcore.store.events import Event, EventLog
from dpcore.store.runs import RunStore

TrainFn = Callable[..., Any]


@dataclass
class Job:
    run_id: str
    config: RunConfig
    label: str = ""
    status: str = "queued"  # queued | running | done | failed | cancelled
    events: EventLog = field(default_factory=EventLog)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    resume: bool = False  # continue the stored run from its checkpoint
    processes: int = 1  # > 1: one DP-SGD run spread over that many local GPUs (torchrun; dpcore.privacy.distributed)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def latest(self, kind: str) -> Event | None:
        for ev in reversed(self.events.snapshot()):
            if ev.kind == kind:
                return ev
        return None


@dataclass
class SweepJob(Job):
    """An ε sweep run as ONE job: its points are ordinary runs (stored 'queued' at submission) trained in turn.

    `run_id` is the sweep's own id (not a stored run); `run_ids` are the points', `points` fill in as
    each finishes, so a page can show progress while the frontier chart reads the stored runs.
    """

    configs: list = field(default_factory=list)
    run_ids: list = field(default_factory=list)
    points: list = field(default_factory=list)

    @property
    def progress(self) -> float:
        return len(self.points) / max(len(self.run_ids), 1)


class JobManager:
    """Submit, queue, run and cancel training jobs; safe to call from any thread."""

    def __init__(self, store: RunStore, train_fn: TrainFn | None = None):
        if train_fn is None:
            from dpcore.training.worker import train_in_worker as train_fn
        self.store = store
        store.reap_orphans()  # runs left queued/running by a process that has since died
        self._train = train_fn
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._current: Job | None = None
        self._worker = threading.Thread(target=self._work, name="dpcore-jobs", daemon=True)
        self._worker.start()

    # -- commands --------------------------------------------------------------------------
    def submit(self, config: RunConfig, label: str = "", processes: int = 1) -> Job:
        """Queue a run; it is stored at once as 'queued' and starts when the jobs before it end."""
        if processes > 1:
            from dpcore.privacy.distributed import refuse

            refuse(config, resume=False, kind="train")  # before it is queued, not when it starts
        run_id = self.store.create_run(config, status="queued")
        return self._enqueue(Job(run_id=run_id, config=config, label=label, processes=max(1, int(processes))))

    def _enqueue(self, job: Job) -> Job:
        with self._wakeup:
            self._jobs[job.run_id] = job
            self._queue.append(job)
            self._wakeup.notify()
        return job

    def submit_resume(self, run_id: str, label: str = "") -> Job:
        """Queue the continuation of a stopped run from its checkpoint (`dpcore.training.checkpoint`)."""
        from dpcore.training.checkpoint import load

        record = self.store.get_run(run_id)
        if record.status not in ("failed", "cancelled"):
            raise ValueError(f"run {run_id} is {record.status}: only a failed or cancelled run can be resumed")
        load(self.store.run_dir(run_id))  # refuses now, with the reason, when there is nothing to resume from
        self.store.set_status(run_id, "queued")
        return self._enqueue(Job(run_id=run_id, config=record.config, label=label or f"resume {run_id}",
                                 resume=True))

    def submit_sweep(self, base: RunConfig, epsilons, non_private: bool = False, label: str = "") -> SweepJob:
        """Queue an ε sweep (one run per ε, plus the baseline when asked) as a single background job."""
        from dpcore.training.sweep import sweep_configs

        configs = sweep_configs(base, epsilons, non_private)
        run_ids = [self.store.create_run(c, status="queued") for c in configs]
        sweep_id = "sweep-" + run_ids[0]
        return self._enqueue(SweepJob(run_id=sweep_id, config=base, label=label or f"ε sweep ({len(configs)} runs)",
                                      configs=configs, run_ids=run_ids))

    def cancel(self, run_id: str) -> None:
        """A queued job is dropped at once; a running one stops at its next step."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None or job.finished:
                return
            if job in self._queue:
                self._queue.remove(job)
                job.status, job.finished_at = "cancelled", time.time()
                for rid in getattr(job, "run_ids", None) or [run_id]:
                    self.store.set_status(rid, "cancelled", error="cancelled while queued")
                job.events(Event("cancelled", run_id, message="cancelled while queued"))
                return
            job.cancel_event.set()

    # -- views -----------------------------------------------------------------------------
    def get(self, run_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(run_id)

    def current(self) -> Job | None:
        with self._lock:
            return self._current

    def queued(self) -> list[Job]:
        with self._lock:
            return list(self._queue)

    def jobs(self) -> list[Job]:
        """Every job this process has seen, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.submitted_at, reverse=True)

    def wait(self, run_id: str, timeout: float | None = None) -> Job:
        """Block until the job has finished (tests and the CLI use this; the app polls instead)."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            job = self.get(run_id)
            if job is None:
                raise KeyError(run_id)
            if job.finished:
                return job
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"job {run_id} still {job.status} after {timeout} s")
            time.sleep(0.05)

    # -- the worker ------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._wakeup:
                while not self._queue:
                    self._wakeup.wait()
                job = self._queue.popleft()
                self._current = job
                job.status, job.started_at = "running", time.time()
            try:
                if isinstance(job, SweepJob):
                    status, error = self._run_sweep(job), None
                else:
                    extra = {"resume": True} if job.resume else {}
                    if job.processes > 1:
                        extra["processes"] = job.processes
                    result = self._train(job.config, self.store, listener=job.events, cancel=job.cancel_event,
                                         run_id=job.run_id, **extra)
                    status, error = result.status, None
            except Exception as exc:  # the trainer has already stored the failure
                status, error = "failed", f"{type(exc).__name__}: {exc}"
            with self._lock:
                job.status, job.error, job.finished_at = status, error, time.time()
                self._current = None

    def _run_sweep(self, job: SweepJob) -> str:
        from dpcore.training.sweep import run_sweep

        points = run_sweep(job.configs, self.store, run_ids=job.run_ids, listener=job.events,
                           cancel=job.cancel_event, on_point=job.points.append, train_fn=self._train)
        if job.cancel_event.is_set():
            return "cancelled"
        return "done" if all(p.status == "done" for p in points) else "failed"
