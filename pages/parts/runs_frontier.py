"""The Runs page's privacy–utility frontier of one group, and the inverse question: the smallest ε reaching a
target."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dpcore.analysis import run_review
from dpcore.analysis.frontier import METRICS, PERCENT, smallest_epsilon
from dpcore.analysis.runs_overview import frontier_rows, sweep_run_ids
from dpcore.figures import runs as figures
from pages.common import manager, store
from pages.parts.formats import as_percent, auc_column, eps_column, pct_column, show_table

LEDGER_NOTE = ("Choosing ε by looking at these results costs privacy too: each run of the sweep spent its own budget "
               "on the same training images, and the privacy-budget ledger already counts every one of them (an "
               "image's ε composes every run that included it).")


def frontier_section() -> None:
    """The privacy–utility frontier of one group and the inverse question: the smallest ε reaching a target."""
    from dpcore.errors import DPCoreError

    st.subheader("Privacy–utility frontier")
    groups = run_review.frontier_groups(store())
    if not groups:
        st.caption("The frontier needs finished runs of one data set and backbone.")
        return
    sweeps = sweep_run_ids(manager().jobs())  # newest first
    default = run_review.default_frontier_group(store(), sweeps)
    if default is not None and st.session_state.get("rn_group_default") != default:
        st.session_state["rn_group_default"] = default  # a newer sweep or run: follow it (once; then the user's pick)
        st.session_state["rn_group"] = default
    group = st.selectbox("Data set / backbone / scope / weights", groups,
                         format_func=lambda g: f"{g[0]} / {g[1]} / {g[2]} / {g[3]}", key="rn_group",
                         help="defaults to the group of the latest sweep, else of the latest finished run")
    fmetric = st.radio("Utility", list(METRICS), format_func=METRICS.get, horizontal=True, key="rn_fmetric")
    dp_points, plain_points = run_review.frontier_points(store(), *group)
    chart = st.empty()
    st.caption("Each dot is a DP run (test metric against the ε it spent); the dashed line is the non-private run "
               "with the same data, backbone, scope and weights — the price of privacy is the gap.")

    st.markdown("**Smallest ε for a target**")
    pct = fmetric in PERCENT
    c1, c2 = st.columns([1, 3])
    target = c1.number_input(f"Target {METRICS[fmetric]}" + (" (%)" if pct else ""), min_value=1.0 if pct else 0.01,
                             max_value=100.0 if pct else 1.0, value=90.0 if pct else 0.95, step=1.0 if pct else 0.01,
                             key=f"rn_target_{fmetric}")
    goal = target / 100 if pct else target
    answer = None
    try:
        answer = smallest_epsilon(dp_points, fmetric, goal, plain_points)
    except DPCoreError as exc:
        c2.warning(str(exc))
    if answer is not None:
        box = c2.info if answer.kind in ("measured", "interpolated") else c2.warning
        box(answer.sentence)
    chart.plotly_chart(figures.frontier_figure(
        dp_points, plain_points, metric=fmetric, highlight=answer.used if answer else (), target=goal,
        answer_epsilon=answer.epsilon if answer else None), key="rn-frontier")
    st.caption(LEDGER_NOTE + f" The same answer from a terminal: `python -m dpcore frontier --dataset {group[0]} "
               f"--backbone {group[1]} --scope {group[2]} --pretrained {group[3]} --target {fmetric}={goal:g}`.")
    st.page_link("pages/ledger.py", label="Privacy budget: what every run has spent per image", icon="💰")
    rows = frontier_rows(dp_points, plain_points, answer.used if answer else ())
    show_table(as_percent(pd.DataFrame(rows), PERCENT), key="rn_frontier_points", column_config={
        "run_id": "run", "epsilon": eps_column(help="— = non-private"), "unit": "per",
        "accuracy": pct_column("test accuracy"), "balanced_accuracy": pct_column("balanced accuracy"),
        "roc_auc": auc_column(), "answer": st.column_config.CheckboxColumn("answer from", help="the measured runs the "
                                                                                             "answer above reads")})
