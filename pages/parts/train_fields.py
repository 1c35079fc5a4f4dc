"""The Train page's form: data, model, privacy, optimisation and recipe widgets (keys `tr_*`)."""
from __future__ import annotations

from typing import Any

import streamlit as st

import models
from dpcore import environment
from dpcore.config import SCOPES
from dpcore.data import DATASETS
from dpcore.training.augment import AUGMENTS
from dpcore.training.schedule import LR_SCHEDULES
from pages.train_form import with_options

EPSILONS = [0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0]
DELTAS = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7]


def form_fields() -> dict[str, Any]:
    """Draw the form; returns the RunConfig fields it sets."""
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
                             help="full: all weights; head: the classifier only (cached features); bias: biases + head "
                                  "(BiTFiT); last-k: the head plus the last k blocks")
        image_size = st.number_input("Image size (0 = backbone default)", 0, 1024, step=8, key="tr_size")
    with c2:
        st.markdown("**Privacy**")
        non_private = st.checkbox("Non-private baseline", key="tr_nonpriv",
                                  help="No clipping, no noise, no privacy guarantee: the accuracy ceiling to compare "
                                       "with.")
        eps = st.select_slider("Privacy budget ε — ← more privacy · · · more accuracy →",
                               with_options(EPSILONS, st.session_state.get("tr_eps")),
                               key="tr_eps", disabled=non_private, format_func=lambda v: f"{v:g}")
        delta = st.select_slider("δ — probability the guarantee fails",
                                 with_options(DELTAS, st.session_state.get("tr_delta")), key="tr_delta",
                                 format_func=lambda v: f"{v:.0e}", disabled=non_private)
        st.caption("Smaller ε (left) = stronger privacy, more noise, usually lower accuracy; larger ε (right) = "
                   "weaker privacy. Keep δ well below 1 / (number of training images).")
        accountant = st.radio("Accountant", ["rdp", "pld"], key="tr_acc", horizontal=True, disabled=non_private,
                              help="Both give valid upper bounds; PLD is tighter (smaller σ for the same ε), RDP "
                                   "faster.")
        unit_choice = st.radio("Privacy unit", ["image", "patient"], key="tr_unit", horizontal=True,
                               disabled=non_private or dataset not in ("folder", "ham10000"),
                               help="image: protects one image. patient: protects one patient with all of their images "
                                    "(patients are Poisson-sampled, each one's mean gradient clipped; the batch size "
                                    "then counts patients). HAM10000's unit is the lesion. Needs data that name "
                                    "patients.")
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

    grouped = dataset in ("folder", "ham10000")
    return {"dataset": dataset, "data_dir": (data_dir or None) if dataset not in ("digits", "cifar10") else None,
            "backbone": backbone, "pretrained": pretrained, "scope": scope,
            "epsilon": None if non_private else float(eps), "delta": float(delta), "accountant": accountant,
            "epochs": int(epochs), "batch_size": int(batch), "max_physical_batch_size": int(physical),
            "lr": float(lr), "clip_norm": float(clip), "image_size": int(image_size) or None, "seed": int(seed),
            "split": split if grouped else "official",
            "privacy_unit": unit_choice if grouped and not non_private else "image",
            "augmult": int(augmult), "augment": augment_policy, "ema_decay": float(ema_decay) if use_ema else None,
            "weight_standardization": bool(ws), "lr_schedule": schedule, "warmup_fraction": float(warmup),
            "trainable_blocks": int(blocks)}
