"""The model card: a run's data, model, privacy guarantee and test results, saved as card.json."""
from __future__ import annotations

import math
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from dpcore.config import RunConfig

CARD_VERSION = 1
_LIBS = ("torch", "torchvision", "opacus", "timm", "dp-accounting", "scikit-learn", "safetensors", "numpy", "pillow")

# what dpcore.training.calibration fits and the card lists among the facts treated as public
PUBLIC_FACT = ("the softmax temperature (probability calibration), when one is fitted, and its before/after "
               "calibration figures: computed from held-out test images, which the guarantee does not cover (like "
               "the test metrics)")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[lib] = "not installed"
    return out


def _fmt_factor(eps: float) -> str:
    """e^ε in words for the guarantee sentence; never math.exp of a large ε (it overflows past ~709)."""
    if not math.isfinite(eps):
        return "∞"
    if eps > 50:  # e^50 ≈ 5e21: past any meaningful bound (and math.exp overflows past ~709)
        return f"10^{eps / math.log(10):.0f}"
    factor = math.exp(eps)
    return f"{factor:.3g}" if factor < 1000 else f"{factor:,.0f}"


ADJACENCY = ("add/remove one image: the two training sets differ by one image being present or absent (the "
             "relation the Poisson-subsampled Gaussian accountant assumes)")


def adjacency(unit: str = "image") -> str:
    """The neighbouring relation ε is stated for: one image, or one patient (lesion) with all of their images."""
    if unit == "image":
        return ADJACENCY
    return (f"add/remove one {unit}: the two training sets differ by ALL images of one {unit} being present or "
            f"absent ({unit}s are Poisson-sampled and each {unit}'s gradient is clipped as one, so the accountant "
            f"runs over {unit}s)")


def release_facts(config: RunConfig, unit: str = "image") -> dict[str, Any]:
    """What a run releases, what the accountant's ε covers, and which facts the card treats as public."""
    private = config.private and not config.insecure_reproducible_noise
    return {
        "unit": unit,
        "adjacency": adjacency(unit),
        "released": (["the trained model's weights (model.safetensors) — the only output computed from the private "
                      "training images, through DP-SGD's noise",
                      "test-split metrics and predictions of that model (computed on the test split, which is not "
                      "protected by the guarantee)",
                      "ε spent per step (a function of σ, q, T and δ only)"] if private else
                     ["the trained model's weights", "test-split metrics and predictions",
                      "training-batch losses (non-private runs only)"]),
        "not_released": ["training-batch losses or any other statistic of the private Poisson batches",
                         "the noise and sampling randomness (OS-seeded, reseeded every step, never stored)",
                         "hashes or fingerprints of the training images (kept in the local privacy ledger only)"]
                        if private else [],
        "treated_as_public": ["the number of training and test images (n) and each split's class counts",
                              "the data set's grouping counts (patients / lesions per split)",
                              "the names of files skipped as unreadable",
                              "how many files of the data folder are byte-identical copies or not images (counts "
                              "only: which files they are is not on the card)",
                              "the run's configuration, its seed (which fixes initialisation, augmentation and "
                              "splits, never the noise or the sampling) and the starting weights",
                              "wall-clock timing of the run",
                              PUBLIC_FACT],
        "test_split": "evaluated, not trained on: its images get no guarantee from this run",
    }


# Lists in a loader's split_info that name files by what their content is (which training files are byte-identical
# copies of each other, which are not images): the loader warns with them locally; the card keeps their counts.
_CONTENT_LISTS = ("duplicate_files", "ignored_files")


def public_split_info(info: dict[str, Any]) -> dict[str, Any]:
    """The split description for the card, without the per-file lists computed from the images' content."""
    return {k: v for k, v in (info or {}).items() if k not in _CONTENT_LISTS}


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


