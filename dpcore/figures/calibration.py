"""The reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

BEFORE, AFTER = "#d62728", "#1f77b4"  # the model's own probabilities red, calibrated blue


def _points(bins: list[dict[str, Any]]) -> tuple[list[float], list[float], list[int]]:
    full = [b for b in bins if b["count"]]
    return ([100 * b["confidence"] for b in full], [100 * b["accuracy"] for b in full], [b["count"] for b in full])


def reliability_figure(calibration: dict[str, Any], title: str = "") -> go.Figure:
    """Top: accuracy vs mean confidence per bin (the diagonal is perfect calibration; below it the model is
    over-confident). Bottom: how many evaluation-half images fall in each confidence bin. Legend above the plot."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06)
    fig.add_trace(go.Scatter(x=[0, 100], y=[0, 100], mode="lines", name="perfect calibration",
                             line={"color": "#888", "dash": "dash"}, hoverinfo="skip"), row=1, col=1)
    t = calibration.get("temperature")
    series = [("bins_before", f"model as trained (ECE {100 * calibration['ece_before']:.1f} %)", BEFORE)]
    if calibration.get("bins_after"):
        series.append(("bins_after", f"temperature T = {t:.3g} (ECE {100 * calibration['ece_after']:.1f} %)",
                       AFTER))
    width = 100 / max(len(calibration["bins_before"]), 1)
    for key, label, color in series:
        x, y, n = _points(calibration[key])
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, line={"color": color},
                                 marker={"size": 8}, customdata=n, legendgroup=key,
                                 hovertemplate="confidence %{x:.1f} %<br>accuracy %{y:.1f} %<br>%{customdata} "
                                               "images<extra></extra>"), row=1, col=1)
        mids = [100 * (b["lo"] + b["hi"]) / 2 for b in calibration[key] if b["count"]]
        fig.add_trace(go.Bar(x=mids, y=n, width=width * 0.9 / len(series), marker={"color": color, "opacity": 0.6},
                             offset=(-0.45 + 0.45 * series.index((key, label, color))) * width,
                             name=label, legendgroup=key, showlegend=False,
                             hovertemplate="%{y} images<extra></extra>"), row=2, col=1)
    fig.update_xaxes(range=[0, 100], row=1, col=1)
    fig.update_xaxes(range=[0, 100], title_text="confidence of the predicted class (%)", row=2, col=1)
    fig.update_yaxes(range=[0, 102], title_text="accuracy (%)", row=1, col=1)
    fig.update_yaxes(title_text="images", row=2, col=1)
    fig.update_layout(title=title or None, height=520, barmode="overlay",
                      margin={"t": 110 if title else 80, "r": 20, "l": 60, "b": 50},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0})
    return fig
