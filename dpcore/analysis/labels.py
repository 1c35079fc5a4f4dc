"""How numbers and runs read in text: one format per kind of number for the app's pages and the CLI alike
(ε as fmt_eps, accuracies as fmt_pct), so a value reads the same wherever it is shown."""
from __future__ import annotations

import math
from datetime import datetime


def fmt_eps(eps) -> str:
    """ε for text: None is a run without DP, inf a bound that promises nothing."""
    if eps is None:
        return "∞ (no DP)"
    if isinstance(eps, float) and math.isinf(eps):
        return "∞"
    return f"{eps:.3g}"


def fmt_pct(x) -> str:
    """A fraction as a percentage with one decimal; None or NaN as '—'."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def fmt_num(x, spec: str = ".3g") -> str:
    """A number in `spec`; None as '—'."""
    return "—" if x is None else format(x, spec)


def fmt_duration(seconds) -> str:
    """Seconds as 's', 'min s' or 'h min'; None and NaN (pandas turns None into NaN) as '—'."""
    if seconds is None or (isinstance(seconds, float) and not math.isfinite(seconds)):
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def fmt_time(ts) -> str:
    """A Unix time as local 'YYYY-MM-DD HH:MM'; None as '—'."""
    return "—" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def run_label(record) -> str:
    """One line naming a stored run (a RunRecord) in a picker: id, data, backbone, its target ε, status."""
    eps = f"ε={record.target_epsilon:g}" if record.private else "non-private"
    return f"{record.run_id} · {record.dataset} · {record.backbone} · {eps} · {record.status}"


def compare_label(record) -> str:
    """A run's name in the legend of a curve comparison: id, backbone and target ε."""
    return f"{record.run_id} ({record.backbone}, " + (f"ε={record.target_epsilon:g})" if record.private
                                                       else "non-private)")
