"""Train: configure a run, see its privacy plan before launch, then follow it live."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import streamlit as st

from dpcore import environment
from dpcore.config import RunConfig
from dpcore.errors import ConfigError, DPCoreError
from pages.train_form import HIDDEN_KEY, SOURCE_KEY, load_into_form
from pages.common import (
    ACTIVE,
    manager,
    run_view,
    show_config_error,
    show_queue,
    watch,
    watched_run,
)
from pages.parts.run_panel import job_panel
from pages.parts.train_fields import form_fields
from pages.parts.train_guarantee import guarantee_panel
from pages.parts.train_plan import launch_plan, show_plan, train_size


def _gpus_for_run(config: RunConfig) -> int:
    """Several local GPUs: offer to spread the run over them (one process each, torchrun); same guarantee."""
    gpus = environment.describe_machine().get("gpus", 0)
    if gpus < 2 or config.device == "cpu" or config.privacy_unit == "patient":
        return 1
    return int(st.selectbox(
        "GPUs for this run", list(range(1, gpus + 1)), index=gpus - 1, key="gpus",
        help="One training process per GPU. Each samples its own share of the images at the same rate q and "
             "only the first adds the noise, once per step: σ, q, T and so ε are those of a one-GPU run."))


# the form's defaults live in session state, so its choices survive a visit to another page
DEFAULTS = {"tr_seed": 0, "tr_size": 0, "tr_eps": 2.0, "tr_delta": 1e-5, "tr_clip": 1.0, "tr_epochs": 15, "tr_batch": 256,
            "tr_phys": 128, "tr_lr": 0.01, "tr_augmult": 1, "tr_augment": "auto", "tr_ema": False,
            "tr_ema_decay": 0.99, "tr_sched": "constant", "tr_warm": 0.0, "tr_ws": False, "tr_blocks": 1}
for key in [k for k in st.session_state if str(k).startswith("tr_")]:
    st.session_state[key] = st.session_state[key]
for key, value in DEFAULTS.items():
    st.session_state.setdefault(key, value)

st.title("🏋️ Train")

run_id = watched_run()
if run_id:
    job_panel(run_id)
    still = run_view(run_id).status in ACTIVE
    b1, b2 = st.columns(2)
    if b1.button("Stop watching this run (it keeps running)" if still else "Close this run's panel", key="unwatch"):
        watch(None)
        st.rerun()
    if st.session_state.get(SOURCE_KEY) != run_id and b2.button(
            "Load this run's settings into the form", key="load-run-settings",
            help="Fill the form below with exactly the settings this run trained with"):
        load_into_form(st.session_state, run_view(run_id).config, run_id)
        st.rerun()
with st.expander("Queue", expanded=bool(manager().queued())):
    show_queue()

st.subheader("New run")
fields = form_fields()
hidden = st.session_state.get(HIDDEN_KEY) or {}
if hidden:
    h1, h2 = st.columns([4, 1])
    h1.caption(f"Also from {st.session_state.get(SOURCE_KEY)} (settings this form has no field for): "
               + ", ".join(f"{k} = {v}" for k, v in sorted(hidden.items())))
    if h2.button("Use the defaults instead", key="hidden-reset"):
        st.session_state.pop(HIDDEN_KEY, None)
        st.rerun()
fields = {**hidden, **fields}
config = plan = None
try:
    config = RunConfig(**fields)
    config.check_paths()
    sizes = train_size(config.dataset, config.data_dir, config.seed, config.test_fraction, config.medmnist_size,
                       config.split)
    plan = launch_plan(config.to_json(), sizes)  # n, q, T, σ and the planned ε, per privacy unit
    for message in plan.warnings:
        st.warning(message)
except ConfigError as exc:
    show_config_error(exc)
    config = None
except DPCoreError as exc:
    st.error(f"The data set cannot be read: {exc}")
    config = None

if config is not None:
    show_plan(config, plan)
    launch = guarantee_panel(config)
    processes = _gpus_for_run(config)
    if st.button("Launch", type="primary", key="launch", disabled=launch is None):
        job = manager().submit(launch, label=f"{config.dataset} / {config.backbone} / "
                               + (f"ε={config.epsilon:g}" if config.private else "non-private")
                               + (f" / {processes} GPUs" if processes > 1 else ""), processes=processes)
        watch(job.run_id)
        st.rerun()
