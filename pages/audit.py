"""Audit: a membership-inference audit (loss threshold + LiRA) of a finished run's mechanism, with a valid
one-run ε lower bound (Steinke, Nasr & Jagielski 2023).

The audit runs on a background thread (dpcore.analysis.audit.start_audit) and writes its progress next to the run;
this page only launches it, polls the progress file and draws the stored audit.json.
"""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import streamlit as st

from dpcore.analysis import audit as au
from dpcore.errors import DPCoreError
from dpcore.analysis.labels import fmt_duration, run_label
from pages.common import store
from pages.parts.audit_result import show_result

st.title("🕵️ Membership-inference audit")
st.caption("Can an attacker tell whether an image was in the training data? The audit replays this run's "
           "mechanism with the trainer's own loop — its config (augmentation, EMA, lr schedule, weight "
           "standardisation) and, for a private run, its exact σ, q and T, so the same ε — on a fresh target "
           "model whose training set includes each candidate image independently with probability 1/2, plus "
           "shadow models on random halves, then attacks the target.")

runs = {r.run_id: r for r in reversed(store().list_runs()) if r.status == "done"}
if not runs:
    st.info("No finished run yet: train one first (a head-only run on cached features audits in seconds).")
    st.page_link("pages/train.py", label="Go to Train", icon="🏋️")
    st.stop()

run_id = st.selectbox("Run", list(runs), format_func=lambda i: run_label(runs[i]), key="au_run")
record = runs[run_id]


def _launch_form() -> None:
    st.warning("**Recorded in the privacy ledger.** " + au.LEDGER_STATEMENT + " Audit a run whose images you can "
               "afford to spend, or audit a stand-in run on other data.", icon="📒")
    with st.form("au_form"):
        c1, c2, c3 = st.columns(3)
        shadows = c1.slider("Shadow models S", 2, 32, 8, step=2, key="au_shadows",
                            help="More shadows: sharper per-image IN/OUT Gaussians for LiRA, longer audit.")
        seed = c2.number_input("Seed", 0, 10_000, 0, key="au_seed")
        pool = c3.number_input("Candidates (0 = all of train ∪ test)", 0, 1_000_000, 0, step=100, key="au_pool",
                               help="At most 1/(2δ) are used: the one-run bound needs 2·m·δ ≤ 1.")
        scope = None
        if record.config.scope != "head":
            proxy = st.checkbox("Head-only proxy on cached features (fast; same σ, q, T; no augmentation)",
                                key="au_proxy",
                                help=f"This run fine-tuned scope '{record.config.scope}'. Replaying that for "
                                     "S+1 models is slow without a GPU for anything but tiny_cnn.")
            scope = "head" if proxy else None
        go = st.form_submit_button("Run the audit", type="primary", icon="🕵️")
    if go:
        settings = au.AuditSettings(shadows=int(shadows), seed=int(seed), pool_size=int(pool) or None)
        try:
            au.start_audit(store(), run_id, settings, scope=scope)
        except DPCoreError as exc:
            st.error(str(exc))
        else:
            st.rerun()  # draw the progress panel


@st.fragment(run_every="1s")
def _progress_panel() -> None:
    prog = au.read_progress(store(), run_id) or {}
    if prog.get("status") != "running":
        st.rerun()
    done, total = prog.get("done", 0), max(prog.get("total", 1), 1)
    eta = f" · about {fmt_duration(prog['eta'])} left" if prog.get("eta") else ""
    st.progress(min(1.0, done / total), text=f"{prog.get('message', '')} ({done}/{total} models){eta}")
    if prog.get("log"):
        st.caption(prog["log"][-1])


prog = au.read_progress(store(), run_id)
running = prog is not None and prog.get("status") == "running"
if running:
    st.info("An audit of this run is running in the background; this panel follows it.")
    _progress_panel()
else:
    if prog is not None and prog.get("status") == "failed":
        st.error(f"The last audit failed: {prog.get('error')}")
    _launch_form()

result = au.read_audit(store(), run_id)
if result is None:
    if (store().run_dir(run_id) / au.AUDIT_FILE).exists():
        st.caption("This run's stored audit is from an older version whose ε 'bounds' were not valid "
                   "(independent-trial statistics on one training run); run the audit again.")
    elif not running:
        st.caption("No audit of this run yet. A head-only run on cached features takes seconds per model; a "
                   "full fine-tuning replays the whole training S+1 times.")
else:
    show_result(result)
