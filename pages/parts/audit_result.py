"""The Audit page's result: the attacks' AUC and TPR, the valid one-run ε lower bound against the claimed ε,
the ROC and ε charts, and what they mean."""
from __future__ import annotations

import streamlit as st

from dpcore.analysis import audit as au
from dpcore.analysis.labels import fmt_duration, fmt_eps, fmt_time
from dpcore.figures import audit as audit_figures


def show_result(result: dict) -> None:
    """The stored audit: attacks, the one-run ε lower bound against the claimed ε, and what they mean."""
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
