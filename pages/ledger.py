"""Privacy budget: the ε each image has spent over every run on this machine, against a data set's budget."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import math
import sqlite3

import pandas as pd
import streamlit as st

from dpcore.errors import DPCoreError
from dpcore.privacy.ledger import Ledger, LedgerError, composition_sentence
from dpcore.figures.ledger import image_epsilon_figure, ledger_figure
from dpcore.analysis.labels import fmt_time

st.title("💰 Privacy budget")
st.caption("Every use of an image spends privacy — tuning runs, failed and killed runs, another seed's split, a "
           "resized copy in another folder. The machine's ledger identifies each image by its content and records "
           "which runs trained on it; **an image's ε composes every run that included it** (dp-accounting, RDP and "
           "PLD; per image the tighter). Deleting a run keeps its record. Beside the per-image account, where the "
           "data name patients (or lesions), **each patient's ε** composes every run that held any of their images: "
           "patient-level runs by their own ε, image-level runs by group privacy. From a terminal: "
           "`python -m dpcore ledger`.")


def _f(v, digits: int = 4) -> str:
    return "—" if v is None else ("∞" if math.isinf(v) else f"{v:.{digits}g}")


@st.cache_data(show_spinner="Composing every image's runs…", max_entries=16)
def _summary(path: str, key: str, stamp: tuple):
    s = Ledger(path).summary(key)
    return (s, Ledger(path).cumulative(key), Ledger(path).owner_exposure(key).to_dict(),
            Ledger(path).worst_composition(key, s))


try:
    ledger = Ledger()
    sets = ledger.datasets()
except (DPCoreError, OSError, sqlite3.Error) as exc:
    st.error(f"The privacy ledger cannot be read: {exc}")
    st.stop()
st.caption(f"Ledger: `{ledger.path}`")
if not sets:
    st.info("No runs yet: every training run records its images here before its first step.")
    st.stop()

key = st.selectbox("Data set", [d["key"] for d in sets], key="ledger_ds",
                   format_func=lambda k: next(f"{d['name']} · {d['n_images']:,} images" for d in sets
                                              if d["key"] == k))
s, points, owners, worked = _summary(str(ledger.path), key, ledger.stamp())
info = s.to_dict()
if s.n_void:
    voiding = [r for r in s.runs if r.voids]
    st.error(f"**No DP guarantee holds for {s.n_void:,} of these images.** They were used without one by "
             + ", ".join(f"{r.run_id} ({r.kind}: {r.label or 'non-private'})" for r in voiding[:4])
             + (" …" if len(voiding) > 4 else "") + ": whatever else was released from them, their ε is ∞.")
cols = st.columns(4)
acc = s.exposure.max_accountant
cols[0].metric("Most-exposed image: ε" + (f" ({acc})" if acc else ""), _f(s.epsilon),
               help=f"RDP {_f(s.epsilon_of('rdp'))}, PLD {_f(s.epsilon_of('pld'))}, at δ = {_f(s.delta, 3)}; per image "
                    "the smaller of the two (both are valid upper bounds)")
cols[1].metric("Median image: ε", _f(info["epsilon_median"]),
               help="per image the tighter of RDP and PLD, like the most-exposed image's")
cols[2].metric("Images trained on", f"{s.n_trained:,}",
               help=f"of the {s.n_images:,} images of this data set; the others were only evaluated (test splits)")
cols[3].metric("Remaining of budget", (_f(s.remaining) if not s.void else "none (void)")
               if s.budget_epsilon is not None else "no budget")

if owners["n_owners"]:
    unit = "lesion" if any(r.unit == "lesion" for r in s.runs) else "patient"
    o = st.columns(4)
    o[0].metric(f"Most-exposed {unit}: ε", _f(owners["epsilon_max"]),
                help=f"{owners['worst_owner']}, at δ = {_f(owners['delta_of_max'], 3)}: {unit}-level runs count with "
                     f"their own ε; an image-level run that held k ≥ 2 of the {unit}'s images by group privacy "
                     "(kε, k·e^{(k−1)ε}·δ), added to the rest — a valid bound, not a tight one")
    o[1].metric(f"Median {unit}: ε", _f(owners["epsilon_median"]))
    o[2].metric(f"{unit.title()}s trained on", f"{owners['n_owners']:,}")
    if owners["n_without_owner_record"]:
        o[3].caption(f"{owners['n_without_owner_record']:,} training images of older runs have no {unit} recorded "
                     "and are not in these figures.")
st.plotly_chart(image_epsilon_figure(s.exposure.histogram(), s.budget_epsilon, title=f"ε spent per image — {s.name}"),
                key="ledger_hist")
st.caption("Images that were trained on by the same runs share one ε (per image the tighter of RDP and PLD), so the "
           "bars are few. A second run on a subset raises the ε of the images it shares and leaves the others where "
           "they were.")
st.markdown(composition_sentence(worked) or "Composition is much tighter than adding ε's: two runs at ε = 1 on the "
            "same images compose to about 1.3–1.4, not 2.")
if info["n_evaluated_and_trained"]:
    st.warning(f"{info['n_evaluated_and_trained']:,} images trained on were also in some run's test split: that "
               "run's test metrics were released without DP and are not covered by their ε.")

with st.form("ledger_budget"):
    budget = st.number_input("Largest ε any one image of this data set may reach (0 = no budget)", 0.0, 1000.0,
                             value=float(s.budget_epsilon or 0.0), step=0.5, key="ledger_budget_eps",
                             help="Launches (app, CLI, sweeps, experiments, queued jobs) that would take an image "
                                  "past it are refused unless overridden; the override is recorded.")
    if st.form_submit_button("Save budget"):
        try:
            ledger.set_budget(key, budget or None)
            st.toast("Budget saved")
            st.rerun()
        except LedgerError as exc:
            st.error(str(exc))

with st.expander("The most-exposed image's ε after each use", expanded=False):
    st.plotly_chart(ledger_figure(points, s.budget_epsilon, title=s.name), key="ledger_chart")
    st.caption("Composed: the accountant composes every run's Poisson-sampled Gaussian mechanism (σ, q, T) at one δ "
               "for the images they share — tighter than adding the runs' ε (basic composition), which is a valid "
               "upper bound too.")
rows = [{"use": e.run_id, "kind": e.kind, "what": e.label, "status": e.shown_status,
         "guarantee": "DP-SGD" if e.guaranteed else "none (voids its images)", "images": e.n_train,
         "σ": e.noise_multiplier, "q": e.sample_rate, "steps counted": e.steps, "δ": e.delta,
         "ε of the run alone": e.epsilon, "accountant": (e.accountant or "").upper() or "—", "over budget": "yes (allowed)" if e.over_budget else "",
         "recorded": fmt_time(e.started_at)} for e in s.runs]
st.dataframe(pd.DataFrame(rows), hide_index=True, key="ledger_table")
st.caption("A run still marked running whose process is gone shows as *interrupted*: the ledger counts the steps it "
           "had reserved, at least the steps it took.")
