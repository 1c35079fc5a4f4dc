"""Tables: one format per kind of number on every page (accuracies in percent as fmt_pct, ε as fmt_eps; the text
formats live in dpcore.analysis.labels)."""
from __future__ import annotations

import streamlit as st

PCT_FORMAT = "%.1f %%"  # applied to values × 100 (see as_percent): '29.4 %', the same as fmt_pct
EPS_FORMAT = "%.3g"
AUC_FORMAT = "%.3f"


def pct_column(label: str, help: str | None = None):
    return st.column_config.NumberColumn(label, format=PCT_FORMAT, help=help, width=90)


def eps_column(label: str = "ε spent", help: str | None = None):
    return st.column_config.NumberColumn(label, format=EPS_FORMAT, help=help, width=65)


def auc_column(label: str = "ROC-AUC", help: str | None = None):
    return st.column_config.NumberColumn(label, format=AUC_FORMAT, help=help, width=90)


def as_percent(df, columns):
    """A copy of `df` with the fractions of `columns` (those present) × 100, for a PCT_FORMAT column."""
    out = df.copy()
    for c in columns:
        if c in out.columns:
            out[c] = out[c].astype(float) * 100
    return out


def show_table(df, column_config=None, key=None, **kwargs):
    """st.dataframe as every table here draws it: the page's full width, missing values as '—' (not 'None')."""
    return st.dataframe(df, hide_index=True, width="stretch", placeholder="—", column_config=column_config, key=key,
                        **kwargs)


def experiment_columns() -> dict:
    """Column formats of an experiment's comparison table (dpcore.analysis.experiments.comparison rows, as_percent applied to
    accuracy and balanced_accuracy), shared by the Experiments and the Runs page."""
    return {
        "target_epsilon": eps_column("target ε"),
        "epsilon": eps_column(help="— = non-private or not run"),
        "accuracy": pct_column("test accuracy"),
        "balanced_accuracy": pct_column("balanced accuracy"),
        "roc_auc": auc_column(),
        "patient_epsilon": eps_column("ε per patient", help="patient-level runs: their ε; image-level runs: the "
                                      "group-privacy ε of the largest patient (inf: no finite bound); — where the "
                                      "data name no patients"),
        "patient_delta": st.column_config.NumberColumn("δ per patient", format="%.3g",
                                                       help="≥ 1 (or inf) promises nothing"),
        "reference_accuracy": pct_column("reported accuracy"),
        "reference_roc_auc": auc_column("reported ROC-AUC"),
        "time": st.column_config.TextColumn("time"),
        "duration_s": st.column_config.NumberColumn("time (s)", format="%.0f"),
    }
