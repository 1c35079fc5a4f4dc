"""Plotly figures of a membership audit (dpcore.analysis.audit's audit.json in, Figure out). No UI library here.

* `roc_figure`: each attack's ROC on log-log axes (the low-FPR corner is where membership inference
  matters), the chance line TPR = FPR, and — for a DP run — the most any attack can reach at the claimed
  ε: TPR ≤ min(e^ε·FPR + δ, 1 − e^−ε·(1 − FPR − δ)).
* `epsilon_figure`: each attack's one-run ε lower bound (valid jointly at 95 %: Bonferroni over the attacks
  and guess counts, `dpcore.analysis.audit`) next to the claimed ε.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go

_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50), hovermode="closest")
_LABELS = {"loss": "Loss threshold (Yeom)", "lira_online": "LiRA online (IN+OUT)",
           "lira_offline": "LiRA offline (OUT only)"}
_FLOOR = 1e-4  # log axes cannot show 0: rates below this are drawn at it


def dp_tpr_limit(fpr: np.ndarray, epsilon: float, delta: float = 0.0) -> np.ndarray:
    """The largest TPR an (ε, δ)-DP training algorithm allows any membership test at false-positive rate FPR."""
    fpr = np.asarray(fpr, dtype=float)
    return np.clip(np.minimum(math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - fpr - delta)), 0, 1)


def roc_figure(audit: dict[str, Any], title: str = "") -> go.Figure:
    fig = go.Figure()
    n_neg = max(int(audit.get("n_nonmembers") or 0), 1)
    floor = min(_FLOOR, 0.5 / n_neg)
    grid = np.geomspace(floor, 1, 200)
    fig.add_trace(go.Scatter(x=grid, y=grid, mode="lines", name="chance (TPR = FPR)",
                             line=dict(color="gray", dash="dot"), hoverinfo="skip"))
    eps = audit.get("audited_epsilon") or audit.get("claimed_epsilon")
    if eps is not None and math.isfinite(eps):
        limit = np.maximum(dp_tpr_limit(grid, eps, audit.get("delta") or 0.0), floor)
        fig.add_trace(go.Scatter(x=grid, y=limit, mode="lines", name=f"DP limit at claimed ε = {eps:.3g}",
                                 line=dict(color="firebrick", dash="dash"),
                                 hovertemplate="FPR=%{x:.2g}<br>max TPR=%{y:.3g}<extra>DP limit</extra>"))
    attacks = audit.get("attacks") or {}
    for name in sorted(attacks, key=lambda n: list(_LABELS).index(n) if n in _LABELS else len(_LABELS)):
        attack = attacks[name]
        curve = attack.get("curve") or {}
        fpr = np.maximum(np.asarray(curve.get("fpr", []), dtype=float), floor)
        tpr = np.maximum(np.asarray(curve.get("tpr", []), dtype=float), floor)
        if not len(fpr):
            continue
        fig.add_trace(go.Scatter(
            x=fpr, y=tpr, mode="lines", line_shape="hv", name=f"{_LABELS.get(name, name)} (AUC {attack['auc']:.3f})",
            hovertemplate="FPR=%{x:.3g}<br>TPR=%{y:.3g}<extra>" + _LABELS.get(name, name) + "</extra>"))
    fig.update_layout(title=title or "Membership-inference ROC (log-log)", xaxis_title="false-positive rate (log)",
                      yaxis_title="true-positive rate (log)", xaxis_type="log", yaxis_type="log",
                      xaxis_range=[math.log10(floor), 0], yaxis_range=[math.log10(floor), 0.02],
                      legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0), height=520,
                      **{**_LAYOUT, "margin": dict(l=60, r=20, t=60, b=40)})
    return fig


def _share(lb: float, claimed: float | None) -> str:
    if claimed is None or not math.isfinite(claimed) or claimed <= 0:
        return ""
    share = lb / claimed
    return f" ({share:.0%} of the claim)" if share >= 0.01 or lb == 0 else f" ({share:.1%} of the claim)"


def epsilon_figure(audit: dict[str, Any]) -> go.Figure:
    """Each attack's one-run ε lower bound (jointly 95 %, Bonferroni) next to the claimed ε, one row each, with
    every value written beside its bar: a bound of 0.02 under a claim of 8 is a sliver on any axis, so the
    number and its share of the claim carry the reading, at any scale."""
    attacks = audit.get("attacks") or {}
    names = sorted(attacks, key=lambda n: list(_LABELS).index(n) if n in _LABELS else len(_LABELS))
    bound = audit.get("bound") or {}
    level = f"{bound.get('confidence', 0.95):.0%} joint"
    claimed = audit.get("claimed_epsilon")
    values = [float(attacks[n]["epsilon_lb"]) for n in names]
    labels = [_LABELS.get(n, n) for n in names]
    text = [("ε ≥ 0: no leakage shown" if v == 0 else f"ε ≥ {v:.3g}") + _share(v, claimed) for v in values]
    fig = go.Figure(go.Bar(
        y=labels, x=values, orientation="h", name=f"ε lower bound ({level})", marker_color="steelblue",
        text=text, textposition="outside", cliponaxis=False,
        hovertemplate="%{y}<br>ε ≥ %{x:.3g} (" + level + ", Bonferroni)<extra></extra>"))
    top = max(values + [0.1])
    if claimed is not None and math.isfinite(claimed):
        fig.add_trace(go.Bar(y=["Claimed ε (the guarantee)"], x=[claimed], orientation="h", name="claimed ε",
                             marker_color="firebrick", text=[f"ε = {claimed:.3g}"], textposition="outside",
                             cliponaxis=False, hovertemplate="claimed ε = %{x:.3g}<extra></extra>"))
        top = max(top, claimed)
    elif claimed is None:
        fig.add_annotation(text="not private: no ε is claimed", xref="paper", yref="paper", x=0.98, y=1.02,
                           showarrow=False, font={"color": "firebrick"})
    fig.update_layout(title=f"One-run ε lower bound ({level}) vs claimed ε", xaxis_title="ε",
                      xaxis_range=[0, top * 1.6], yaxis={"autorange": "reversed"}, showlegend=False,
                      height=120 + 60 * (len(values) + 1), **{**_LAYOUT, "margin": dict(l=170, r=20, t=60, b=50)})
    return fig
