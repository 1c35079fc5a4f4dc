"""The Runs page's subgroup fairness: a finished run's test metrics per metadata group (sex, age, ...), DP beside
non-private."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dpcore.analysis import run_review
from dpcore.analysis import runs_overview as overview
from dpcore.analysis.labels import run_label
from pages.common import store
from pages.parts.formats import as_percent, auc_column, pct_column, show_table


def _fair_table(rows: list[dict], key: str) -> None:
    """Accuracy-like columns (accuracy, majority share, balanced accuracy, recall) in percent, AUC as 0–1."""
    df = pd.DataFrame(rows)
    pct = [c for c in df.columns if c not in ("group", "n", "in gap", "note") and "AUC" not in c]
    show_table(as_percent(df, pct), key=key, column_config={
        **{c: pct_column(c) for c in pct}, **{c: auc_column(c) for c in df.columns if "AUC" in c}})


def fairness_section(records: dict) -> None:
    """Subgroup fairness: a finished run's test metrics per metadata group (sex, age, ...), DP beside non-private."""
    from dpcore.analysis import fairness
    from dpcore.figures import fairness as fairness_figures
    from dpcore.errors import DPCoreError

    st.subheader("Subgroup fairness")
    st.caption("Accuracy, balanced accuracy, ROC-AUC and melanoma (positive-class) recall per group of the test "
               "split, and the largest gap between groups. Does DP widen the gaps? (Berrada et al. 2023 found it "
               "does not on their medical sets.) Needs metadata: HAM10000, or a folder data set with a metadata.csv.")
    candidates = overview.fairness_candidates(store())
    if not candidates:
        st.info("No finished run on a data set with per-example metadata yet: train one on ham10000, or on a "
                "folder data set whose folder holds a metadata.csv (a `path` column plus e.g. sex, age).")
        return
    run_id = st.selectbox("Run", candidates, format_func=lambda i: run_label(records[i]), key="rn_fair_run")
    try:
        with st.spinner("Reading the test split's metadata (first time only)…"):
            attrs = fairness.run_attributes(store(), run_id)
    except DPCoreError as exc:
        st.error(str(exc))
        return
    if not attrs:
        st.info("This run's test split has no metadata attribute with two or more values to group by.")
        return
    c1, c2 = st.columns(2)
    attribute = c1.selectbox("Group by", attrs, key="rn_fair_attr")
    min_group = int(c2.number_input("Minimum group size (smaller groups are flagged, not in the gap)", 1, 10_000,
                                    fairness.DEFAULT_MIN_GROUP, key="rn_fair_min"))
    rec = records[run_id]
    others = [r.run_id for r in run_review.ready_runs(store()) if r.run_id != run_id and r.dataset == rec.dataset][::-1]
    partner = fairness.default_partner(store(), run_id)
    options = [None] + others
    against = st.selectbox("Compare with", options, index=options.index(partner) if partner in options else 0,
                           format_func=lambda i: "(none)" if i is None else run_label(records[i]),
                           key="rn_fair_against", help="defaults to a finished run of the other privacy kind on "
                                                       "the same data (same split)")
    metric = st.radio("Chart metric", ["accuracy", "balanced_accuracy", "roc_auc", "positive_recall"],
                      horizontal=True, key="rn_fair_metric")
    try:
        with st.spinner("Computing subgroup metrics…"):
            if against is None:
                reports = [fairness.run_fairness(store(), run_id, attribute, min_group=min_group)]
                comp = None
            else:
                first, second = (run_id, against) if rec.private or not records[against].private else (against, run_id)
                comp = fairness.compare(store(), first, second, attribute, min_group=min_group)
                reports = comp["reports"]
    except DPCoreError as exc:
        st.error(str(exc))
        return
    if comp is None:
        rep = reports[0]
        _fair_table(overview.fairness_rows(rep), "rn_fair_table")
        gap = rep["gaps"].get("accuracy")
        if gap:
            st.info(f"Largest accuracy gap: **{gap['gap'] * 100:.1f} points** ({gap['best_group']} "
                    f"{gap['best'] * 100:.1f}% vs {gap['worst_group']} {gap['worst'] * 100:.1f}%).")
    else:
        _fair_table(overview.fairness_compare_rows(comp), "rn_fair_table")
        gdf = pd.DataFrame(overview.fairness_gap_rows(comp))
        show_table(gdf, key="rn_fair_gaps", column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                                           for c in gdf.columns if c.startswith(("gap", "diff"))})
        st.info("Verdict: " + comp["verdict"])
    st.plotly_chart(fairness_figures.fairness_figure(reports, metric=metric), key="rn-fairness-chart")
    st.caption(f"Groups with fewer than {min_group} test examples and the 'unknown' group (missing metadata) are "
               "shown hatched and left out of the gap. 'majority share' is the accuracy of always answering the most "
               "common class: group accuracies differ with the class mix alone (balanced accuracy does not). "
               "Results are stored in the run folder as fairness.json; "
               f"CLI: `python -m dpcore fairness --run {run_id} --attribute {attribute}"
               + (f" --against {against}" if against else "") + "`.")
