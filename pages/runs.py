"""Runs: every stored run, curves side by side, the privacy–utility frontier and the smallest ε reaching a target,
deleting a run."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import pandas as pd
import streamlit as st

from dpcore.training import checkpoint
from dpcore.figures import runs as figures
from dpcore.analysis import run_review
from dpcore.analysis.frontier import METRICS, PERCENT, smallest_epsilon
from dpcore.training.jobs import SweepJob
from pages.common import (ACTIVE, as_percent, auc_column, eps_column, fmt_duration, manager, pct_column,
                          resume_button, run_label, show_table, store)

st.title("📋 Runs")


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
        unit = job.config.privacy_unit
        rows = [{**p.to_dict(), "unit": unit if p.target_epsilon is not None else None} for p in job.points]
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


sweep_form()
current_sweep = sweep_job()
if current_sweep is not None:
    st.session_state["rn_sweep_seen"] = len(current_sweep.points)
    (sweep_progress if current_sweep.finished else live_sweep)(
        current_sweep if current_sweep.finished else current_sweep.run_id)

table = run_review.runs_table(store())
if not table:
    st.info("No runs yet: launch one on the Train page, or a preset on Home.")
    st.page_link("pages/train.py", label="Go to Train", icon="🏋️")
    st.stop()

df = pd.DataFrame(table)
df["duration"] = df["duration_s"].map(fmt_duration)
df["data"] = df["dataset"] + " / " + df["backbone"]
df["recipe"] = df["scope"] + ", " + df["pretrained"].map(lambda w: {"none": "scratch", "hub": "pretrained"}.get(w, w))
df = as_percent(df, ["test_accuracy"])
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
    runs = {f"{i} ({records[i].backbone}, " + (f"ε={records[i].target_epsilon:g})" if records[i].private
                                                 else "non-private)"): store().events(i) for i in chosen}
    st.plotly_chart(figures.compare_runs_figure(runs, metric=metric), key="rn-compare-chart")

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
    sweeps = [rid for job in manager().jobs() if isinstance(job, SweepJob) for rid in job.run_ids]  # newest first
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
    rows = [{"run_id": p["run_id"], "epsilon": p["epsilon"], "unit": p.get("unit"), "accuracy": p["accuracy"],
             "balanced_accuracy": p["balanced_accuracy"], "roc_auc": p["roc_auc"],
             "answer": bool(answer and p["run_id"] in answer.used)} for p in dp_points + plain_points]
    show_table(as_percent(pd.DataFrame(rows), PERCENT), key="rn_frontier_points", column_config={
        "run_id": "run", "epsilon": eps_column(help="— = non-private"), "unit": "per",
        "accuracy": pct_column("test accuracy"), "balanced_accuracy": pct_column("balanced accuracy"),
        "roc_auc": auc_column(), "answer": st.column_config.CheckboxColumn("answer from", help="the measured runs the "
                                                                                             "answer above reads")})


frontier_section()


def _fair_table(rows: list[dict], key: str) -> None:
    """Accuracy-like columns (accuracy, majority share, balanced accuracy, recall) in percent, AUC as 0–1."""
    df = pd.DataFrame(rows)
    pct = [c for c in df.columns if c not in ("group", "n", "in gap", "note") and "AUC" not in c]
    show_table(as_percent(df, pct), key=key, column_config={
        **{c: pct_column(c) for c in pct}, **{c: auc_column(c) for c in df.columns if "AUC" in c}})


def fairness_section(records: dict) -> None:
    """Subgroup fairness: a finished run's test metrics per metadata group (sex, age, ...), DP beside non-private."""
    from pathlib import Path

    from dpcore.analysis import fairness
    from dpcore.figures import fairness as fairness_figures
    from dpcore.errors import DPCoreError

    st.subheader("Subgroup fairness")
    st.caption("Accuracy, balanced accuracy, ROC-AUC and melanoma (positive-class) recall per group of the test "
               "split, and the largest gap between groups. Does DP widen the gaps? (Berrada et al. 2023 found it "
               "does not on their medical sets.) Needs metadata: HAM10000, or a folder data set with a metadata.csv.")

    def has_metadata(r) -> bool:
        if r.dataset == "ham10000":
            return True
        return r.dataset == "folder" and bool(r.config.data_dir) and (Path(r.config.data_dir) / "metadata.csv").is_file()

    candidates = [r.run_id for r in run_review.ready_runs(store()) if has_metadata(r)][::-1]
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
    pos = reports[0].get("positive_class")
    if comp is None:
        rep = reports[0]
        rows = [{"group": g, "n": r["n"], "accuracy": r["accuracy"], "majority share": r.get("majority_baseline"),
                 "balanced accuracy": r["balanced_accuracy"],
                 "ROC-AUC": r["roc_auc"], f"{pos} recall" if pos else "positive recall": r.get("positive_recall"),
                 "in gap": g in rep["gap_groups"],
                 "note": rep["excluded_from_gap"].get(g) or (r["roc_auc_note"] or "")} for g, r in rep["groups"].items()]
        _fair_table(rows, "rn_fair_table")
        gap = rep["gaps"].get("accuracy")
        if gap:
            st.info(f"Largest accuracy gap: **{gap['gap'] * 100:.1f} points** ({gap['best_group']} "
                    f"{gap['best'] * 100:.1f}% vs {gap['worst_group']} {gap['worst'] * 100:.1f}%).")
    else:
        la, lb = comp["a"]["label"], comp["b"]["label"]
        rows = []
        for r in comp["rows"]:
            row = {"group": r["group"], "n": r["n"], "in gap": not (r["small"] or r["unknown"]),
                   "majority share": r.get("majority_baseline")}
            for m, t in (("accuracy", "accuracy"), ("balanced_accuracy", "bal. acc."), ("roc_auc", "AUC"),
                         ("positive_recall", f"{pos} recall" if pos else "pos. recall")):
                row[f"{t} {la}"], row[f"{t} {lb}"] = r[f"{m}_a"], r[f"{m}_b"]
            rows.append(row)
        _fair_table(rows, "rn_fair_table")
        gaps = [{"metric": m, f"gap {la}": (comp["gaps_a"].get(m) or {}).get("gap"),
                 f"worst {la}": (comp["gaps_a"].get(m) or {}).get("worst_group"),
                 f"gap {lb}": (comp["gaps_b"].get(m) or {}).get("gap"),
                 f"worst {lb}": (comp["gaps_b"].get(m) or {}).get("worst_group"),
                 "difference": comp["gap_difference"].get(m)} for m in fairness.GAP_METRICS
                if m in comp["gaps_a"]]
        gdf = pd.DataFrame(gaps)
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


fairness_section(records)


def experiments_section() -> None:
    """The named experiments that have stored runs here: their comparison table and chart (launch them on the
    Experiments page)."""
    from dpcore.analysis import experiments as ex
    from dpcore.figures.experiments import comparison_figure
    from pages.common import experiment_columns

    tagged = {(t.get("experiment"), t.get("version")) for t in ex.read_tags(store().root).values()}
    exps = [e for _, e in ex.list_experiments() if not isinstance(e, ex.ExperimentError)
            and (e.name, e.version) in tagged]
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

stopped = [i for i in records if records[i].status in ("failed", "cancelled")
           and checkpoint.exists(store().run_dir(i))]
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
