"""Experiments: the named, versioned comparisons in experiments/*.toml — what each needs here, one-click launch
(one background job per arm, queued together), and the comparison table + chart read from the stored runs."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import pandas as pd
import streamlit as st

from dpcore.analysis import experiments as ex
from dpcore.analysis.experiment_arms import arm_rows
from dpcore.errors import DPCoreError
from dpcore.figures.experiments import comparison_figure
from dpcore.analysis.labels import fmt_duration
from pages.common import manager, show_queue, store
from pages.parts.formats import as_percent, experiment_columns, show_table

st.title("🧪 Experiments")
st.caption("Each experiment is a file in `experiments/` with a version: a base run, its arms (ε values, weights, "
           "recipe), what it needs and which numbers to compare. Every arm trains as an ordinary run (it also shows "
           "on the Runs page) tagged with the experiment's name and version. The same from a terminal: "
           "`python -m dpcore experiment NAME`.")

items = dict(ex.list_experiments())
if not items:
    st.info(f"No experiment files in {ex.experiments_dir()}.")
    st.stop()


def _label(name: str) -> str:
    exp = items[name]
    return f"{name} (invalid file)" if isinstance(exp, ex.ExperimentError) else f"{name} · v{exp.version}"


name = st.selectbox("Experiment", list(items), format_func=_label, key="ex_name")
exp = items[name]
if isinstance(exp, ex.ExperimentError):
    st.error(f"**{exp.where}**  \n**{exp.key}**: {exp.problem}.  \n**Fix:** {exp.fix}")
    st.stop()

st.subheader(exp.title)
st.markdown(exp.description)
if exp.notes:
    st.caption(exp.notes)

with st.expander(f"Arms ({len(exp.arms)}) and settings"):
    show_table(pd.DataFrame(arm_rows(exp)))
    st.caption("Arms with identical run configs share one training run (e.g. the raw and the EMA weights of one "
               "run: EMA is post-processing and does not change training).")
    st.markdown("**Base run config** (relative data paths resolve against the data root)")
    st.json(exp.base, expanded=False)
    if exp.pretrain is not None:
        p = exp.pretrain
        st.markdown(f"**Pretrain step** (non-private, made once and cached in the runs folder): {p.backbone} on "
                    f"{p.dataset} ({p.data_dir or 'bundled'}), {p.epochs} epochs at {p.image_size or 'default'} px.  \n"
                    f"Declared public: {p.public}")

data_root = st.text_input("Data root (folder holding the data folders this experiment names)",
                          value=str(ex.resolve_data_root()), key="ex_root")
only = st.multiselect("Arms to train (none chosen: all)", [a.label for a in exp.arms], key="ex_only")
chosen = exp.select(only or None)
missing = ex.check_needs(exp, data_root, store().root, arms=chosen)
if missing:
    st.warning("**This machine lacks what the chosen arms need:**\n" + "\n".join(f"- {m}" for m in missing))
else:
    st.success("Everything the chosen arms need is on this machine.")
rerun = st.checkbox("Train arms again even if they already have a finished run of this version", key="ex_rerun",
                    help="Without this, a launch trains only the arms not finished yet (so an interrupted "
                         "experiment resumes where it stopped).")
if st.button(f"Run {name}", type="primary", disabled=bool(missing), key="ex_launch_btn", icon="▶️"):
    try:
        launch = ex.launch_experiment(exp, manager(), data_root=data_root, only=only or None, rerun=rerun)
        st.session_state["ex_launch"] = launch.id
        st.toast(f"{len(launch.arms)} arm(s) queued" if launch.arms else "Nothing to train: every arm is finished")
    except DPCoreError as exc:
        st.error(str(exc))


def _launch_box(launch: ex.ExperimentLaunch) -> None:
    n = len(launch.arms)
    done = sum(j.finished for j in launch.jobs())
    state = {"starting": "starting", "pretraining": "making the pretrained weights first (pretrain step)",
             "queued": "training" if not launch.finished else "finished", "failed": "failed",
             "cancelled": "cancelled"}.get(launch.status, launch.status)
    st.progress(launch.progress, text=f"{launch.experiment.name}: {state} — {done} of {n} arm(s) finished")
    if launch.error:
        st.error(launch.error)
    for line in launch.log[-3:]:
        st.caption(line)
    if not launch.finished:
        c1, c2 = st.columns(2)
        if c1.button("Refresh", key="ex_refresh"):
            st.rerun()
        if c2.button("Cancel the experiment", key="ex_cancel", icon="⏹"):
            launch.cancel()
            st.toast("Cancel requested: the running arm stops at its next step; the queued arms are dropped.")


def _results() -> None:
    comp = ex.comparison(exp, store())
    st.subheader("Comparison")
    if not any(r["run_id"] for r in comp.rows):
        st.info("No stored runs of this experiment version yet: run it above (or `python -m dpcore experiment "
                f"{name}`).")
        return
    df = pd.DataFrame(comp.rows)
    df["time"] = [fmt_duration(r["duration_s"]) for r in comp.rows]
    cols = ["arm", "status"] + [c if c != "duration_s" else "time" for c in comp.metrics]
    if df[["reference_accuracy", "reference_roc_auc"]].notna().any().any():
        cols += ["reference_accuracy", "reference_roc_auc"]
    cols.append("run_id")
    show_table(as_percent(df[cols], ["accuracy", "balanced_accuracy", "reference_accuracy"]), key="ex_table",
               column_config=experiment_columns())
    st.caption(f"{comp.done} of {len(comp.rows)} arms finished. Each row is the arm's latest finished run of "
               f"version {exp.version}; ε spent is the accountant's value for the steps actually taken (from the "
               "run's card).")
    options = [m for m in ("accuracy", "balanced_accuracy", "roc_auc") if m in comp.metrics] or ["accuracy"]
    metric = st.radio("Chart", options, horizontal=True, key="ex_metric",
                      format_func=lambda m: ex.METRICS[m])
    st.plotly_chart(comparison_figure(comp.rows, metric=metric, title=f"{exp.name}: {ex.METRICS[metric]} vs ε"),
                    key="ex_chart")


def _live() -> "ex.ExperimentLaunch | None":
    launch = ex.get_launch(st.session_state.get("ex_launch"))
    if launch is not None and launch.experiment.name == exp.name:
        _launch_box(launch)
    _results()
    return launch


@st.fragment(run_every="2s")
def _live_fragment() -> None:
    launch = _live()
    if launch is None or launch.finished:
        st.rerun()  # draw once more without the timer


current = ex.get_launch(st.session_state.get("ex_launch"))
if current is not None and current.experiment.name == exp.name and not current.finished:
    _live_fragment()
else:
    _live()

with st.expander("Job queue"):
    show_queue()
