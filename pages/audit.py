"""Audit: a membership-inference audit (loss threshold + LiRA) of a finished run's mechanism, with a valid
one-run ε lower bound (Steinke, Nasr & Jagielski 2023).

The audit runs on a background thread (dpcore.analysis.audit.start_audit) and writes its progress next to the run;
this page only launches it, polls the progress file and draws the stored audit.json.
"""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import streamlit as st

from dpcore.analysis import audit as au
from dpcore.figures import audit as audit_figures
from dpcore.errors import DPCoreError
from dpcore.analysis.labels import fmt_duration, fmt_eps, fmt_time, run_label
from pages.common import store

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


def _show(result: dict) -> None:
    s = result["summary"]
    cfg = result["config"]
    bound = result["bound"]
    claimed = result.get("claimed_epsilon")
    level = f"{bound['confidence']:.0%}"
    st.subheader("Result")
    unit = result.get("candidate_unit", "image")
    what = (f"{result['n_candidates']:,} candidate patients ({result.get('n_candidate_images', 0):,} images; each "
            "patient in or out with ALL of their images)" if unit == "patient" else
            f"{result['n_candidates']:,} candidate images")
    st.caption(f"Audited {fmt_time(result.get('created_at'))}: {what} "
               f"(each in the audit target with probability 1/2: {result['n_members']:,} were), {cfg['shadows']} "
               f"shadow models, scope {cfg['scope']}{' (head-only proxy)' if cfg.get('proxy') else ''}, seed "
               f"{cfg['seed']}, {fmt_duration(result['timings']['total_s'])}.")
    cols = st.columns(4)
    cols[0].metric("Best attack AUC", f"{s['attack_auc']:.3f}", help="Descriptive, not a bound. 0.5 = guessing")
    cols[1].metric("TPR at 1 % FPR", f"{100 * s['tpr_at_0.01_fpr']:.1f} %",
                   help="Descriptive, not a bound: members caught when 1 % of non-members are wrongly accused")
    cols[2].metric(f"Empirical ε ≥ ({level})", f"{s['epsilon_lb']:.3g}", help=bound["correction"])
    cols[3].metric("Claimed ε", fmt_eps(claimed))

    rows = [{"attack": au.ATTACK_LABELS.get(name, name), "ROC-AUC": a["auc"], "TPR @ 1% FPR": a["tpr_at_0.01_fpr"],
             "TPR @ 0.1% FPR": a["tpr_at_0.001_fpr"], f"ε lower bound ({level} joint)": a["epsilon_lb"],
             "guesses (k₊ in, k₋ out)": f"{a['k_plus']}, {a['k_minus']}"}
            for name, a in au.ordered_attacks(result)]
    st.dataframe(rows, hide_index=True, column_config={
        "ROC-AUC": st.column_config.NumberColumn(format="%.3f"),
        "TPR @ 1% FPR": st.column_config.NumberColumn(format="percent"),
        "TPR @ 0.1% FPR": st.column_config.NumberColumn(format="percent"),
        f"ε lower bound ({level} joint)": st.column_config.NumberColumn(format="%.3f")})
    st.caption(f"AUC and TPR are descriptive statistics of these candidates, not bounds. The ε bounds are valid "
               f"{level} lower bounds jointly: {bound['correction']}.")
    left, right = st.columns(2)
    left.plotly_chart(audit_figures.roc_figure(result), key="au-roc")
    right.plotly_chart(audit_figures.epsilon_figure(result), key="au-eps")

    st.subheader("What this means")
    if claimed is None:
        st.warning(f"This run is **not private**: it claims no ε. The strongest attack reaches AUC "
                   f"{s['attack_auc']:.3f}, and the audit proves ε ≥ {s['epsilon_lb']:.3g} ({level} confidence) "
                   "for this mechanism — any real guarantee would have to be at least that large.")
    elif s["consistent"]:
        st.success(f"The run claims ε = {claimed:.3g}. The audit proves only ε ≥ {s['epsilon_lb']:.3g} "
                   f"({level} confidence), which is consistent with the claim.")
    else:
        st.error(f"The audit proves ε ≥ {s['epsilon_lb']:.3g} with {level} confidence, **more than the claimed "
                 f"ε = {claimed:.3g}**: the training code does not deliver its guarantee (or this was the "
                 f"{1 - bound['confidence']:.0%} chance). Report it; re-running until a bound looks better voids "
                 "the confidence.")
    st.markdown(
        "- **DP caps every attack.** With (ε, δ)-DP, at any false-positive rate FPR an attacker's true-positive "
        "rate is at most e^ε·FPR + δ (the red dashed line on the ROC).\n"
        "- **One training run, valid statistics.** The candidates are not independent trials (one model was "
        "trained on all of them), so the bound uses the one-run theorem of Steinke, Nasr & Jagielski (2023): "
        "the attacker guesses *in* for the k₊ highest scores and *out* for the k₋ lowest, and every ε below "
        "the bound is ruled out: an (ε, δ)-DP mechanism would give that many correct guesses with probability "
        f"at most β. {bound['correction']}.\n"
        "- **A lower bound, not a measurement of ε.** It is what *these* attacks can show from one training run "
        "on a few thousand images; the real leakage of the worst-case image can be much larger. A bound far "
        "below the claimed ε does not mean the accountant is loose.\n"
        "- **Not covered by any guarantee.** " + result.get("ledger", {}).get("statement", au.LEDGER_STATEMENT))


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
    _show(result)
