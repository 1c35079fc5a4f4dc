"""What an image-level (ε, δ) guarantee still promises a patient or lesion with k images.

Group privacy: an (ε, δ)-DP mechanism is (kε, k·e^{(k−1)ε}·δ)-DP for any k records together
(the standard group-privacy lemma, e.g. Vadhan 2017, "The Complexity of Differential Privacy").
δ grows exponentially in k, so for ε = 1 a patient with 30 images gets δ_k ≈ 10⁹, which promises
nothing. The app must say so in plain words rather than let "ε = 1 per image" read as protection
of the patient.

The bound is the textbook one, not the tightest (an RDP/PLD accountant run on groups would be
tighter), so "no guarantee" here means "this analysis gives none": patient-level DP is the fix.
"""
from __future__ import annotations

import math
from typing import Any

from dpcore.data.groups import GroupInfo

_LOG_MAX = 700.0  # math.exp overflows a float just above 709.78
_WEAK_DELTA = 1e-2  # a δ_k at least this large is called weak in the sentence
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def group_guarantee(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(kε, k·e^{(k−1)ε}·δ) for a group of k images; math.inf where a value overflows, never an exception.

    δ_k may exceed 1: it is returned as is (a δ ≥ 1 promises nothing; `group_summary` flags it).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"group size k must be an integer >= 1, got {k!r}")
    epsilon, delta = float(epsilon), float(delta)
    if math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be >= 0 (math.inf for no guarantee), got {epsilon}")
    if math.isnan(delta) or delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if k == 1:
        return epsilon, delta
    eps_k = k * epsilon  # float multiplication gives inf on overflow, it does not raise
    if delta == 0:
        return eps_k, 0.0  # pure DP stays pure for groups
    x = (k - 1) * epsilon
    if x <= _LOG_MAX:
        return eps_k, k * math.exp(x) * delta
    log_d = math.log(k) + x + math.log(delta)
    return eps_k, (math.exp(log_d) if log_d <= _LOG_MAX else math.inf)


def is_meaningful(group_epsilon: float, group_delta: float) -> bool:
    """Whether (ε_k, δ_k) promises anything at all: both finite and δ_k < 1."""
    return math.isfinite(group_epsilon) and math.isfinite(group_delta) and group_delta < 1


def _fmt(x: float) -> str:
    """3 significant digits in plain notation for ordinary sizes, else 'm × 10ⁿ' (no 'e-05' for clinicians)."""
    if math.isinf(x):
        return "∞"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.3g}"
    m, e = f"{x:.1e}".split("e")
    return f"{m} × 10{str(int(e)).translate(_SUPERSCRIPT)}"


def _caveats(group: GroupInfo, where: str) -> list[str]:
    out = [f"Source of the {group.unit} ids: {group.source}."]
    if group.n_unknown:
        out.append(f"{group.n_unknown} of {group.n_images} images in {where} ({1 - group.coverage:.1%}) have no "
                   f"known {group.unit} id; each is counted as a {group.unit} of its own, so the largest "
                   f"{group.unit} may have more images than stated.")
    if group.unit == "lesion":
        out.append("A patient can have several lesions and the data do not say which lesions share a patient, "
                   "so a patient may be protected less still.")
    return out


def group_sentence(epsilon: float, delta: float, group: GroupInfo, where: str = "the training data") -> str:
    """Plain words for a clinician: what the image-level guarantee means for the largest group."""
    if group.n_images == 0:
        raise ValueError("the grouping has no images, so there is no group guarantee to state")
    k, unit = group.largest, group.unit
    if k == 1:
        known = "As far as known, every" if group.n_unknown else "Every"
        head = (f"{known} {unit} in {where} has exactly one image, so the image-level guarantee "
                f"(ε = {_fmt(epsilon)}, δ = {_fmt(delta)}) is also the guarantee for each {unit}.")
        return " ".join([head] + _caveats(group, where))
    eps_k, delta_k = group_guarantee(epsilon, delta, k)
    if not is_meaningful(eps_k, delta_k):
        verdict = (" — with δ above 1 this is no guarantee at all." if delta_k >= 1 and math.isfinite(delta_k)
                   else " — this is no guarantee at all.")
    elif delta_k >= _WEAK_DELTA:
        verdict = " — a δ this large is a weak guarantee."
    else:
        verdict = "."
    head = (f"Image-level privacy protects single images, so {unit}s with several images are protected less: "
            f"the largest {unit} in {where} ({k} images) is protected only at ε = {_fmt(eps_k)}, "
            f"δ ≈ {_fmt(delta_k)}{verdict}")
    return " ".join([head] + _caveats(group, where))


def _json_number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def group_summary(epsilon: float, delta: float, group: GroupInfo) -> dict[str, Any]:
    """The group guarantee for a model card, JSON-ready: infinite values are None (meaningful is then False)."""
    eps_k, delta_k = group_guarantee(epsilon, delta, max(group.largest, 1))
    return {
        "unit": group.unit, "source": group.source, "coverage": group.coverage,
        "n_images": group.n_images, "n_unknown": group.n_unknown, "n_groups": group.n_groups,
        "largest": group.largest,
        "size_histogram": {str(k): v for k, v in group.size_histogram().items()},
        "image_epsilon": _json_number(float(epsilon)), "image_delta": float(delta),
        "group_epsilon": _json_number(eps_k), "group_delta": _json_number(delta_k),
        "delta_above_1": delta_k >= 1,
        "meaningful": is_meaningful(eps_k, delta_k),
        "sentence": group_sentence(epsilon, delta, group),
    }
