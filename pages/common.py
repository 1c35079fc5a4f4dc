"""View helpers shared by the pages: the run store and job manager, the watched run, formatting.

No training, accounting or data logic lives here: it only reads the engine (dpcore) and draws.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import streamlit as st

from dpcore.config import RunConfig
from dpcore.errors import ConfigError, DPCoreError
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


def job_panel(run_id: str) -> None:
    """Progress, live charts and Cancel for one run; polls every 2 s while it is queued or running (each
    refresh re-draws three charts in the browser: at 1 s that slowed the watched run 1.8x on 2 cores,
    `bench/watch_ratio.py`)."""
    if run_view(run_id).status in ACTIVE:
        _live_panel(run_id)
    else:
        _panel_body(run_id)


@st.fragment(run_every="2s")
def _live_panel(run_id: str) -> None:
    if _panel_body(run_id) not in ACTIVE:
        st.rerun()  # draw the finished run once more, without the timer


def _panel_body(run_id: str) -> str:
    from dpcore.figures import runs as figures

    view = run_view(run_id)
    cfg = view.config
    plan, step = view.latest("plan"), view.latest("step")
    title = f"{cfg.dataset} / {cfg.backbone} / " + (f"target ε = {cfg.epsilon:g}" if cfg.private else "non-private")
    st.markdown(f"#### Run `{run_id}` — {title}")
    badge = {"queued": "🕒 queued", "running": "🏃 running", "done": "✅ done", "failed": "❌ failed",
             "cancelled": "⏹ cancelled"}.get(view.status, view.status)
    st.markdown(f"**Status:** {badge}", help="Runs execute one at a time in a background worker.")

    if view.status == "queued" and view.job is not None:
        st.info("Queued: it starts when the runs before it have finished.")
    if view.status in ACTIVE and view.job is None:
        st.caption("This run is not in this app's job queue (started from the command line, or before the app "
                   "restarted): its progress is read from the run store; a run whose process ended stays "
                   "'running' there.")
    if plan is not None:
        d = plan.data
        cols = st.columns(5)
        cols[0].metric("Training images n", f"{d.get('n_train', 0):,}")
        cols[1].metric("Steps T", f"{d.get('total_steps', 0):,}")
        cols[2].metric("Noise σ", fmt_num(d.get("noise_multiplier")))
        cols[3].metric("Sample rate q", fmt_num(d.get("sample_rate"), ".4g"))
        cols[4].metric("Device", str(d.get("device", "—")))
    if step is not None and step.total_steps:
        frac = min(1.0, step.step / step.total_steps)
        eta = "" if view.status != "running" else f" · about {fmt_duration(step.eta)} left"
        st.progress(frac, text=f"step {step.step:,} / {step.total_steps:,} · epoch {step.epoch:.2f}{eta}")
    elif view.status == "running":
        st.progress(0.0, text="preparing: loading data, building the model, calibrating σ…")

    cancellable = view.status in ACTIVE and view.job is not None
    if cancellable and st.button("Cancel this run", key=f"cancel-{run_id}", icon="⏹"):
        manager().cancel(run_id)
        st.toast("Cancel requested: the run stops at its next step.")
    if view.status == "done":
        card = store().card(run_id)
        st.success(f"Finished: test accuracy {fmt_pct(card.get('test_accuracy'))}, "
                   f"ROC-AUC {fmt_num(card.get('test_roc_auc'))}. Privacy: {privacy_headline(card)}.")
        show_guarantee(card)
    elif view.status == "failed":
        failed = view.latest("failed")
        st.error(f"The run failed: {failed.message if failed else view.error}")
    elif view.status == "cancelled":
        st.warning("The run was cancelled; the model as it was at that step is saved.")
    if view.status in ("failed", "cancelled"):
        resume_button(run_id)

    if any(ev.kind in ("step", "eval") for ev in view.events):
        figs = figures.training_figures(view.events, target_epsilon=cfg.epsilon,
                                        accountant=cfg.accountant if cfg.private else None,
                                        unit=cfg.privacy_unit if cfg.private else "image")
        cols = st.columns(3 if cfg.private else 2)
        cols[0].plotly_chart(figs["accuracy"], key=f"acc-{run_id}")
        cols[1].plotly_chart(figs["loss"], key=f"loss-{run_id}")
        if cfg.private:
            cols[2].plotly_chart(figs["epsilon"], key=f"eps-{run_id}")
            st.caption("ε grows with every step: each noisy update reveals a little about the data, and the "
                       "accountant adds it up. It ends at (or just below) the target ε.")
    logs = [ev for ev in view.events if ev.kind == "log"]
    if logs:
        with st.expander("Log"):
            st.text("\n".join(ev.message or "" for ev in logs[-30:]))
    return view.status


def resume_button(run_id: str) -> None:
    """Continue a stopped run from its last checkpoint (fresh secret noise; the ledger counts every step)."""
    from dpcore.training import checkpoint

    if not checkpoint.exists(store().run_dir(run_id)):
        return
    job = manager().get(run_id)
    if job is not None and not job.finished:
        return
    if st.button("Resume from the last checkpoint", key=f"resume-{run_id}", icon="▶️",
                 help="Continues with the same plan (σ, q, T) from the last checkpoint. Steps taken after it were "
                      "discarded: they are redone, and the privacy ledger counts them twice."):
        try:
            manager().submit_resume(run_id)
        except (DPCoreError, ValueError) as exc:
            st.error(f"Cannot resume: {exc}")
            return
        watch(run_id)
        st.rerun()


# -- the guarantee of a stored run, as its card states it --------------------------------------
def privacy_headline(card: dict) -> str:
    """The report's one-line ε, δ and unit (dpcore.analysis.report), except that a void guarantee points to the
    guarantee box the page shows below it."""
    from dpcore.analysis import report

    p = card.get("privacy") or {}
    if p.get("private") and not p.get("guarantee_holds", True):
        return "**none** — see below"
    return report.privacy_headline(card)


def show_guarantee(card: dict) -> None:
    """The card's sentence, then what the lineage and the largest patient / lesion change about it."""
    p = card.get("privacy") or {}
    text = card.get("guarantee", "")
    (st.error if text.startswith("NO DP") else st.info)(text)
    lin = card.get("lineage") or {}
    if lin.get("composed_over_ancestors") and not lin.get("void") and lin.get("sentence"):
        st.warning(f"**Lineage:** {lin['sentence']}", icon="🧬")
    group = p.get("group")
    if group and group.get("largest", 1) > 1:
        st.warning(f"**Patients and lesions:** {group['sentence']}", icon="👥")
    per_image = p.get("per_image")
    if p.get("unit") not in (None, "image") and per_image and p.get("guarantee_holds", True):
        unit = p["unit"]
        st.success(f"**{unit.title()}-level privacy:** {unit}s were sampled and clipped as a whole, so the guarantee "
                   f"covers each {unit} with all of their images ({p.get('n_units', 0):,} {unit}s, the largest with "
                   f"{p.get('largest_unit', '?')} images). One single image of a {unit} who has several is protected "
                   f"at ε = {fmt_eps(per_image.get('epsilon_replace_one'))} (changing one image changes that "
                   f"{unit}'s contribution: replace-one, PLD).", icon="🛡️")


