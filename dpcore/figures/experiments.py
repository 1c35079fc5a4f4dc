"""Plotly figure of an experiment's comparison: rows in (from dpcore.analysis.experiments.comparison), Figure out.

DP arms of one group (an arm of the file crossed with the ε grid) become one line of the metric against
the ε they spent (log x); a non-private arm is a dashed horizontal line; a published reference value
(the seed's reported number) is a hollow star at the arm's target ε. No UI library here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from dpcore.figures.runs import LEGEND_BELOW, log_epsilon_axis, score_axis

_TITLES = {"accuracy": "test accuracy", "balanced_accuracy": "balanced accuracy", "roc_auc": "ROC-AUC"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=110), hovermode="closest",
               legend=LEGEND_BELOW)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(metric: str, v: float) -> str:
    return f"{100 * v:.1f} %" if metric in ("accuracy", "balanced_accuracy") else f"{v:.3f}"


def comparison_figure(rows: Sequence[dict[str, Any]], metric: str = "accuracy", title: str = "") -> go.Figure:
    """Metric vs ε spent per arm group; non-private arms as dashed lines; reported reference values as stars."""
    name = _TITLES.get(metric, metric.replace("_", " "))
    yfmt = ".1%" if metric in ("accuracy", "balanced_accuracy") else ".3f"
    fig = go.Figure()
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group") or r["arm"], []).append(r)
    plotted = 0
    for group, members in groups.items():
        pts = sorted((r for r in members if r.get("private") and _finite(r.get("epsilon")) and r["epsilon"] > 0
                      and _finite(r.get(metric))), key=lambda r: r["epsilon"])
        if pts:
            plotted += len(pts)
            fig.add_trace(go.Scatter(
                x=[r["epsilon"] for r in pts], y=[r[metric] for r in pts], mode="lines+markers", name=group,
                text=[r["arm"] for r in pts], customdata=[r.get("run_id") for r in pts],
                cliponaxis=False, hovertemplate="%{text}<br>ε spent=%{x:.3g}<br>" + name
                + "=%{y:" + yfmt + "}<extra></extra>"))
        for r in members:
            if not r.get("private") and _finite(r.get(metric)):
                plotted += 1
                fig.add_hline(y=r[metric], line_dash="dash", line_color="gray",
                              annotation_text=f"{r['arm']}: {_fmt(metric, r[metric])}",
                              annotation_position="bottom right")
    refs = [r for r in rows if _finite(r.get(f"reference_{metric}"))]
    for r in refs:
        x = r.get("target_epsilon") if _finite(r.get("target_epsilon")) else None
        if x is None:  # a reported non-private number: a dotted line
            fig.add_hline(y=r[f"reference_{metric}"], line_dash="dot", line_color="firebrick",
                          annotation_text=f"reported: {r['arm']} {_fmt(metric, r[f'reference_{metric}'])}",
                          annotation_position="top left")
            continue
        fig.add_trace(go.Scatter(
            x=[x], y=[r[f"reference_{metric}"]], mode="markers", name=f"reported: {r['arm']}",
            marker=dict(symbol="star-open", size=14, color="firebrick"),
            hovertemplate=f"{r.get('reference_source') or 'reported'}<br>ε=%{{x:.3g}}<br>{name}=%{{y:{yfmt}}}"
                          "<extra></extra>"))
    fig.update_layout(title=title or f"{name} vs ε spent", xaxis_title="ε spent (log scale)", yaxis_title=name,
                      **_LAYOUT)
    xs = [x for t in fig.data for x in (t.x or ())]
    ys = [y for t in fig.data for y in (t.y or ())] + [s.y0 for s in fig.layout.shapes]
    fig.update_xaxes(**log_epsilon_axis(xs))
    if metric in _TITLES:
        fig.update_yaxes(**score_axis(metric, ys))
    if not plotted:
        fig.add_annotation(text="no finished arms yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font=dict(size=14, color="gray"))
    return fig
