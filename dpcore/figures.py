"""Plotly figures of runs (training curves, ε, frontiers, confusion, ROC): data in, Figure out.

Kept free of any UI library so the app, notebooks and tests all draw the same charts, and tests can
check the numbers inside a figure rather than its pixels.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go

from .events import Event

_METRIC_TITLES = {"accuracy": "test accuracy", "balanced_accuracy": "balanced accuracy", "roc_auc": "ROC-AUC",
                  "loss": "test loss"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), hovermode="x unified")


def _title(metric: str) -> str:
    return _METRIC_TITLES.get(metric, metric.replace("_", " "))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _empty_note(fig: go.Figure, text: str) -> go.Figure:
    """A visible 'nothing yet' note, so an empty chart is not mistaken for a broken one."""
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font=dict(size=14, color="gray"))
    return fig


def _target_line(fig: go.Figure, target: float | None) -> None:
    if target is not None:
        fig.add_hline(y=target, line_dash="dash", line_color="firebrick",
                      annotation_text=f"target ε = {target:g}", annotation_position="top left")


def epsilon_curve_figure(curves: dict[str, list[tuple[int, float]]], target: float | None = None,
                         title: str = "ε spent vs step") -> go.Figure:
    """One line per accountant (or any named curve) of ε spent after each step; target dashed."""
    fig = go.Figure()
    for name, points in curves.items():
        pts = sorted((int(s), float(e)) for s, e in points if _finite(e))
        fig.add_trace(go.Scatter(x=[s for s, _ in pts], y=[e for _, e in pts], mode="lines", name=name))
    _target_line(fig, target)
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="ε spent", **_LAYOUT)
    if not any(len(t.x) for t in fig.data):
        _empty_note(fig, "no ε values yet")
    return fig


def _eval_series(events: Sequence[Event], metric: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for e in events:
        if e.kind == "eval" and e.metrics and _finite(e.metrics.get(metric)):
            xs.append(e.step)
            ys.append(float(e.metrics[metric]))
    return xs, ys


def training_figures(events: list[Event], target_epsilon: float | None = None) -> dict[str, go.Figure]:
    """"accuracy", "loss" and "epsilon" charts of one run from its (possibly partial) event list."""
    acc = go.Figure()
    for metric in ("accuracy", "balanced_accuracy", "roc_auc"):
        xs, ys = _eval_series(events, metric)
        acc.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=_title(metric)))
    acc.update_layout(title="Test metrics", xaxis_title="step", yaxis_title="score", yaxis_range=[0, 1.02],
                      **_LAYOUT)
    if not any(len(t.x) for t in acc.data):
        _empty_note(acc, "no evaluation yet")

    loss = go.Figure()
    steps = [e for e in events if e.kind == "step" and _finite(e.loss)]
    if steps:  # non-private runs only: a DP run never releases the loss of its private batches
        loss.add_trace(go.Scatter(x=[e.step for e in steps], y=[float(e.loss) for e in steps], mode="lines",
                                  name="training-batch loss (non-private run)"))
    xs, ys = _eval_series(events, "loss")
    loss.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name="test-split loss"))
    loss.update_layout(title="Loss on the test split" if not steps else "Loss", xaxis_title="step",
                       yaxis_title="cross-entropy", **_LAYOUT)
    if not any(len(t.x) for t in loss.data):
        _empty_note(loss, "no steps yet")

    eps_points = [(e.step, e.epsilon) for e in events if e.kind == "step" and e.epsilon is not None]
    eps = epsilon_curve_figure({"ε spent": eps_points}, target=target_epsilon)
    return {"accuracy": acc, "loss": loss, "epsilon": eps}


def compare_runs_figure(runs: dict[str, list[Event]], metric: str = "accuracy") -> go.Figure:
    """One line per run (label → its events) of an eval metric vs step."""
    fig = go.Figure()
    for label, events in runs.items():
        xs, ys = _eval_series(events, metric)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=label))
    fig.update_layout(title=f"{_title(metric)} vs step", xaxis_title="step", yaxis_title=_title(metric),
                      **_LAYOUT)
    if not any(len(t.x) for t in fig.data):
        _empty_note(fig, "no evaluations to compare yet")
    return fig


def frontier_figure(dp_points: list[dict], nonprivate_points: list[dict], metric: str = "accuracy") -> go.Figure:
    """Privacy–utility frontier: metric vs ε spent (log x); each non-private run as a dashed ceiling."""
    fig = go.Figure()
    pts = sorted((p for p in dp_points if _finite(p.get("epsilon")) and p["epsilon"] > 0
                  and _finite(p.get(metric))), key=lambda p: p["epsilon"])
    fig.add_trace(go.Scatter(
        x=[p["epsilon"] for p in pts], y=[p[metric] for p in pts], mode="lines+markers", name="DP runs",
        text=[p.get("label") or p.get("run_id") for p in pts], customdata=[p.get("run_id") for p in pts],
        hovertemplate="ε=%{x:.3g}<br>" + _title(metric) + "=%{y:.3f}<br>%{text}<extra></extra>"))
    for p in nonprivate_points:
        if _finite(p.get(metric)):
            fig.add_hline(y=p[metric], line_dash="dash", line_color="gray",
                          annotation_text=f"non-private: {p.get('label') or p.get('run_id')}",
                          annotation_position="bottom right")
    fig.update_layout(title=f"{_title(metric)} vs ε spent", xaxis_title="ε spent (log scale)",
                      yaxis_title=_title(metric), xaxis_type="log", **dict(_LAYOUT, hovermode="closest"))
    if not pts and not nonprivate_points:
        _empty_note(fig, "no finished runs for this data set and backbone")
    return fig


def confusion_matrix_figure(matrix: list[list[int]], class_names: list[str]) -> go.Figure:
    """Heatmap of counts, rows = true class, columns = predicted class, with the count in each cell."""
    z = np.asarray(matrix, dtype=int)
    if z.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix has shape {z.shape} but there are {len(class_names)} class names")
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=list(class_names), y=list(class_names), colorscale="Blues",
                               text=z.tolist(), texttemplate="%{text}", hovertemplate=(
                                   "true %{y}<br>predicted %{x}<br>%{z} images<extra></extra>")))
    fig.update_layout(title="Confusion matrix (test split)", xaxis_title="predicted", yaxis_title="true",
                      yaxis_autorange="reversed", template="plotly_white")
    return fig


def roc_curve_figure(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> go.Figure:
    """ROC curves: the positive class for binary tasks, one-vs-rest per class present otherwise."""
    from sklearn.metrics import auc, roc_curve

    labels = np.asarray(labels, dtype=int).reshape(-1)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape != (len(labels), len(class_names)):
        raise ValueError(f"probs must have shape ({len(labels)}, {len(class_names)}), got {probs.shape}")
    fig = go.Figure()
    classes = [1] if len(class_names) == 2 else sorted(set(labels.tolist()))
    for c in classes:
        positives = labels == c
        if positives.all() or not positives.any():  # ROC undefined without both outcomes
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, c])
        fig.add_trace(go.Scatter(x=fpr.tolist(), y=tpr.tolist(), mode="lines",
                                 name=f"{class_names[c]} (AUC {auc(fpr, tpr):.3f})"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(dash="dot", color="gray")))
    fig.update_layout(title="ROC curve (test split)" + ("" if len(class_names) == 2 else ", one vs rest"),
                      xaxis_title="false positive rate", yaxis_title="true positive rate",
                      xaxis_range=[0, 1], yaxis_range=[0, 1.02], template="plotly_white")
    if len(fig.data) == 1:
        _empty_note(fig, "ROC is undefined: the test split has only one class")
    return fig


def probability_bars_figure(probs: dict[str, float]) -> go.Figure:
    """Class probabilities as horizontal bars, the most likely class on top."""
    items = sorted(probs.items(), key=lambda kv: kv[1])  # plotly draws the first bar at the bottom
    fig = go.Figure(go.Bar(x=[float(v) for _, v in items], y=[k for k, _ in items], orientation="h",
                           text=[f"{v:.1%}" for _, v in items], textposition="auto"))
    fig.update_traces(width=0.7, textfont_size=14, cliponaxis=False)
    fig.update_layout(title="Predicted probabilities", xaxis_title="probability", xaxis_range=[0, 1],
                      xaxis_tickformat=".0%", template="plotly_white", height=max(260, 56 * len(items) + 120),
                      margin=dict(l=10, r=30, t=50, b=40), font_size=14, bargap=0.25)
    labels = [k for k, _ in items]
    fig.update_yaxes(tickmode="array", tickvals=labels, ticktext=labels, automargin=True)  # never skip a class
    return fig


def heatmap_figure(x_values, y_values, z, x_title: str, y_title: str, z_title: str, title: str = "") -> go.Figure:
    """A labelled heatmap of z[y][x] (e.g. ε over noise multiplier × epochs), values written in the cells."""
    z = np.asarray(z, dtype=float)
    if z.shape != (len(y_values), len(x_values)):
        raise ValueError(f"z has shape {z.shape}, expected (len(y_values), len(x_values)) = "
                         f"({len(y_values)}, {len(x_values)})")
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=list(x_values), y=list(y_values), colorbar=dict(title=z_title), texttemplate="%{z:.3g}",
        hovertemplate=f"{x_title}=%{{x}}<br>{y_title}=%{{y}}<br>{z_title}=%{{z:.4g}}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white",
                      xaxis_type="category", yaxis_type="category")  # grid values, evenly spaced
    return fig
