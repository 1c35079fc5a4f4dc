"""The ledger's chart: a data set's total ε after each run, composed vs summed, against its budget."""
from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go


def ledger_figure(points: list[dict[str, Any]], budget: float | None = None, title: str = "") -> go.Figure:
    """`points` from Ledger.cumulative: composed ε (accountant) and basic composition after each run."""
    fig = go.Figure()
    finite = [p for p in points if not math.isinf(p["epsilon"])]
    x = list(range(1, len(finite) + 1))
    labels = [f"{p['run_id']} ({p['label'] or ''})" for p in finite]
    fig.add_trace(go.Scatter(x=x, y=[p["epsilon"] for p in finite], mode="lines+markers", name="composed (accountant)",
                             text=labels, hovertemplate="after run %{x}: ε = %{y:.4g}<br>%{text}<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=[p["basic"] for p in finite], mode="lines+markers", name="basic composition (Σ ε)",
                             line={"dash": "dot"}, text=labels,
                             hovertemplate="after run %{x}: Σ ε = %{y:.4g}<br>%{text}<extra></extra>"))
    if budget is not None:
        fig.add_hline(y=budget, line_dash="dash", line_color="firebrick", annotation_text=f"budget ε = {budget:g}")
    if len(finite) < len(points):
        fig.add_annotation(text="a non-private run used these images: no guarantee holds (ε = ∞) from then on",
                           xref="paper", yref="paper", x=0.5, y=1.08, showarrow=False, font={"color": "firebrick"})
    if not points:
        fig.add_annotation(text="no runs on this data set yet", xref="paper", yref="paper", x=0.5, y=0.5,
                           showarrow=False)
    fig.update_layout(title=title or "Total ε spent on this data set", xaxis_title="runs so far",
                      yaxis_title="ε (composed over all runs)", height=380, margin={"t": 60})
    return fig
