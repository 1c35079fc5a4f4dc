"""The inverse question of a privacy–utility frontier: the smallest ε that reaches a target metric.

Answered from stored runs only (the points of `run_review.frontier_points`): a measured point when one reaches
the target, else nothing; between the last measured ε below the target and the first at or above it, an
estimate interpolated linearly in log ε, named as such with the two runs it comes from. Measured metrics are
noisy: when they do not rise with ε the answer is the conservative one, the smallest measured ε from which
every larger measured ε reaches the target. No UI library here.

Reading ε off these results is itself a use of the training data: every run of the sweep spent its own budget
on the same images, which the privacy ledger (`dpcore.privacy.ledger`) already composes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from dpcore.errors import DPCoreError

METRICS = {"accuracy": "test accuracy", "balanced_accuracy": "balanced accuracy", "roc_auc": "ROC-AUC"}
PERCENT = ("accuracy", "balanced_accuracy")  # shown as percent; ROC-AUC as a 0–1 number
_ALIASES = {"acc": "accuracy", "balanced": "balanced_accuracy", "auc": "roc_auc", "roc": "roc_auc"}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_value(metric: str, v: float | None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f} %" if metric in PERCENT else f"{v:.3f}"


@dataclass
class Answer:
    """The smallest ε reaching `target` on `metric`; `kind` says how it was found:

    measured: a measured run reaches it and no smaller measured ε was below the target (or the run hits it exactly)
    interpolated: between run `below` (under the target) and run `above` (at or over it), in log ε
    unreachable: no DP run reaches it (`best` is the best measured one)
    unstable: some runs reach it but the largest measured ε does not (no conservative answer)
    none: no DP run of the group has the metric
    """

    metric: str
    target: float
    kind: str
    epsilon: float | None = None  # the answer (the estimate when interpolated)
    measured_epsilon: float | None = None  # the smallest measured ε from which all larger measured ε reach it
    below: dict | None = None
    above: dict | None = None
    best: dict | None = None
    ceiling: dict | None = None  # the best non-private run of the group
    monotone: bool = True
    unit: str = "image"
    sentence: str = ""
    used: list[str] = field(default_factory=list)  # run ids the answer comes from (highlighted on the chart)


def _run(p: dict, metric: str) -> str:
    return f"run {p.get('run_id')} (ε = {p['epsilon']:.3g}, {fmt_value(metric, p[metric])})"


def parse_target(text: str) -> tuple[str, float]:
    """'accuracy=0.9', 'accuracy=90%' or 'roc_auc=0.95' → (metric, value in [0, 1]); a clear error otherwise."""
    metric, sep, value = str(text).partition("=")
    metric = _ALIASES.get(metric.strip().lower().replace("-", "_"), metric.strip())
    if not sep or metric not in METRICS:
        raise DPCoreError(f"target {text!r} is not METRIC=VALUE with METRIC one of {', '.join(METRICS)}. "
                          "Fix: pass e.g. --target accuracy=0.9 or --target roc_auc=0.95")
    value = value.strip()
    try:
        number = float(value.rstrip("% ")) / (100 if value.endswith("%") else 1)
    except ValueError:
        raise DPCoreError(f"target value {value!r} is not a number. Fix: pass e.g. accuracy=0.9 or accuracy=90%")
    if not 0 < number <= 1:
        raise DPCoreError(f"target {metric}={value} is outside (0, 1]. Fix: give a fraction like 0.9 (or 90%)")
    return metric, number


def smallest_epsilon(dp_points: Sequence[dict], metric: str, target: float,
                     nonprivate_points: Sequence[dict] = ()) -> Answer:
    """The smallest ε whose runs reach `target` (see `Answer`), from the frontier points of ONE group."""
    if metric not in METRICS:
        raise DPCoreError(f"unknown metric {metric!r}. Fix: use one of {', '.join(METRICS)}")
    name, goal = METRICS[metric], fmt_value(metric, target)
    pts = sorted((p for p in dp_points if _finite(p.get("epsilon")) and p["epsilon"] > 0 and _finite(p.get(metric))),
                 key=lambda p: (p["epsilon"], p.get(metric)))
    units = sorted({p.get("unit") or "image" for p in pts})
    if len(units) > 1:
        raise DPCoreError(f"these runs state ε for different privacy units ({', '.join(units)}): their ε are not "
                          "comparable. Fix: compare runs of one privacy unit")
    unit = units[0] if units else "image"
    plain = [p for p in nonprivate_points if _finite(p.get(metric))]
    ceiling = max(plain, key=lambda p: p[metric]) if plain else None
    ans = Answer(metric=metric, target=target, kind="none", ceiling=ceiling, unit=unit)
    roof = ""
    if ceiling is not None:
        roof = (f" The non-private run {ceiling.get('run_id')} reaches {fmt_value(metric, ceiling[metric])}: the "
                "ceiling of this data and backbone" + (", itself below the target." if ceiling[metric] < target
                                                       else "."))
    if not pts:
        ans.sentence = f"No finished DP run of this group has a {name}: nothing to read an ε from." + roof
        return ans
    values = [p[metric] for p in pts]
    ans.monotone = all(a <= b for a, b in zip(values, values[1:]))
    ans.best = max(pts, key=lambda p: (p[metric], -p["epsilon"]))
    reach = [v >= target for v in values]
    per = f"per {unit}"
    if not any(reach):
        ans.kind, ans.used = "unreachable", [ans.best.get("run_id")]
        ans.sentence = (f"No DP run reaches {name} {goal}: the best measured is {_run(ans.best, metric)}, up to "
                        f"ε = {pts[-1]['epsilon']:.3g} {per}." + roof)
        return ans
    if not reach[-1]:
        first = next(p for p, r in zip(pts, reach) if r)
        ans.kind, ans.used = "unstable", [first.get("run_id"), pts[-1].get("run_id")]
        ans.sentence = (f"The measured {name} does not rise steadily with ε (noise between runs): {_run(first, metric)} "
                        f"reaches {goal}, but the largest measured ε, {_run(pts[-1], metric)}, does not. No ε is "
                        "reached by every larger measured ε: measure more runs (or repeat seeds) before reading an "
                        "answer." + roof)
        return ans
    k = len(reach)
    while k > 0 and reach[k - 1]:
        k -= 1  # pts[k:] all reach the target: the conservative answer reads pts[k]
    above = pts[k]
    ans.above, ans.measured_epsilon = above, above["epsilon"]
    noise = "" if ans.monotone else (f" The measured {name} does not rise steadily with ε (noise between runs), so "
                                     "this is the conservative answer: the smallest measured ε from which every larger "
                                     "measured ε reaches the target.")
    if k == 0 or above[metric] == target:
        ans.kind, ans.epsilon, ans.used = "measured", above["epsilon"], [above.get("run_id")]
        lower = (" No smaller ε was measured, so a smaller one may do too." if k == 0 else "")
        ans.sentence = (f"{name[0].upper() + name[1:]} {goal} is reached at ε = {above['epsilon']:.3g} {per}, "
                        f"measured: {_run(above, metric)}.{lower}{noise}" + roof)
        return ans
    below = pts[k - 1]
    e0, e1, m0, m1 = below["epsilon"], above["epsilon"], below[metric], above[metric]
    t = (target - m0) / (m1 - m0)
    ans.kind, ans.below, ans.used = "interpolated", below, [below.get("run_id"), above.get("run_id")]
    ans.epsilon = math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0)))
    ans.sentence = (f"{name[0].upper() + name[1:]} {goal} needs about ε ≈ {ans.epsilon:.3g} {per}: an interpolation "
                    f"(linear in log ε) between two measured runs, {_run(below, metric)} and {_run(above, metric)}. "
                    f"The smallest measured ε that reaches it is {e1:.3g}.{noise}" + roof)
    return ans
