"""Privacy budget: per data set, every run's spending composed by the accountant, against a budget."""
import math

import pandas as pd
import streamlit as st

from dpcore.ledger import Ledger, LedgerError
from dpcore.ledger_figures import ledger_figure
from pages.common import fmt_time, runs_dir

st.title("💰 Privacy budget")
st.caption("Every run on a data set spends privacy: tuning runs, failed and cancelled runs included. The ledger keeps "
           "one entry per run under the data set's identity (a content hash of its training split) and composes them "
           "all with the accountant. Deleting a run does not delete its entry. The same from a terminal: "
           "`python -m dpcore ledger`.")


def _f(v, digits: int = 4) -> str:
    return "—" if v is None else ("∞" if math.isinf(v) else f"{v:.{digits}g}")


ledger = Ledger(runs_dir())
sets = ledger.datasets()
if not sets:
    st.info("No runs yet: every training run adds its data set here.")
    st.stop()

key = st.selectbox("Data set", [d["key"] for d in sets], key="ledger_ds",
                   format_func=lambda k: next(f"{d['name']} · {k[:8]}" for d in sets if d["key"] == k))
s = ledger.summary(key)
if s.void:
    st.error(f"**No DP guarantee holds for this data set any more.** Non-private run(s) "
             f"{', '.join(s.non_private_runs)} trained on these images without clipping or noise, so whatever "
             "else was released from them, the composed ε is ∞.")
cols = st.columns(4)
cols[0].metric("Runs", s.runs, help=f"{s.private_runs} private, {len(s.non_private_runs)} non-private")
cols[1].metric("Total ε (accountant)", _f(s.epsilon),
               help=f"RDP {_f(s.epsilon_rdp)}, PLD {_f(s.epsilon_pld)}; the smaller is valid, at δ = {_f(s.delta, 3)}")
cols[2].metric("Basic composition", _f(s.basic_epsilon), help=f"Σ ε over runs, at Σ δ = {_f(s.basic_delta, 3)}")
cols[3].metric("Remaining of budget", _f(s.remaining) if s.budget_epsilon is not None else "no budget")

with st.form("ledger_budget"):
    budget = st.number_input("Total ε budget for this data set (0 = none)", 0.0, 1000.0,
                             value=float(s.budget_epsilon or 0.0), step=0.5, key="ledger_budget_eps",
                             help="The Train page warns before a launch that would take the total past it.")
    if st.form_submit_button("Save budget"):
        try:
            ledger.set_budget(key, budget or None)
            st.toast("Budget saved")
            st.rerun()
        except LedgerError as exc:
            st.error(str(exc))

st.plotly_chart(ledger_figure(ledger.cumulative(key), s.budget_epsilon, title=s.name), key="ledger_chart")
st.caption("Composed: dp-accounting composes every run's Poisson-sampled Gaussian mechanism (σ, q, T) at one δ — "
           "much tighter than adding the runs' ε (basic composition), which is always a valid upper bound too.")
rows = [{"run": e.run_id, "what": e.label, "status": e.status, "private": e.private,
         "σ": e.noise_multiplier, "q": e.sample_rate, "steps T": e.steps, "δ": e.delta, "ε of the run": e.epsilon,
         "recorded": fmt_time(e.recorded_at)} for e in s.entries]
st.dataframe(pd.DataFrame(rows), hide_index=True, key="ledger_table")
