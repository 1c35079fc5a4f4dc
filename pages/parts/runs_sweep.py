"""The Runs page's ε sweep: its form, and the progress of the sweep this tab launched (live while it runs)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dpcore.analysis.runs_overview import sweep_point_rows
from dpcore.training.jobs import SweepJob
from pages.common import manager
from pages.parts.formats import as_percent, auc_column, eps_column, pct_column, show_table


def sweep_form() -> None:
    """Launch an ε sweep (one stored run per ε, head-only on cached features) as one background job."""
    from dpcore.config import RunConfig
    from dpcore.data import list_datasets
    from dpcore.errors import DPCoreError
    from dpcore.training.sweep import parse_epsilons
    from models import list_models

    with st.expander("Sweep ε — one run per privacy budget, frozen backbone + DP head", expanded=False):
        with st.form("rn_sweep_form"):
            c1, c2 = st.columns(2)
            dataset = c1.selectbox("Data set", list_datasets(), key="rn_sw_dataset")
            backbone = c2.selectbox("Backbone", list_models(), key="rn_sw_backbone")
            data_dir = st.text_input("Data folder (folder, ham10000, MedMNIST npz)", key="rn_sw_dir")
            eps_text = st.text_input("Target ε values", "0.25,0.5,1,2,4,8", key="rn_sw_eps")
            c3, c4 = st.columns(2)
            epochs = c3.number_input("Epochs", 1, 200, 15, key="rn_sw_epochs")
            non_private = c4.checkbox("Also a non-private baseline", True, key="rn_sw_np")
            go = st.form_submit_button("Sweep ε", type="primary")
        if go:
            try:
                eps = parse_epsilons(eps_text)
                base = RunConfig(dataset=dataset, backbone=backbone, data_dir=data_dir.strip() or None,
                                 scope="head", epochs=int(epochs), epsilon=eps[0])
                base.check_paths()
                job = manager().submit_sweep(base, eps, non_private=non_private)
                st.session_state["rn_sweep"] = job.run_id
                st.toast(f"Sweep queued: {len(job.run_ids)} runs")
            except DPCoreError as exc:
                st.error(str(exc))


def sweep_job() -> SweepJob | None:
    sweep_id = st.session_state.get("rn_sweep")
    job = manager().get(sweep_id) if sweep_id else None
    return job if isinstance(job, SweepJob) else None


def sweep_progress(job: SweepJob) -> None:
    st.progress(job.progress, text=f"Sweep {job.status}: {len(job.points)} of {len(job.run_ids)} runs finished"
                                   + (" (points appear in the table and the frontier below as they arrive)"
                                      if not job.finished else ""))
    if job.points:
        rows = sweep_point_rows(job.points, job.config.privacy_unit)
        show_table(as_percent(pd.DataFrame(rows), ["accuracy"]), key="rn_sweep_points",
                   column_order=["run_id", "status", "target_epsilon", "epsilon", "unit", "accuracy", "roc_auc"],
                   column_config={"target_epsilon": eps_column("target ε", help="— = the non-private baseline"),
                                  "epsilon": eps_column(), "unit": st.column_config.TextColumn("per"),
                                  "accuracy": pct_column("test accuracy"), "roc_auc": auc_column("test ROC-AUC")})
    if not job.finished and st.button("Cancel sweep", key="rn_sw_cancel", icon="⏹"):
        manager().cancel(job.run_id)
        st.rerun()


@st.fragment(run_every="2s")
def live_sweep(sweep_id: str) -> None:
    """Redraws the sweep's progress every 2 s; a new point (or the sweep's end) redraws the whole page once, so the
    runs table and the frontier show it, and a finished sweep is drawn without the timer."""
    job = manager().get(sweep_id)
    sweep_progress(job)
    if job.finished or len(job.points) != st.session_state.get("rn_sweep_seen"):
        st.rerun()


def sweep_section() -> None:
    """The form, then the progress of this tab's sweep (live while it runs, once when it has finished)."""
    sweep_form()
    current_sweep = sweep_job()
    if current_sweep is not None:
        st.session_state["rn_sweep_seen"] = len(current_sweep.points)
        (sweep_progress if current_sweep.finished else live_sweep)(
            current_sweep if current_sweep.finished else current_sweep.run_id)
