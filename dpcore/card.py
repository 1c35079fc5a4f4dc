"""The model card: a run's data, model, privacy guarantee and test results, saved as card.json."""
from __future__ import annotations

import math
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from .config import RunConfig

CARD_VERSION = 1
_LIBS = ("torch", "torchvision", "opacus", "timm", "dp-accounting", "scikit-learn", "safetensors", "numpy", "pillow")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[lib] = "not installed"
    return out


def _fmt_factor(eps: float) -> str:
    factor = math.exp(eps)
    return f"{factor:.3g}" if factor < 1000 else f"{factor:,.0f}"


def describe_weights(weights: dict[str, Any] | None) -> str:
    """Where a model's starting weights came from, in plain words."""
    weights = weights or {}
    source, name = weights.get("source"), weights.get("name")
    if source == "hub":
        return f"pretrained on public data ({name}, from the timm hub)"
    if source == "file":
        digest = (weights.get("sha256") or "")[:12]
        text = f"pretrained weights from the file {name}" + (f" (sha256 {digest}…)" if digest else "")
        pre = (weights.get("provenance") or {}).get("pretraining")
        if isinstance(pre, dict) and pre.get("dataset"):
            text += (f", pretrained without DP on {pre['dataset']}"
                     + (f" ({pre['data_dir']})" if pre.get("data_dir") else "")
                     + " (declared public)" + (f" on {pre['date'][:10]}" if pre.get("date") else ""))
        return text
    return "random initialisation (no pretraining)"


def guarantee_sentence(privacy: dict[str, Any], privacy_unit: str) -> str:
    """One plain sentence on what the numbers promise (or that nothing is promised)."""
    if not privacy.get("private"):
        return ("Trained without differential privacy: no privacy guarantee; the model may reveal "
                "whether a given image was in its training data.")
    return (f"(ε={privacy['epsilon']:.3g}, δ={privacy['delta']:.1g})-differential privacy per {privacy_unit} "
            f"({privacy['accountant'].upper()} accountant, {privacy['steps']} Poisson-sampled steps): whether or not "
            f"any one {privacy_unit.split(' ')[0]} was in the training data changes the probability of any outcome "
            f"by a factor of at most e^ε ≈ {_fmt_factor(privacy['epsilon'])}, except with probability δ.")


def build_card(*, run_id: str, config: RunConfig, status: str, splits, n_train: int, n_test: int,
               skipped: dict, created, trainable: dict, privacy: dict[str, Any], metrics: dict[str, Any] | None,
               eval_history: list[dict[str, Any]], device: str, duration: float,
               warnings: list[str], recipe: dict[str, Any] | None = None,
               metrics_raw: dict[str, Any] | None = None,
               metrics_ema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card. ``metrics`` are the reported ones (those of the EMA weights when ema_decay is set);
    ``metrics_raw`` / ``metrics_ema`` keep both sets, ``model.evaluated_weights`` says which is reported."""
    metrics = metrics or {}
    recipe = recipe or {}
    evaluated = "ema" if config.ema_decay is not None else "raw"
    return {
        "card_version": CARD_VERSION,
        "run_id": run_id,
        "status": status,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # top-level keys that tools read directly
        "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
        "accountant": privacy.get("accountant"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "sample_rate": privacy.get("sample_rate"),
        "steps": privacy.get("steps"),
        "clip_norm": privacy.get("clip_norm"),
        "test_accuracy": metrics.get("accuracy"),
        "test_roc_auc": metrics.get("roc_auc"),
        "test_balanced_accuracy": metrics.get("balanced_accuracy"),
        "guarantee": guarantee_sentence(privacy, splits.privacy_unit),
        "privacy": privacy,
        "dataset": {
            "name": config.dataset, "data_dir": config.data_dir, "n_train": n_train, "n_test": n_test,
            "class_names": splits.class_names, "split": splits.split_info, "privacy_unit": splits.privacy_unit,
            "skipped_unreadable": skipped,
        },
        "model": {
            "backbone": config.backbone, "timm_name": created.spec.timm_name, "weights": created.weights,
            "scope": config.scope, "trainable_params": trainable, "data_config": created.data_config,
            "trainable_blocks": config.trainable_blocks if config.scope == "last-k" else None,
            "weight_standardization": config.weight_standardization,
            "weights_described": describe_weights(created.weights),
            "evaluated_weights": evaluated,
            "saved_weights": evaluated,
        },
        "training": {
            "epochs": config.epochs, "batch_size": config.batch_size,
            "max_physical_batch_size": config.max_physical_batch_size, "optimizer": config.optimizer,
            "lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay,
            "device": device, "duration_s": duration, "seed": config.seed,
            "augmult": config.augmult, "augment": config.augment, "ema_decay": config.ema_decay,
            "lr_schedule": config.lr_schedule, "warmup_fraction": config.warmup_fraction,
            "recipe": recipe,
        },
        "test_metrics": metrics,
        "metrics_raw": metrics_raw if metrics_raw is not None else (metrics if evaluated == "raw" else None),
        "metrics_ema": metrics_ema,
        "eval_history": eval_history,
        "warnings": warnings,
        "config": config.to_dict(),
        "versions": library_versions(),
    }
