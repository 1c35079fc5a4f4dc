"""Train: configure a run, see its privacy plan before launch, then follow it live."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import sqlite3
import warnings

import streamlit as st

import models
from dpcore import environment
from dpcore.privacy import accounting
from dpcore.figures import runs as figures
from dpcore.training.augment import AUGMENTS
from dpcore.store.card import guarantee_sentence
from dpcore.config import SCOPES, PrivacyWarning, RunConfig
from dpcore.data import DATASETS, load_dataset
from dpcore.errors import ConfigError, DPCoreError
from dpcore.privacy.ledger import Ledger, LedgerCorrupt
from dpcore.training.preflight import preflight
from dpcore.training.schedule import LR_SCHEDULES
from pages.train_form import HIDDEN_KEY, SOURCE_KEY, load_into_form, with_options
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

EPSILONS = [0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0]
DELTAS = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7]


@st.cache_data(show_spinner="Reading the data set to count its training images and patients…")
def train_size(dataset: str, data_dir: str | None, seed: int, test_fraction: float, medmnist_size: int,
               split: str = "official") -> tuple[int, tuple[str, int] | None]:
    """(training images, (unit, number of patients/lesions) or None where the data name no owners)."""
    from dpcore.data.groups import train_groups

    splits = load_dataset(dataset, data_dir, seed=seed, test_fraction=test_fraction, medmnist_size=medmnist_size,
                          split=split)
    group = train_groups(splits, dataset)
    return len(splits.train), (None if group is None else (group.unit, group.n_groups))


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


@st.cache_data(show_spinner="Calibrating the noise σ for this plan…")
def privacy_plan(eps: float, delta: float, q: float, steps: int, accountant: str) -> dict:
    return accounting.plan(eps, delta, q, steps, accountant).to_dict()


@st.cache_data(show_spinner=False)
def epsilon_curve(sigma: float, q: float, steps: int, delta: float, accountant: str) -> list:
    return accounting.epsilon_curve(sigma, q, steps, delta, accountant)


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
c1, c2, c3 = st.columns(3)
with c1:
    st.markdown("**Data**")
    dataset = st.selectbox("Data set", list(DATASETS), key="tr_dataset",
                           help="\n\n".join(f"**{k}**: {v.description}" for k, v in DATASETS.items()))
    default_dir = next((d.get("path") or "" for d in environment.dataset_availability()
                        if d["name"] == dataset), "")
    st.session_state.setdefault(f"tr_dir_{dataset}", default_dir or "")
    data_dir = st.text_input("Data folder", key=f"tr_dir_{dataset}",
                             help="Needed for folder and HAM10000; optional for MedMNIST (a local .npz).",
                             disabled=dataset in ("digits", "cifar10"))
    split = st.radio("Train/test split", ["official", "grouped"], key="tr_split", horizontal=True,
                     disabled=dataset not in ("folder", "ham10000"),
                     help="official: the data set's own split (the chest X-ray folders share 170 patients between "
                          "train and test); grouped: train ∪ test split again by patient / lesion with the seed, "
                          "no patient on both sides")
    seed = st.number_input("Seed", 0, 10_000, key="tr_seed")
    st.markdown("**Model**")
    backbone = st.selectbox("Backbone", models.list_models(), key="tr_backbone",
                            help=models.get_spec(st.session_state.get("tr_backbone", "tiny_cnn")).description)
    source = st.radio("Pretrained weights", ["default (offline sources first)", "none (random init)", "hub (timm)",
                                             "local .safetensors"],
                      key="tr_pre", horizontal=True, disabled=backbone == "tiny_cnn",
                      help="default: the local hub cache, then weights bundled with the app (EfficientNet-Lite0), "
                           "then the folder named by $DPCORE_WEIGHTS_DIR; hub downloads timm's weights once")
    weights_path = st.text_input("Weights file", key="tr_weights", disabled=not source.startswith("local"))
    pretrained = {"d": "default", "n": "none", "h": "hub", "l": weights_path}[source[0]]
    if backbone == "tiny_cnn":
        pretrained = "none"
    scope = st.selectbox("Fine-tuning scope", SCOPES, key="tr_scope",
                         help="full: all weights; head: the classifier only (cached features); bias: biases + head (BiTFiT); "
                              "last-k: the head plus the last k blocks")
    image_size = st.number_input("Image size (0 = backbone default)", 0, 1024, step=8, key="tr_size")
with c2:
    st.markdown("**Privacy**")
    non_private = st.checkbox("Non-private baseline", key="tr_nonpriv",
                              help="No clipping, no noise, no privacy guarantee: the accuracy ceiling to compare with.")
    eps = st.select_slider("Privacy budget ε — ← more privacy · · · more accuracy →",
                           with_options(EPSILONS, st.session_state.get("tr_eps")),
                           key="tr_eps", disabled=non_private, format_func=lambda v: f"{v:g}")
    delta = st.select_slider("δ — probability the guarantee fails",
                             with_options(DELTAS, st.session_state.get("tr_delta")), key="tr_delta",
                             format_func=lambda v: f"{v:.0e}", disabled=non_private)
    st.caption("Smaller ε (left) = stronger privacy, more noise, usually lower accuracy; larger ε (right) = "
               "weaker privacy. Keep δ well below 1 / (number of training images).")
    accountant = st.radio("Accountant", ["rdp", "pld"], key="tr_acc", horizontal=True, disabled=non_private,
                          help="Both give valid upper bounds; PLD is tighter (smaller σ for the same ε), RDP faster.")
    unit_choice = st.radio("Privacy unit", ["image", "patient"], key="tr_unit", horizontal=True,
                           disabled=non_private or dataset not in ("folder", "ham10000"),
                           help="image: protects one image. patient: protects one patient with all of their images "
                                "(patients are Poisson-sampled, each one's mean gradient clipped; the batch size then "
                                "counts patients). HAM10000's unit is the lesion. Needs data that name patients.")
    clip = st.number_input("Clip norm C", 0.01, 100.0, key="tr_clip")
with c3:
    st.markdown("**Optimisation**")
    epochs = st.number_input("Epochs", 1, 1000, key="tr_epochs")
    batch = st.number_input("Logical batch size (expected)", 1, 100_000, key="tr_batch")
    physical = st.number_input("Physical batch size (memory)", 1, 100_000, key="tr_phys")
    lr = st.number_input("Learning rate", 1e-6, 10.0, format="%.4g", key="tr_lr")

with st.expander("Training recipe — augmentation multiplicity, EMA, schedule (De et al. 2022)",
                 expanded=st.session_state["tr_augmult"] > 1 or st.session_state["tr_ema"]):
    r1, r2, r3 = st.columns(3)
    augmult = r1.number_input("Augmentation multiplicity K", 1, 64, key="tr_augmult",
                              help="K augmented views of each sampled image; their gradients are averaged before "
                                   "clipping, so ε is unchanged. Each step costs about K times more.")
    augment_policy = r1.selectbox("Augmentation", AUGMENTS, key="tr_augment",
                                  help="auto: X-ray, dermoscopy or natural-image policy from the data set "
                                       "(none when K = 1)")
    use_ema = r2.checkbox("EMA of the weights", key="tr_ema",
                          help="Evaluate and save an exponential moving average of the weights: post-processing "
                               "of the DP iterates, no privacy cost. The card keeps both raw and EMA metrics.")
    ema_decay = r2.number_input("EMA decay", 0.5, 0.99999, format="%.5g", key="tr_ema_decay", disabled=not use_ema)
    ws = r2.checkbox("Weight standardisation (conv nets from scratch)", key="tr_ws")
    schedule = r3.selectbox("Learning-rate schedule", LR_SCHEDULES, key="tr_sched")
    warmup = r3.number_input("Warm-up (fraction of the steps)", 0.0, 0.5, step=0.05, key="tr_warm")
    blocks = r3.number_input("Trained blocks (scope last-k)", 1, 100, key="tr_blocks", disabled=scope != "last-k")

fields = {"dataset": dataset, "data_dir": (data_dir or None) if dataset not in ("digits", "cifar10") else None,
              "backbone": backbone, "pretrained": pretrained, "scope": scope, "epsilon": None if non_private else float(eps),
              "delta": float(delta), "accountant": accountant, "epochs": int(epochs), "batch_size": int(batch),
              "max_physical_batch_size": int(physical), "lr": float(lr), "clip_norm": float(clip),
              "image_size": int(image_size) or None, "seed": int(seed), "split": split if dataset in ("folder", "ham10000") else "official",
              "privacy_unit": unit_choice if dataset in ("folder", "ham10000") and not non_private else "image",
              "augmult": int(augmult),
              "augment": augment_policy, "ema_decay": float(ema_decay) if use_ema else None,
              "weight_standardization": bool(ws), "lr_schedule": schedule, "warmup_fraction": float(warmup),
              "trainable_blocks": int(blocks)}
hidden = st.session_state.get(HIDDEN_KEY) or {}
if hidden:
    h1, h2 = st.columns([4, 1])
    h1.caption(f"Also from {st.session_state.get(SOURCE_KEY)} (settings this form has no field for): "
               + ", ".join(f"{k} = {v}" for k, v in sorted(hidden.items())))
    if h2.button("Use the defaults instead", key="hidden-reset"):
        st.session_state.pop(HIDDEN_KEY, None)
        st.rerun()
fields = {**hidden, **fields}
config = n_train = None
try:
    config = RunConfig(**fields)
    config.check_paths()
    n_train, owners = train_size(config.dataset, config.data_dir, config.seed, config.test_fraction,
                                 config.medmnist_size, config.split)
    if config.privacy_unit == "patient" and owners is None:
        from dpcore.privacy.units import refuse_without_groups

        raise refuse_without_groups(config.dataset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrivacyWarning)
        config.check_against_data(n_train)
    for w in caught:
        st.warning(str(w.message))
except ConfigError as exc:
    show_config_error(exc)
    config = None
except DPCoreError as exc:
    st.error(f"The data set cannot be read: {exc}")
    config = None

if config is not None:
    st.subheader("The plan")
    patient = config.privacy_unit == "patient"
    n_sampled = owners[1] if patient else n_train
    sampling = accounting.sampling_plan(n_sampled, config.batch_size, config.epochs)
    spe, total, q = sampling.steps_per_epoch, sampling.steps, sampling.sample_rate
    cols = st.columns(5)
    cols[0].metric("Training images n", f"{n_train:,}", help=(f"in {owners[1]:,} {owners[0]}s, each sampled with all "
                                                               "of their images" if patient else None))
    cols[1].metric("Steps T", f"{total:,}", help=f"{config.epochs} epochs × {spe} steps per epoch")
    cols[2].metric("Sample rate q", f"{q:.4g}", help=f"Each {owners[0] if patient else 'image'} joins each step "
                   "independently with probability q")
    if config.private:
        plan = privacy_plan(config.epsilon, config.delta, q, total, config.accountant)
        cols[3].metric("Noise σ", f"{plan['noise_multiplier']:.4g}", help="calibrated by dpcore.privacy.accounting")
        cols[4].metric(f"Planned ε ({config.accountant.upper()})", f"{plan['epsilon']:.4g}",
                       help=f"δ = {config.delta:.0e}, per {owners[0] if patient else 'image'}")
        curve = epsilon_curve(plan["noise_multiplier"], q, total, config.delta, config.accountant)
        st.plotly_chart(figures.epsilon_curve_figure({config.accountant.upper(): curve}, target=config.epsilon,
                                                     title="ε spent vs training step (planned)"), key="plan-curve")
        st.caption(guarantee_sentence({"private": True, "epsilon": plan["epsilon"], "delta": config.delta,
                                       "accountant": config.accountant, "steps": total,
                                       "unit": owners[0] if patient else "image"}, "image")
                   + " Only the noisy model and its test-split results are released: no training loss, no "
                     "statistic of the training images.")
    else:
        cols[3].metric("Noise σ", "0")
        cols[4].metric("ε", "∞")
        st.caption("A non-private run promises nothing about privacy; it is the accuracy ceiling to compare with.")
    launch = guarantee_panel(config)
    processes = _gpus_for_run(config)
    if st.button("Launch", type="primary", key="launch", disabled=launch is None):
        job = manager().submit(launch, label=f"{dataset} / {backbone} / "
                               + (f"ε={config.epsilon:g}" if config.private else "non-private")
                               + (f" / {processes} GPUs" if processes > 1 else ""), processes=processes)
        watch(job.run_id)
        st.rerun()
