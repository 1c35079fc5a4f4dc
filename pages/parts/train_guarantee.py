"""The Train page's guarantee panel: privacy unit, weights' lineage, largest patient/lesion and the budget
verdict, before launch (dpcore.training.preflight)."""
from __future__ import annotations

import sqlite3

import streamlit as st

from dpcore.config import RunConfig
from dpcore.errors import DPCoreError
from dpcore.privacy.ledger import Ledger, LedgerCorrupt
from dpcore.training.preflight import preflight


@st.cache_data(show_spinner="Checking the privacy ledger and the starting weights' lineage…", max_entries=32)
def _preflight(config_json: str, stamp: tuple):
    """The launch screen's facts, recomputed only when the plan or the ledger (`stamp`) changes."""
    return preflight(RunConfig.from_json(config_json))


def guarantee_panel(config: RunConfig) -> RunConfig | None:
    """What this run would promise (unit, lineage, largest patient/lesion, budget), before launch.

    Returns the config to launch (with the budget override when the user ticks it), or None when the run
    could not start: the trainer refuses the same cases (fail closed)."""
    try:
        ledger = Ledger()
        pf = _preflight(config.to_json(), ledger.stamp())
    except LedgerCorrupt as exc:
        st.error(f"**The privacy ledger is damaged, so no run can start** (none could record its spending). {exc}")
        return None
    except (DPCoreError, OSError, sqlite3.Error) as exc:
        st.error(f"**The privacy ledger cannot be checked** ({type(exc).__name__}: {exc}); a run that cannot record "
                 "its spending takes no step, so this one would fail at once.")
        return None
    if pf.unit == "image":
        st.markdown("Privacy unit: **one image** — the guarantee is for adding or removing one image from the "
                    "training data.")
    else:
        st.markdown(f"Privacy unit: **one {pf.unit}** — the guarantee is for adding or removing one {pf.unit} with "
                    f"all of their images ({pf.unit}s are sampled, and each {pf.unit}'s gradient is clipped, as one).")
    if pf.units is not None:
        unit_comparison(pf.units)
    lin = pf.lineage
    if lin is not None and lin.void:
        st.error(f"**No DP guarantee.** {lin.sentence}", icon="⛔")
    elif lin is not None and lin.composed:
        st.warning(f"**Lineage:** {lin.sentence}", icon="🧬")
    elif lin is not None:
        st.caption(lin.sentence)
    if pf.group_summary is not None and pf.group is not None and pf.group.largest > 1:
        st.warning(f"**Patients and lesions:** {pf.group_summary['sentence']}", icon="👥")
    verdict = pf.verdict
    if verdict.exceeds:
        st.error(f"**Privacy budget:** {verdict.message}", icon="⚠️")
        if not st.checkbox("Launch past the budget anyway (the ledger records the override)", key="tr_over"):
            return None
        return config.replace(allow_over_budget=True)
    if not config.private and verdict.current > 0:
        st.warning("**Privacy budget:** a non-private run on these images voids every DP guarantee already given "
                   "on them (their ε becomes ∞).", icon="⚠️")
    elif verdict.budget is not None or verdict.current > 0:
        st.caption(f"Privacy budget (per image, most-exposed image): {verdict.message}")
    return config


def unit_comparison(u: dict) -> None:
    """Image-level and patient-level DP side by side: what each promises one patient, before launch."""
    st.markdown(f"**What each choice promises one {u['unit']}** ({u['n_units']:,} {u['unit']}s, {u['n_images']:,} "
                f"images, the largest {u['largest']}; same target ε, epochs and images per step):")
    cols = st.columns(2)
    for col, key, title in ((cols[0], "image", "Image-level DP"), (cols[1], "patient", f"{u['unit'].title()}-level DP")):
        d = u[key]
        chosen = " — this run" if u["chosen"] == key else ""
        body = (f"**{title}{chosen}**  \nbatch {d['batch_size']:,} {'images' if key == 'image' else u['unit'] + 's'}"
                f", q = {d['sample_rate']:.4g}, T = {d['steps']:,}, σ = {d['noise_multiplier']:.3g}  \n{d['sentence']}")
        if d["meaningful"]:
            col.success(body, icon="🛡️")
        else:
            col.error(body, icon="⛔")
    st.caption(f"Owner ids: {u['source']}" + ("" if u["coverage"] == 1 else
               f" ({1 - u['coverage']:.1%} of images have none and count as their own {u['unit']})."))
