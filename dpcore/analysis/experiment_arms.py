"""An experiment's arms as table rows: what each arm changes from the base run, what the literature reports
for it, and which weights it reports. The Experiments page shows these before launch; the CLI can too."""
from __future__ import annotations

from typing import Any

REPORTS = {"raw": "raw (last-iterate) weights", "ema": "EMA weights"}


def arm_rows(exp) -> list[dict[str, Any]]:
    """One row per arm of `exp` (a dpcore.analysis.experiments.Experiment), in the file's order."""
    rows = []
    for arm in exp.arms:
        changes = {k: ("non-private" if k == "epsilon" and v is None else v) for k, v in arm.overrides.items()}
        rows.append({"arm": arm.label,
                     "changes from the base": ", ".join(f"{k}={v}" for k, v in changes.items()) or "—",
                     "reported elsewhere": ", ".join(f"{k} {v}" for k, v in arm.reference.items()
                                                     if k != "source") or "—",
                     "reports": REPORTS.get(arm.report or "", "the run's own")})
    return rows


__all__ = ["arm_rows"]
