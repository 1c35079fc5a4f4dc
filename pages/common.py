"""View helpers shared by the pages: the run store and job manager, the watched run, config errors, the queue
(formats: pages.parts.formats and dpcore.analysis.labels; the run panel: pages.parts.run_panel).

No training, accounting or data logic lives here: it only reads the engine (dpcore) and draws.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from dpcore.config import RunConfig
from dpcore.errors import ConfigError
from dpcore.store.events import Event
from dpcore.training.jobs import Job, JobManager
from dpcore.store.runs import RunNotFound, RunStore

RUNS_ENV = "DPCORE_RUNS_DIR"
WATCH_KEY = "watched_run"
ACTIVE = ("queued", "running")


# -- the engine objects, one per runs folder and per process ---------------------------------
def runs_dir() -> str:
    return str(Path(os.environ.get(RUNS_ENV, "runs")).resolve())


@st.cache_resource(show_spinner=False)
def _store(root: str) -> RunStore:
    return RunStore(root)


@st.cache_resource(show_spinner=False)
def _manager(root: str) -> JobManager:
    return JobManager(_store(root))


def store() -> RunStore:
    return _store(runs_dir())


def manager() -> JobManager:
    return _manager(runs_dir())


# -- the watched run: session state + URL, so reloads, page switches and other tabs re-attach -----
def watched_run() -> str | None:
    """The run this tab follows: its own choice, else the job training now (so a new tab sees it too)."""
    run_id = st.query_params.get("run") or st.session_state.get(WATCH_KEY)
    if not run_id:
        current = manager().current()
        if current is None:
            return None
        run_id = current.run_id
    try:
        store().get_run(run_id)
    except RunNotFound:
        return None
    st.session_state[WATCH_KEY] = run_id
    if st.query_params.get("run") != run_id:
        st.query_params["run"] = run_id
    return run_id


def watch(run_id: str | None) -> None:
    if run_id is None:
        st.session_state.pop(WATCH_KEY, None)
        st.query_params.pop("run", None)
    else:
        st.session_state[WATCH_KEY] = run_id
        st.query_params["run"] = run_id


@dataclass
class RunView:
    run_id: str
    status: str
    events: list[Event]
    config: RunConfig
    job: Job | None  # the live job when this process runs it; None for runs read from the store
    error: str | None = None

    def latest(self, kind: str) -> Event | None:
        return next((ev for ev in reversed(self.events) if ev.kind == kind), None)


def run_view(run_id: str) -> RunView:
    job = manager().get(run_id)
    if job is not None:
        return RunView(run_id, job.status, job.events.snapshot(), job.config, job, job.error)
    record = store().get_run(run_id)
    return RunView(run_id, record.status, store().events(run_id), record.config, None, record.error)


def show_config_error(exc: ConfigError) -> None:
    st.error(f"**{exc.field}**: {exc.problem}.  \n**Fix:** {exc.fix}")


def show_queue() -> None:
    """The job running now and the jobs waiting behind it (this process's JobManager)."""
    mgr = manager()
    current, queued = mgr.current(), mgr.queued()
    if current is None and not queued:
        st.caption("No job is running; a launched run starts at once.")
        return
    lines = []
    if current is not None:
        lines.append(f"▶ running: `{current.run_id}` — {current.label or current.config.dataset + ' / ' + current.config.backbone}")
    for i, job in enumerate(queued, 1):
        lines.append(f"{i}. queued: `{job.run_id}` — {job.label or job.config.dataset + ' / ' + job.config.backbone}")
    st.markdown("  \n".join(lines))
