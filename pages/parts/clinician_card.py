"""The Clinician page's test performance: sensitivity, specificity, PPV and NPV per class from the card's
held-out test split."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dpcore.analysis.labels import fmt_pct
from dpcore.training.metrics import clinical_metrics
from pages.parts.formats import as_percent, pct_column, show_table


def test_performance(card: dict) -> None:
    """Sensitivity, specificity, PPV, NPV per class on the held-out test split, and a warning when the model
    does little better than always answering the most frequent class."""
    confusion = (card.get("test_metrics") or {}).get("confusion_matrix")
    names = (card.get("dataset") or {}).get("class_names") or []
    if not confusion or not names:
        return
    try:
        m = clinical_metrics(confusion, names)
    except ValueError:
        return
    weak = ", ".join(m["rarely_recognised"])
    if m["near_majority"]:
        st.error(f"**This model is close to always answering '{m['majority_class']}'**: test accuracy "
                 f"{fmt_pct(m['accuracy'])} against {fmt_pct(m['majority_rate'])} for that trivial rule"
                 + (f"; it recognises {weak} in fewer than 1 in 4 cases" if weak else "")
                 + ". Do not read its output as evidence for or against any class.", icon="⚠️")
    elif weak:
        st.warning(f"**This model rarely recognises {weak}** (in fewer than 1 in 4 test cases): an answer other "
                   "than those classes says little about them.", icon="⚠️")
    rows = [{"class": name, "prevalence (test)": v["prevalence"], "sensitivity": v["sensitivity"],
             "specificity": v["specificity"], "PPV": v["ppv"], "NPV": v["npv"], "test images": v["support"]}
            for name, v in m["per_class"].items()]
    shares = ("prevalence (test)", "sensitivity", "specificity", "PPV", "NPV")
    show_table(as_percent(pd.DataFrame(rows), shares), key="cl_perf", column_config={k: pct_column(k) for k in shares})
    st.caption(f"On the {m['n']:,} held-out test images: balanced accuracy {fmt_pct(m['balanced_accuracy'])}. "
               "Each class against the rest. PPV and NPV depend on how common a class is: these are at the test "
               "split's prevalence, not at your clinic's.")
