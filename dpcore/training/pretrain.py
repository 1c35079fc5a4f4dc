"""Public pretraining, offline: train a backbone WITHOUT differential privacy on a data set the user
declares public, and save it (without its classifier) for DP fine-tuning on private data.

    python -m dpcore pretrain --dataset ham10000 --data-dir ../shared/data/ham10000 --backbone tiny_cnn \
        --image-size 64 --epochs 5 --out ham_tiny.safetensors
    python -m dpcore train --dataset folder --data-dir ../shared/data/chest_xray --pretrained ham_tiny.safetensors ...

The pretraining images get NO privacy protection: the weights may reveal them. The privacy ledger
records the pretraining as a non-private use of its images (their ε is ∞), and refuses images it knows
from a private run unless ``force_public`` (``--force-public``) says the data really are public. A later
DP run is unaffected when it trains on other images; when it shares images with the pretraining, its
guarantee is void for them (the weights carry their lineage: ``dpcore.privacy.lineage``).

Output: ``OUT.safetensors`` holds the backbone's state dict (keys of the Opacus-compatible model that
``models.create_model`` builds) minus the classifier head, so it loads for any number of classes
(``--pretrained OUT.safetensors``: the head is initialised afresh). Its safetensors metadata carries
``format = dpcore-backbone-v1`` and ``pretraining`` (JSON facts: data set, date, config, test metrics);
the same facts plus the file's sha256 go to the sidecar ``OUT.json``. The DP run's card records them
under ``model.weights.provenance``.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import models
from models.weight_sources import sha256_file

from dpcore.config import RunConfig
from dpcore.errors import ConfigError
from dpcore.store.events import Listener
from dpcore.store.runs import RunStore

FORMAT = "dpcore-backbone-v1"


@dataclass
class PretrainResult:
    path: Path  # the weights file
    sidecar: Path  # OUT.json
    facts: dict[str, Any]


def sidecar_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".json")


def pretrain(dataset: str, out: str | Path, *, data_dir: str | None = None, backbone: str = "tiny_cnn",
             image_size: int | None = None, epochs: int = 5, public: str | None = None,
             listener: Listener | None = None, force_public: bool = False, **options: Any) -> PretrainResult:
    """Train ``backbone`` non-privately on ``dataset`` (declared public) and write its weights without
    the classifier to ``out`` (a .safetensors path) plus the sidecar ``out.json``.

    ``force_public``: pretrain even on images the ledger knows from private runs (recorded as such).
    ``options``: any other run-config field (batch_size, lr, optimizer, seed, device, augmult, augment,
    ema_decay, weight_standardization, lr_schedule, warmup_fraction, medmnist_size, ...). The run is made
    in a temporary store and discarded; its test metrics (on the data set's own test split) are kept
    in the facts. ``public``: why these data may be treated as public (recorded).
    """
    from dpcore.training.trainer import train  # lazy: importing the trainer pulls in Opacus

    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ConfigError("out", f"{out} does not end in .safetensors", "pass e.g. --out weights.safetensors")
    for bad in ("epsilon", "non_private", "scope", "pretrained_out"):
        if bad in options:
            raise ConfigError(bad, "is fixed for pretraining (non-private, every parameter trained)",
                              "leave it out")
    config = RunConfig(dataset=dataset, data_dir=data_dir, backbone=backbone, image_size=image_size,
                       epochs=epochs, epsilon=None, scope="full", **options)
    config.check_paths()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dpcore-pretrain-") as tmp:
        store = RunStore(Path(tmp) / "runs")
        result = train(config, store, listener=listener, kind="pretrain", force_public=force_public)
        if result.status != "done":
            raise RuntimeError(f"pretraining ended with status {result.status}")
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from dpcore.privacy.lineage import METADATA_KEY

        run_file = store.run_dir(result.run_id) / "model.safetensors"
        state = load_file(str(run_file))
        with safe_open(str(run_file), framework="pt") as fh:
            lineage_meta = (fh.metadata() or {}).get(METADATA_KEY)
    card = result.card
    created = models.create_model(backbone, len(card["dataset"]["class_names"]), image_size=image_size)
    head = models.factory._classifier_prefix(created.model)
    backbone_state = {k: v.contiguous() for k, v in state.items() if not models.factory._is_head_key(k, head)}
    facts = {
        "kind": "public pretraining (non-private)",
        "dataset": dataset, "data_dir": data_dir, "backbone": backbone, "image_size": image_size,
        "epochs": epochs, "public": public or "declared public by the user",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_train": card["dataset"]["n_train"], "n_test": card["dataset"]["n_test"],
        "class_names": card["dataset"]["class_names"],
        "test_metrics": {k: card["test_metrics"].get(k) for k in ("accuracy", "balanced_accuracy", "roc_auc", "loss")},
        "weights_saved": card["model"]["saved_weights"], "head_removed": sorted(set(state) - set(backbone_state)),
        "data_config": created.data_config, "config": config.to_dict(),
        "privacy": "none: the pretraining images are treated as public and get no DP protection",
        "versions": {k: card["versions"].get(k) for k in ("torch", "opacus", "timm")},
    }
    from dpcore.store.runs import atomic_write

    meta = {"format": FORMAT, "backbone": backbone, "pretraining": json.dumps(facts, default=list)}
    if lineage_meta:
        meta[METADATA_KEY] = lineage_meta
    atomic_write(out, lambda tmp: save_file(backbone_state, str(tmp), metadata=meta))
    side = sidecar_path(out)
    atomic_write(side, json.dumps({**facts, "weights_file": out.name, "sha256": sha256_file(out)}, indent=2,
                                  default=list))
    return PretrainResult(out, side, facts)


def state_dict_keys(path: str | Path) -> list[str]:  # for tests and the CLI summary
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


__all__ = ["FORMAT", "PretrainResult", "pretrain", "sidecar_path", "state_dict_keys"]
