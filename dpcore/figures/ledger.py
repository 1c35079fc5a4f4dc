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
    labels = [f"{p['run_id']} ({p['label'] or ''})" + (f" · {p['accountant']}" if p.get("accountant") else "")
              for p in finite]
    fig.add_trace(go.Scatter(x=x, y=[p["epsilon"] for p in finite], mode="lines+markers",
                             name="composed (tighter of RDP / PLD)",
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
                      yaxis_title="ε of the most-exposed image", height=380, margin={"t": 60},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def image_epsilon_figure(histogram: list[tuple[float, int]], budget: float | None = None,
                         title: str = "") -> go.Figure:
    """How many images have spent how much: one bar per distinct per-image ε (images with the same set of
    runs share one ε), coloured by whether it is within the budget; void images (ε = ∞) in red."""
    fig = go.Figure()
    if not histogram:
        fig.add_annotation(text="no images recorded yet", xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False)
    labels, counts, colours, hover = [], [], [], []
    for eps, n in histogram:
        if math.isinf(eps):
            labels.append("∞ (void)")
            colours.append("firebrick")
            hover.append(f"{n:,} images used without a guarantee: no DP bound holds for them")
        else:
            labels.append("0 (not trained on)" if eps == 0 else f"{eps:.3g}")
            over = budget is not None and eps > budget
            colours.append("darkorange" if over else ("#9aa5b1" if eps == 0 else "#1f77b4"))
            hover.append(f"{n:,} images at ε = {eps:.4g}" + (" — over the budget" if over else ""))
        counts.append(n)
    fig.add_trace(go.Bar(x=labels, y=counts, marker_color=colours, hovertext=hover, hoverinfo="text",
                         text=[f"{n:,}" for n in counts], textposition="outside", cliponaxis=False))
    note = f"budget ε = {budget:g} per image (orange: over)" if budget is not None else "no budget set"
    fig.update_layout(title=title or "ε spent per image", xaxis_title=f"ε of the image, composed over every run that "
                      f"trained on it · {note}", yaxis_title="images", height=380, margin={"t": 60},
                      xaxis={"type": "category"}, showlegend=False)
    return fig
