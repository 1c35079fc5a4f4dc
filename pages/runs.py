"""Runs: every stored run, curves side by side, the privacy–utility frontier, deleting a run."""
import pandas as pd
import streamlit as st

from dpcore import figures, run_review
from pages.common import ACTIVE, fmt_duration, fmt_time, manager, run_label, store

st.title("📋 Runs")
table = run_review.runs_table(store())
if not table:
    st.info("No runs yet: launch one on the Train page, or a preset on Home.")
    st.page_link("pages/train.py", label="Go to Train", icon="🏋️")
    st.stop()

df = pd.DataFrame(table)
df["duration"] = df["duration_s"].map(fmt_duration)
df["created"] = df["created"].map(lambda v: fmt_time(v) if isinstance(v, (int, float)) else v)
shown = ["run_id", "status", "dataset", "backbone", "pretrained", "scope", "epsilon", "target_epsilon", "delta",
         "accountant", "test_accuracy", "test_roc_auc", "duration", "created"]
st.dataframe(df[[c for c in shown if c in df.columns]], hide_index=True, column_config={
    "epsilon": st.column_config.NumberColumn("ε spent", format="%.3g", help="empty = non-private"),
    "target_epsilon": st.column_config.NumberColumn("target ε", format="%.3g"),
    "delta": st.column_config.NumberColumn("δ", format="%.0e"),
    "test_accuracy": st.column_config.NumberColumn("test accuracy", format="percent"),
    "test_roc_auc": st.column_config.NumberColumn("test ROC-AUC", format="%.3f"),
})

records = {r.run_id: r for r in store().list_runs()}
st.subheader("Compare runs")
chosen = st.multiselect("Runs", list(records)[::-1], format_func=lambda i: run_label(records[i]), key="rn_compare",
                        max_selections=8)
metric = st.radio("Metric", ["accuracy", "roc_auc", "loss", "epsilon"], horizontal=True, key="rn_metric")
if chosen:
    runs = {f"{i} ({records[i].backbone}, " + (f"ε={records[i].target_epsilon:g})" if records[i].private
                                                 else "non-private)"): store().events(i) for i in chosen}
    st.plotly_chart(figures.compare_runs_figure(runs, metric=metric), key="rn-compare-chart")

st.subheader("Privacy–utility frontier")
groups = run_review.frontier_groups(store())
if not groups:
    st.caption("The frontier needs finished runs of one data set and backbone.")
else:
    group = st.selectbox("Data set / backbone", groups, format_func=lambda g: f"{g[0]} / {g[1]}", key="rn_group")
    fmetric = st.radio("Utility", ["accuracy", "roc_auc"], horizontal=True, key="rn_fmetric")
    dp_points, plain_points = run_review.frontier_points(store(), *group)
    st.plotly_chart(figures.frontier_figure(dp_points, plain_points, metric=fmetric), key="rn-frontier")
    st.caption("Each dot is a DP run (test metric against the ε it spent); the dashed line is the non-private run "
               "with the same data and backbone — the price of privacy is the gap.")

st.subheader("Delete a run")
victim = st.selectbox("Run to delete", list(records)[::-1], format_func=lambda i: run_label(records[i]), key="rn_del")
pending = st.session_state.get("rn_pending")
if pending != victim:
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
