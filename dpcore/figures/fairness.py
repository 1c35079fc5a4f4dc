"""Subgroup charts: one metric per group, DP beside non-private, with each run's largest gap annotated."""
from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

METRIC_TITLES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "roc_auc": "ROC-AUC",
                 "positive_recall": "recall of the positive class"}
COLORS = ("#d62728", "#1f77b4")  # first run (usually DP) red, second (non-private) blue


def _scale(metric: str) -> float:
    return 1.0 if metric == "roc_auc" else 100.0


def _fmt_gap(metric: str, gap: dict[str, Any] | None) -> str:
    if not gap:
        return "n/a"
    if metric == "roc_auc":
        return f"{gap['gap']:.3f} ({gap['best_group']} vs {gap['worst_group']})"
    return f"{gap['gap'] * 100:.1f} pts ({gap['best_group']} vs {gap['worst_group']})"


def fairness_figure(reports: list[dict[str, Any]], metric: str = "accuracy", title: str = "") -> go.Figure:
    """Grouped bars: x = groups of one attribute, one bar per run (`fairness.fairness_report` outputs with
    their "run" summary). Small and unknown groups are drawn hatched (they are not in the gap); the largest
    gap of each run is drawn as a bracket between its best and worst group and written above the chart."""
    fig = go.Figure()
    scale = _scale(metric)
    groups: list[str] = []
    for rep in reports:
        groups += [g for g in rep["groups"] if g not in groups]
    notes = []
    for k, rep in enumerate(reports):
        label = rep.get("run", {}).get("label", f"run {k + 1}")
        color = COLORS[k % len(COLORS)]
        ys, texts, patterns, hover = [], [], [], []
        for g in groups:
            r = rep["groups"].get(g)
            v = None if r is None else r.get(metric)
            ys.append(None if v is None else v * scale)
            texts.append("" if v is None else (f"{v:.3f}" if metric == "roc_auc" else f"{v * 100:.0f}"))
            out = r is not None and (r.get("small") or r.get("unknown"))
            patterns.append("/" if out else "")
            why = ""
            if r is not None and r.get("small"):
                why = f"<br>small group (n < {rep['min_group']}): not in the gap"
            elif r is not None and r.get("unknown"):
                why = "<br>missing metadata: not in the gap"
            if r is not None and v is None and r.get("roc_auc_note") and metric == "roc_auc":
                why += f"<br>{r['roc_auc_note']}"
            hover.append(f"{g}: n = {r['n'] if r else 0}{why}")
        fig.add_trace(go.Bar(x=groups, y=ys, name=label, marker={"color": color, "pattern": {"shape": patterns}},
                             text=texts, textposition="outside", hovertext=hover,
                             hovertemplate="%{hovertext}<br>%{y:.3g}<extra>" + label + "</extra>"))
        gap = rep["gaps"].get(metric)
        notes.append(f"<span style='color:{color}'>{label}: largest gap {_fmt_gap(metric, gap)}</span>")
        if gap:
            for g, v in ((gap["best_group"], gap["best"]), (gap["worst_group"], gap["worst"])):
                fig.add_shape(type="line", xref="x", yref="y", x0=groups.index(g) - 0.45, x1=groups.index(g) + 0.45,
                              y0=v * scale, y1=v * scale, line={"color": color, "dash": "dot", "width": 1.5})
    if notes:
        fig.add_annotation(text="<br>".join(notes), xref="paper", yref="paper", x=0, y=1.0, xanchor="left",
                           yanchor="bottom", showarrow=False, align="left")
    if not groups:
        fig.add_annotation(text="no groups", xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False)
    attribute = reports[0]["attribute"] if reports else ""
    ytitle = METRIC_TITLES.get(metric, metric) + ("" if metric == "roc_auc" else " (%)")
    if metric == "positive_recall" and reports and reports[0].get("positive_class"):
        ytitle = f"recall of {reports[0]['positive_class']} (%)"
    top = 1.05 * scale
    fig.update_layout(title={"text": title or f"{METRIC_TITLES.get(metric, metric)} by {attribute}", "y": 0.97},
                      barmode="group", xaxis_title=attribute, yaxis_title=ytitle, yaxis_range=[0, top],
                      height=440, margin={"t": 60 + 22 * len(notes)}, legend={"orientation": "h", "y": -0.2})
    return fig
