"""Runs: every stored run, curves side by side, the privacy–utility frontier and the smallest ε reaching a target,
deleting a run."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import pandas as pd
import streamlit as st

from dpcore.figures import runs as figures
from dpcore.analysis import runs_overview as overview
from dpcore.analysis.frontier import PERCENT
from dpcore.analysis.labels import run_label
from pages.common import ACTIVE, manager, store
from pages.parts.formats import as_percent, auc_column, eps_column, pct_column, show_table
from pages.parts.run_panel import resume_button
from pages.parts.runs_fairness import fairness_section
from pages.parts.runs_frontier import frontier_section
from pages.parts.runs_sweep import sweep_section

st.title("📋 Runs")

sweep_section()

table = overview.overview_rows(store())
if not table:
    st.info("No runs yet: launch one on the Train page, or a preset on Home.")
    st.page_link("pages/train.py", label="Go to Train", icon="🏋️")
    st.stop()

df = as_percent(pd.DataFrame(table), ["test_accuracy"])
shown = ["run_id", "status", "data", "recipe", "epsilon", "unit", "target_epsilon", "test_accuracy", "test_roc_auc",
         "duration"]
text = st.column_config.TextColumn
# pixel widths that fit the main column of the wide layout at 1400 px (about 940 px) without a horizontal scroll:
# the table used to be cut off on the right. The run id starts with its UTC start time; δ and the accountant of
# a run are on its card (Train page, `python -m dpcore card RUN`)
show_table(df, key="rn_runs", column_order=shown, column_config={
    "run_id": text("run", width=165, help="YYYYMMDD-HHMMSS (UTC) of its creation, then a random tag"),
    "status": text("status", width=65), "data": text("data set / backbone", width=140),
    "recipe": text("scope, weights", width=110),
    "epsilon": eps_column(help="— = non-private (or not finished)"),
    "unit": text("per", width=55, help="the privacy unit ε is stated for: an image, or a patient (lesion) with all "
                                       "of their images"),
    "target_epsilon": eps_column("target ε"),
    "test_accuracy": pct_column("test accuracy"), "test_roc_auc": auc_column("test ROC-AUC"),
    "duration": text("duration", width=75),
})

records = {r.run_id: r for r in store().list_runs()}
st.subheader("Compare runs")
chosen = st.multiselect("Runs", list(records)[::-1], format_func=lambda i: run_label(records[i]), key="rn_compare",
                        max_selections=8)
metric = st.radio("Metric", ["accuracy", "roc_auc", "loss", "epsilon"], horizontal=True, key="rn_metric")
if chosen:
    runs = overview.compare_events(store(), records, chosen)
    st.plotly_chart(figures.compare_runs_figure(runs, metric=metric), key="rn-compare-chart")

frontier_section()

fairness_section(records)


def experiments_section() -> None:
    """The named experiments that have stored runs here: their comparison table and chart (launch them on the
    Experiments page)."""
    from dpcore.analysis import experiments as ex
    from dpcore.figures.experiments import comparison_figure
    from pages.parts.formats import experiment_columns

    exps = overview.stored_experiments(store())
    st.subheader("Experiment comparisons")
    if not exps:
        st.caption("No runs of a named experiment yet: launch one on the Experiments page "
                   "(`python -m dpcore experiment --list`).")
        return
    exp = st.selectbox("Experiment", exps, format_func=lambda e: f"{e.name} · v{e.version}", key="rn_exp")
    comp = ex.comparison(exp, store())
    df = pd.DataFrame(comp.rows)
    cols = ["arm", "status"] + [c for c in comp.metrics] + ["run_id"]
    show_table(as_percent(df[cols], PERCENT), key="rn_exp_table", column_config=experiment_columns())
    st.plotly_chart(comparison_figure(comp.rows, metric="accuracy", title=f"{exp.name}: accuracy vs ε"),
                    key="rn_exp_chart")
    st.caption(f"{comp.done} of {len(comp.rows)} arms finished; {exp.title}.")


experiments_section()

stopped = overview.resumable_runs(store(), records)
if stopped:
    st.subheader("Resume a stopped run")
    st.caption("Killed, crashed or cancelled runs with a checkpoint continue from it with the same plan (σ, q, T) "
               "and fresh secret noise. Steps taken after the checkpoint were discarded: they are redone, and the "
               "privacy ledger counts them twice.")
    again = st.selectbox("Run to resume", stopped[::-1], format_func=lambda i: run_label(records[i]), key="rn_resume")
    resume_button(again)

st.subheader("Delete a run")
victim = st.selectbox("Run to delete", list(records)[::-1], format_func=lambda i: run_label(records[i]), key="rn_del",
                      index=None, placeholder="choose a run (none is preselected)")
pending = st.session_state.get("rn_pending")
if victim is None:
    pass
elif pending != victim:
    if st.button("Delete…", key="rn_del_btn"):
        st.session_state["rn_pending"] = victim
        st.rerun()
else:
    live = manager().get(victim)
    if records[victim].status in ACTIVE and live is not None and not live.finished:
        st.warning("This run is queued or running: cancel it on the Train page first.")
        st.session_state.pop("rn_pending", None)
    else:
        st.warning(f"Delete run `{victim}` with its model, card and events? This cannot be undone.")
        yes, no = st.columns(2)
        if yes.button("Yes, delete it", type="primary", key="rn_yes"):
            store().delete_run(victim)
            st.session_state.pop("rn_pending", None)
            st.toast(f"Deleted {victim}")
            st.rerun()
        if no.button("Keep it", key="rn_no"):
            st.session_state.pop("rn_pending", None)
            st.rerun()
