"""Plotly figures of runs (training curves, ε, frontiers, confusion, ROC): data in, Figure out.

Kept free of any UI library so the app, notebooks and tests all draw the same charts, and tests can
check the numbers inside a figure rather than its pixels.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go

from dpcore.store.events import Event

_METRIC_TITLES = {"accuracy": "test accuracy", "balanced_accuracy": "balanced accuracy", "roc_auc": "ROC-AUC",
                  "loss": "test loss"}
_PERCENT = ("accuracy", "balanced_accuracy")  # shown as percent; ROC-AUC stays a 0–1 number
# legends sit in one row under the plot (they used to take half a narrow chart and cover its curves)
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.28, xanchor="left", x=0, title_text="")
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=110), hovermode="x unified",
               legend=LEGEND_BELOW)


def _title(metric: str) -> str:
    return _METRIC_TITLES.get(metric, metric.replace("_", " "))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def score_axis(metric: str, values: Sequence[Any] = (), tight: bool = True) -> dict[str, Any]:
    """y-axis settings for a score in [0, 1]: never past 1 (nor below 0), tight above the lowest value when asked
    (to the tenth below it), percent ticks for accuracies."""
    vals = [float(v) for v in values if _finite(v)]
    low = max(0.0, math.floor((min(vals) - 0.05) * 10) / 10) if tight and vals else 0.0
    axis: dict[str, Any] = dict(range=[min(low, 0.9), 1.0])
    if metric in _PERCENT:
        axis["tickformat"] = ".0%"
    return axis


def log_epsilon_axis(values: Sequence[Any]) -> dict[str, Any]:
    """A log ε axis with ticks at 1-2-5 values written plainly (0.1 0.2 0.5 1 2 5 10), not '2 3 … 9 1 2'."""
    vals = [float(v) for v in values if _finite(v) and v > 0]
    if not vals:
        return dict(type="log")
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    pad = max(0.15, (0.75 - (hi - lo)) / 2)  # a lone point gets a readable span around it (0.5 1 2)
    lo, hi = lo - pad, hi + pad
    steps = (1, 2, 5) if hi - lo <= 3.5 else (1,)  # over many decades 1-2-5 ticks would crowd
    ticks = [round(m * 10.0 ** p, 12) for p in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in steps]
    ticks = [t for t in ticks if lo <= math.log10(t) <= hi]
    return dict(type="log", range=[lo, hi], tickmode="array", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])


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
    if len(fig.data) < 2:  # one curve needs no legend: the title names it
        fig.update_layout(showlegend=False, margin=dict(_LAYOUT["margin"], b=50))
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


def training_figures(events: list[Event], target_epsilon: float | None = None,
                     accountant: str | None = None, unit: str = "image") -> dict[str, go.Figure]:
    """"accuracy", "loss" and "epsilon" charts of one run from its (possibly partial) event list; the ε curve
    names the accountant that computed it and the privacy unit it is stated per."""
    acc = go.Figure()
    # test accuracy is drawn first as a wide translucent band, balanced accuracy over it as a thin dashed line: when
    # the two are equal (balanced classes) both stay visible (test accuracy used to hide under balanced accuracy)
    styles = {"accuracy": dict(line=dict(width=7, color="#1f77b4"), marker=dict(symbol="circle", size=12),
                               opacity=0.5),
              "balanced_accuracy": dict(line=dict(dash="dash", width=2, color="#d62728"),
                                        marker=dict(symbol="diamond", size=7)),
              "roc_auc": dict(line=dict(dash="dot", width=2, color="#2ca02c"), marker=dict(symbol="square", size=6))}
    for metric in ("accuracy", "balanced_accuracy", "roc_auc"):
        xs, ys = _eval_series(events, metric)
        acc.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=_title(metric), cliponaxis=False,
                                 **styles[metric]))
    acc.update_layout(title="Test metrics", xaxis_title="step", yaxis_title="score", yaxis=dict(range=[0, 1]),
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
    name = f"ε spent per {unit}" + (f" ({accountant.upper()})" if accountant else "")
    eps = epsilon_curve_figure({name: eps_points}, target=target_epsilon,
                               title=f"ε spent vs step ({accountant.upper()})" if accountant else "ε spent vs step")
    return {"accuracy": acc, "loss": loss, "epsilon": eps}


def compare_runs_figure(runs: dict[str, list[Event]], metric: str = "accuracy") -> go.Figure:
    """One line per run (label → its events) of an eval metric vs step."""
    fig = go.Figure()
    for label, events in runs.items():
        xs, ys = _eval_series(events, metric)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=label, cliponaxis=False))
    fig.update_layout(title=f"{_title(metric)} vs step", xaxis_title="step", yaxis_title=_title(metric),
                      **_LAYOUT)
    if metric in _METRIC_TITLES and metric != "loss":
        fig.update_yaxes(**score_axis(metric, tight=False))
    if not any(len(t.x) for t in fig.data):
        _empty_note(fig, "no evaluations to compare yet")
    return fig


def frontier_figure(dp_points: list[dict], nonprivate_points: list[dict], metric: str = "accuracy", *,
                    highlight: Sequence[str] = (), target: float | None = None,
                    answer_epsilon: float | None = None) -> go.Figure:
    """Privacy–utility frontier: metric vs ε spent (log x); each non-private run as a dashed ceiling.

    `highlight` rings the runs an answer comes from; `target` draws the asked metric level and `answer_epsilon`
    the ε read off the frontier (dpcore.analysis.frontier)."""
    fig = go.Figure()
    pts = sorted((p for p in dp_points if _finite(p.get("epsilon")) and p["epsilon"] > 0
                  and _finite(p.get(metric))), key=lambda p: p["epsilon"])
    value = "%{y:.1%}" if metric in _PERCENT else "%{y:.3f}"
    fig.add_trace(go.Scatter(
        x=[p["epsilon"] for p in pts], y=[p[metric] for p in pts], mode="lines+markers", name="DP runs",
        text=[p.get("label") or p.get("run_id") for p in pts], customdata=[p.get("run_id") for p in pts],
        cliponaxis=False, hovertemplate="ε=%{x:.3g}<br>" + _title(metric) + "=" + value + "<br>%{text}<extra></extra>"))
    chosen = [p for p in pts if p.get("run_id") in set(highlight)]
    if chosen:
        fig.add_trace(go.Scatter(
            x=[p["epsilon"] for p in chosen], y=[p[metric] for p in chosen], mode="markers",
            name="runs the answer comes from", customdata=[p.get("run_id") for p in chosen], cliponaxis=False,
            marker=dict(symbol="circle-open", size=18, line=dict(width=3), color="darkorange"), hoverinfo="skip"))
    ys = [p[metric] for p in pts] + [p[metric] for p in nonprivate_points if _finite(p.get(metric))]
    # labels where a frontier rarely has points: the ceiling's above its line on the left (small ε scores low),
    # the target's under its line on the right (large ε scores high)
    for p in nonprivate_points:
        if _finite(p.get(metric)):
            label = str(p.get("label") or p.get("run_id"))
            fig.add_hline(y=p[metric], line_dash="dash", line_color="gray", annotation_position="top left",
                          annotation_text=label if label.startswith("non-private") else f"non-private: {label}")
    if _finite(target):
        ys.append(target)
        shown = f"{target:.1%}" if metric in _PERCENT else f"{target:.3g}"
        fig.add_hline(y=target, line_dash="dot", line_color="darkorange", annotation_text=f"target {shown}",
                      annotation_position="bottom right")
    xs = [p["epsilon"] for p in pts]
    if _finite(answer_epsilon) and answer_epsilon > 0 and _finite(target):
        xs.append(answer_epsilon)
        fig.add_trace(go.Scatter(x=[answer_epsilon], y=[target], mode="markers", name=f"answer: ε ≈ {answer_epsilon:.3g}",
                                 marker=dict(symbol="x", size=12, color="darkorange"), cliponaxis=False,
                                 hovertemplate="ε≈%{x:.3g}<extra>answer</extra>"))
    fig.update_layout(title=f"{_title(metric)} vs ε spent", xaxis_title="ε spent (log scale)",
                      yaxis_title=_title(metric), **dict(_LAYOUT, hovermode="closest"))
    fig.update_xaxes(**log_epsilon_axis(xs))
    fig.update_yaxes(**score_axis(metric, ys))
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