def guarantee_sentence(privacy: dict[str, Any], privacy_unit: str, lineage: dict[str, Any] | None = None) -> str:
    """One plain sentence on what the numbers promise (or, first, that nothing is promised)."""
    unit = privacy.get("unit") if privacy.get("unit") not in (None, "image") else privacy_unit.split(" ")[0]
    if not privacy.get("private"):
        return ("Trained without differential privacy: no privacy guarantee; the model may reveal "
                f"whether a given {unit} was in its training data.")
    if privacy.get("insecure_reproducible_noise"):
        return ("NO DP GUARANTEE: this run's noise and sampling were derived from its recorded seed "
                "(--insecure-reproducible-noise, a debugging mode), so anyone with its card can replay the training "
                f"and tell whether a given {unit} was in it. The ε it reports describes the noise level only.")
    if lineage and lineage.get("void"):
        sentence = lineage.get("sentence") or ""
        return sentence if sentence.startswith("NO DP GUARANTEE") else (
            "NO DP GUARANTEE for the images that its starting weights were also trained on without DP. " + sentence)
    eps = privacy["epsilon"]
    composed = ""
    if lineage and lineage.get("composed_over_ancestors") and lineage.get("epsilon") is not None:
        eps = lineage["epsilon"]
        composed = ", composed with the earlier training of its starting weights on the same images"
    every = f" with all of their images" if unit != "image" and privacy.get("unit") == unit else ""
    return (f"(ε={eps:.3g}, δ={privacy['delta']:.1g})-differential privacy per {unit}, for adding or removing one "
            f"{unit}{every} ({privacy['accountant'].upper()} accountant, {privacy['steps']} Poisson-sampled steps"
            f"{' of ' + unit + 's' if every else ''}{composed}): whether or not any one {unit} was in the training "
            f"data changes the probability of any outcome by a factor of at most e^ε ≈ {_fmt_factor(eps)}, except "
            "with probability δ.")


def build_card(*, run_id: str, config: RunConfig, status: str, splits, n_train: int, n_test: int,
               skipped: dict, created, trainable: dict, privacy: dict[str, Any], metrics: dict[str, Any] | None,
               eval_history: list[dict[str, Any]], device: str, duration: float,
               warnings: list[str], recipe: dict[str, Any] | None = None,
               metrics_raw: dict[str, Any] | None = None,
               metrics_ema: dict[str, Any] | None = None, lineage: dict[str, Any] | None = None,
               lineage_chain: list[dict[str, Any]] | None = None, group=None) -> dict[str, Any]:
    """The card. ``metrics`` are the reported ones (those of the EMA weights when ema_decay is set);
    ``metrics_raw`` / ``metrics_ema`` keep both sets, ``model.evaluated_weights`` says which is reported."""
    metrics = metrics or {}
    recipe = recipe or {}
    evaluated = "ema" if config.ema_decay is not None else "raw"
    insecure = bool(privacy.get("insecure_reproducible_noise"))
    holds = bool(privacy.get("private")) and not insecure and not (lineage or {}).get("void")
    guaranteed_eps = None
    if holds:
        guaranteed_eps = (lineage or {}).get("epsilon") or privacy.get("epsilon")
    privacy = dict(privacy)
    privacy["guarantee_holds"] = holds
    privacy["guarantee_epsilon"] = guaranteed_eps
    privacy["unit"] = privacy.get("unit") or "image"
    privacy["adjacency"] = adjacency(privacy["unit"])
    if group is not None and holds:
        from dpcore.privacy.group_privacy import group_summary

        privacy["group"] = group_summary(guaranteed_eps, privacy["delta"], group)
    return {
        "card_version": CARD_VERSION,
        "run_id": run_id,
        "status": status,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # top-level keys that tools read directly
        "epsilon": None if insecure else privacy.get("epsilon"),
        "guarantee_epsilon": guaranteed_eps,
        "delta": privacy.get("delta"),
        "accountant": privacy.get("accountant"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "sample_rate": privacy.get("sample_rate"),
        "steps": privacy.get("steps"),
        "clip_norm": privacy.get("clip_norm"),
        "test_accuracy": metrics.get("accuracy"),
        "test_roc_auc": metrics.get("roc_auc"),
        "test_balanced_accuracy": metrics.get("balanced_accuracy"),
        "guarantee": guarantee_sentence(privacy, splits.privacy_unit, lineage),
        "privacy": privacy,
        "privacy_facts": release_facts(config, privacy["unit"]),
        "lineage": {**(lineage or {}), "chain": lineage_chain or []},
        "dataset": {
            "name": config.dataset, "data_dir": config.data_dir, "n_train": n_train, "n_test": n_test,
            "class_names": splits.class_names, "split": public_split_info(splits.split_info),
            "privacy_unit": splits.privacy_unit if privacy["unit"] == "image" else (
                f"{privacy['unit']} (all images of one {privacy['unit']}: {privacy.get('unit_source', '')})"),
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
