"""Home: what DP-SGD and (ε, δ) mean, this machine's state, one-click presets.

The page's words come first and the engine (torch, timm: seconds to import on a cold start) after them, so a
new user reads the introduction while the rest loads (`bench/first_paint.py`)."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import os

import streamlit as st

st.title("🔒 DP Explorer")
st.caption("Differentially private fine-tuning of image classifiers on medical images — see, teach and use "
           "the privacy–utility trade-off.")

left, right = st.columns([3, 2])
with left:
    st.subheader("DP-SGD in five sentences")
    st.markdown(
        "1. A model is trained in small random batches, as usual, but each training image's influence on "
        "every update is measured separately.\n"
        "2. That influence (the per-example gradient) is **clipped** to a fixed size C, so no single image "
        "can pull the model far.\n"
        "3. Gaussian **noise** of scale σ·C is added to the sum of the clipped gradients before each step, "
        "hiding whether any one image took part.\n"
        "4. An **accountant** (RDP or PLD) adds up how much each noisy step can leak and reports the total "
        "as a privacy budget ε at a failure probability δ.\n"
        "5. More noise or fewer steps means a smaller ε — stronger privacy — and usually a less accurate model: "
        "that is the trade-off this app lets you explore."
    )
    st.subheader("What ε and δ mean for a patient")
    st.markdown(
        "Imagine your X-ray is in the training set, or it is not. A model trained with **ε** makes every "
        "possible outcome at most **e^ε** times more (or less) likely in one world than in the other: at ε = 0.5 "
        "that factor is about 1.6, at ε = 2 about 7.4, at ε = 8 about 3,000. So a small ε means someone "
        "inspecting the model can learn almost nothing about whether — or what — your image contributed. "
        "**δ** is the small probability (e.g. one in 100,000) that this promise fails; it should be far below "
        "1 / (number of training images). An image-level guarantee is per image: a patient with several images is "
        "protected less than the number suggests. A **patient-level** run (Train page, privacy unit: patient) "
        "protects each patient with all of their images at its ε."
    )
# ruff: noqa: E402 - the engine is imported after the first words on purpose (see the docstring)
import models
from dpcore import environment
from dpcore.training.presets import build_presets, missing_requirements
from pages.common import manager, show_queue, watch, watched_run
from pages.parts.run_panel import job_panel
from pages.train_form import load_into_form



@st.cache_data(ttl=60, show_spinner=False)
def missing(key: str) -> list[str]:
    """What a preset still needs here (probes the Hub for at most 2 s when weights are not cached)."""
    return missing_requirements(build_presets()[key])


def weights_folder() -> dict:
    """What $DPCORE_WEIGHTS_DIR holds (file headers only)."""
    path = os.environ.get(models.WEIGHTS_DIR_ENV)
    rows = models.list_weights_dir(path) if path else []
    note = "not set" if not path else ("no .safetensors files there" if not rows else "")
    return {"path": path, "rows": rows, "note": note}


with right:
    st.subheader("This machine")
    machine = environment.describe_machine()
    device = machine.get("device", "cpu")
    st.markdown(f"**Compute:** {'GPU — ' + str(machine.get('gpu_name')) if device == 'cuda' else 'CPU only'} "
                f"({machine.get('cpu_count', '?')} CPU cores)")
    st.markdown("**Data sets available offline**")
    # a list, not a table: a note is a sentence (what to download, where to put it) and a cell would cut it
    st.markdown("\n".join(f"- {'✅' if d['available'] else '—'} **{d['name']}**"
                           + (f" — {d.get('path') or d.get('note')}" if d.get("path") or d.get("note") else "")
                           for d in environment.dataset_availability()))
    st.markdown("**Pretrained weights available offline**")
    st.dataframe([{"backbone": w["backbone"], "ready": "✅" if w["ready"] else "—",
                   "hub cache": "✅" if w["hub_cached"] else "—", "bundled": w["bundled"] or "—",
                   "weights folder": w["weights_dir"] or "—"}
                  for w in environment.pretrained_sources()], hide_index=True)
    folder = weights_folder()
    if folder["rows"]:
        with st.expander(f"Weights folder {folder['path']} ({len(folder['rows'])} files)"):
            st.dataframe([{"file": r["file"], "backbone": r["backbone"] or "—", "usable": "✅" if r["fits"] else "—",
                           "note": r.get("note", "")} for r in folder["rows"]], hide_index=True)
    else:
        st.caption(f"More weights offline: put `<backbone>*.safetensors` files in a folder and set "
                   f"`{models.WEIGHTS_DIR_ENV}` to it ({folder['note']}).")
    with st.expander("Library versions"):
        st.json({k: v for k, v in machine.items() if k not in ("device", "gpu_name", "cpu_count")})

st.subheader("Start here")
presets = build_presets()
cols = st.columns(min(len(presets), 4))
for i, (key, preset) in enumerate(presets.items()):
    col = cols[i % len(cols)]
    with col, st.container(border=True):
        st.markdown(f"**{preset.title}**")
        st.markdown(preset.description)
        needs = missing(key)
        for item in needs:
            st.warning(f"Missing: {item}")
        if preset.is_sweep:
            if st.button("Run this sweep", key=f"preset-{key}", disabled=bool(needs), type="primary",
                         help="Missing requirements listed above" if needs else
                         "Queues one run per ε as one job; follow it on Compare runs"):
                job = manager().submit_sweep(preset.config, list(preset.sweep_epsilons),
                                             non_private=preset.sweep_non_private, label=preset.title)
                st.session_state["rn_sweep"] = job.run_id
                st.switch_page("pages/runs.py")
        elif st.button("Train this preset", key=f"preset-{key}", disabled=bool(needs), type="primary",
                       help="Missing requirements listed above" if needs else "Queues the run and opens Train"):
            job = manager().submit(preset.config, label=preset.title)
            load_into_form(st.session_state, preset.config, job.run_id)  # the form shows what is training
            watch(job.run_id)
            st.switch_page("pages/train.py", query_params={"run": job.run_id})

run_id = watched_run()
if run_id:
    st.subheader("Your current run")
    job_panel(run_id)
show_queue()

st.subheader("Pages")
PAGE_LINKS = [("pages/train.py", "Train a model", "🏋️"), ("pages/accounting.py", "Privacy accounting", "🧮"),
              ("pages/runs.py", "Compare runs", "📋"), ("pages/experiments.py", "Experiments", "🧪"),
              ("pages/predictions.py", "Test-set predictions", "🔍"), ("pages/audit.py", "Membership audit", "🕵️"),
              ("pages/ledger.py", "Privacy budget", "💰"), ("pages/clinician.py", "Clinician view", "🩺")]
for row in range(0, len(PAGE_LINKS), 4):  # every page but this one, four to a row
    for col, (path, label, icon) in zip(st.columns(4), PAGE_LINKS[row:row + 4]):
        col.page_link(path, label=label, icon=icon)
