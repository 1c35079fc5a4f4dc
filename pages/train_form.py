"""The Train form's state from a run's config, so a preset (or any run) shows in the form exactly as it ran.

The form keeps its choices in session state (`tr_*`); a config field the form has no widget for is kept in
`tr_hidden` and launched with the form's fields, and the page says which ones they are.
"""
from __future__ import annotations

from typing import Any

from dpcore.config import PER_LAUNCH_FIELDS, RunConfig

PRETRAINED_CHOICES = {"default": "default (offline sources first)", "none": "none (random init)",
                      "hub": "hub (timm)"}
LOCAL_CHOICE = "local .safetensors"
HIDDEN_KEY = "tr_hidden"
SOURCE_KEY = "tr_loaded_from"
# config fields the form has widgets for; every other non-default field travels in HIDDEN_KEY
FORM_FIELDS = {"dataset", "data_dir", "backbone", "pretrained", "scope", "epsilon", "delta", "accountant", "epochs",
               "batch_size", "max_physical_batch_size", "lr", "clip_norm", "image_size", "seed", "split",
               "privacy_unit", "augmult", "augment", "ema_decay", "weight_standardization", "lr_schedule",
               "warmup_fraction", "trainable_blocks"}


def form_state(config: RunConfig) -> dict[str, Any]:
    """Session-state values that make the Train form show `config`."""
    pre = config.pretrained or "none"
    state = {
        "tr_dataset": config.dataset, f"tr_dir_{config.dataset}": config.data_dir or "",
        "tr_split": config.split, "tr_seed": int(config.seed), "tr_backbone": config.backbone,
        "tr_pre": PRETRAINED_CHOICES.get(pre, LOCAL_CHOICE), "tr_weights": "" if pre in PRETRAINED_CHOICES else pre,
        "tr_scope": config.scope, "tr_size": int(config.image_size or 0), "tr_nonpriv": not config.private,
        "tr_delta": float(config.delta), "tr_acc": config.accountant, "tr_unit": config.privacy_unit,
        "tr_clip": float(config.clip_norm), "tr_epochs": int(config.epochs), "tr_batch": int(config.batch_size),
        "tr_phys": int(config.max_physical_batch_size), "tr_lr": float(config.lr), "tr_augmult": int(config.augmult),
        "tr_augment": config.augment, "tr_ema": config.ema_decay is not None,
        "tr_ema_decay": float(config.ema_decay if config.ema_decay is not None else 0.99),
        "tr_sched": config.lr_schedule, "tr_warm": float(config.warmup_fraction),
        "tr_ws": bool(config.weight_standardization), "tr_blocks": int(config.trainable_blocks),
    }
    if config.private:
        state["tr_eps"] = float(config.epsilon)
    defaults = RunConfig()
    state[HIDDEN_KEY] = {k: v for k, v in config.to_dict().items()
                         if k not in FORM_FIELDS | PER_LAUNCH_FIELDS and getattr(defaults, k, None) != v}
    return state


def load_into_form(session_state, config: RunConfig, source: str) -> None:
    """Put `config` into the form (`session_state` is st.session_state, or a dict in tests)."""
    for key, value in form_state(config).items():
        session_state[key] = value
    session_state[SOURCE_KEY] = source


def with_options(options: list, value) -> list:
    """A select-slider's options with `value` in them (a run's ε need not be one of the form's steps)."""
    return options if value is None or value in options else sorted([*options, value])
