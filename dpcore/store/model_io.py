"""Saving and loading run weights with safetensors (never pickle): weights + what is needed to use them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from dpcore.store.runs import atomic_write


def save_model(model: torch.nn.Module, path: Path, class_names: list[str], data_config: dict[str, Any],
               run_id: str, lineage: list[dict[str, Any]] | None = None) -> None:
    """Weights plus the class names, preprocessing config and lineage (which trainings on which images,
    `dpcore.privacy.lineage`) as safetensors string metadata. Written atomically (`store.atomic_write`)."""
    from dpcore.privacy.lineage import METADATA_KEY, to_metadata

    meta = {"class_names": json.dumps(class_names), "data_config": json.dumps(data_config, default=list),
            "run_id": run_id, "format": "dpcore-run-v1"}
    if lineage is not None:
        meta[METADATA_KEY] = to_metadata(lineage)
    # A temporary file beside it, fsynced, then renamed: a crash leaves the old weights or the new ones.
    atomic_write(Path(path), lambda tmp: _st_save_model(model, str(tmp), metadata=meta))


def read_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    from dpcore.privacy.lineage import from_metadata

    return {"class_names": json.loads(meta["class_names"]), "data_config": json.loads(meta["data_config"]),
            "run_id": meta.get("run_id"), "lineage": from_metadata(meta)}


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Strict load: every key must match, so a reloaded run is exactly the trained one."""
    missing, unexpected = _st_load_model(model, str(path), strict=True)
    if missing or unexpected:  # strict=True raises first; kept as a guard
        raise RuntimeError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")