# -- formatting ---------------------------------------------------------------------------------
def fmt_eps(eps) -> str:
    if eps is None:
        return "∞ (no DP)"
    if isinstance(eps, float) and math.isinf(eps):
        return "∞"
    return f"{eps:.3g}"


def fmt_pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def fmt_num(x, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def fmt_duration(seconds) -> str:
    if seconds is None or (isinstance(seconds, float) and not math.isfinite(seconds)):  # pandas turns None into NaN
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def fmt_time(ts) -> str:
    return "—" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def run_label(record) -> str:
    eps = f"ε={record.target_epsilon:g}" if record.private else "non-private"
    return f"{record.run_id} · {record.dataset} · {record.backbone} · {eps} · {record.status}"


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


# -- tables: one format per kind of number on every page (accuracies in percent as fmt_pct, ε as fmt_eps) ---------
PCT_FORMAT = "%.1f %%"  # applied to values × 100 (see as_percent): '29.4 %', the same as fmt_pct
EPS_FORMAT = "%.3g"
AUC_FORMAT = "%.3f"


def pct_column(label: str, help: str | None = None):
    return st.column_config.NumberColumn(label, format=PCT_FORMAT, help=help, width=90)


def eps_column(label: str = "ε spent", help: str | None = None):
    return st.column_config.NumberColumn(label, format=EPS_FORMAT, help=help, width=65)


def auc_column(label: str = "ROC-AUC", help: str | None = None):
    return st.column_config.NumberColumn(label, format=AUC_FORMAT, help=help, width=90)


def as_percent(df, columns):
    """A copy of `df` with the fractions of `columns` (those present) × 100, for a PCT_FORMAT column."""
    out = df.copy()
    for c in columns:
        if c in out.columns:
            out[c] = out[c].astype(float) * 100
    return out


def show_table(df, column_config=None, key=None, **kwargs):
    """st.dataframe as every table here draws it: the page's full width, missing values as '—' (not 'None')."""
    return st.dataframe(df, hide_index=True, width="stretch", placeholder="—", column_config=column_config, key=key,
                        **kwargs)


def experiment_columns() -> dict:
    """Column formats of an experiment's comparison table (dpcore.analysis.experiments.comparison rows, as_percent applied to
    accuracy and balanced_accuracy), shared by the Experiments and the Runs page."""
    return {
        "target_epsilon": eps_column("target ε"),
        "epsilon": eps_column(help="— = non-private or not run"),
        "accuracy": pct_column("test accuracy"),
        "balanced_accuracy": pct_column("balanced accuracy"),
        "roc_auc": auc_column(),
        "patient_epsilon": eps_column("ε per patient", help="patient-level runs: their ε; image-level runs: the "
                                      "group-privacy ε of the largest patient (inf: no finite bound); — where the "
                                      "data name no patients"),
        "patient_delta": st.column_config.NumberColumn("δ per patient", format="%.3g",
                                                       help="≥ 1 (or inf) promises nothing"),
        "reference_accuracy": pct_column("reported accuracy"),
        "reference_roc_auc": auc_column("reported ROC-AUC"),
        "time": st.column_config.TextColumn("time"),
        "duration_s": st.column_config.NumberColumn("time (s)", format="%.0f"),
    }
