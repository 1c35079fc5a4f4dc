"""Checkpoints of a running training, so a killed or cancelled run can be resumed (`python -m dpcore resume`).

What is saved: the trained module's weights, the optimizer's state, the EMA's shadow weights, torch's global
generator (the PUBLIC randomness the user's seed drives: augmentation, shuffling of non-private runs), the
steps taken and the evaluation history. What is never saved: the DP noise and sampling generators
(`dpcore.privacy.randomness` refuses to be serialised); a resumed run draws them fresh from the OS.
Tensors go to `checkpoint.safetensors` (never pickle), everything else to `checkpoint.json`, written last and
holding the tensors file's sha256, so a checkpoint is either whole or ignored. Both are atomic replacements.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.weight_sources import sha256_file as _sha256

from dpcore.errors import DPCoreError
from dpcore.store.runs import atomic_write

TENSORS, META = "checkpoint.safetensors", "checkpoint.json"
VERSION = 1


class CheckpointError(DPCoreError):
    """No usable checkpoint, or one that does not fit the run it should resume."""


@dataclass
class Checkpoint:
    step: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer's state_dict as (tensors, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                state.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": state, "tensor_keys": sorted(tensors)}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key in meta["tensor_keys"]:
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = tensors[key]
    for idx, rest in meta["state"].items():
        state.setdefault(int(idx), {}).update(rest)
    return {"state": state, "param_groups": meta["param_groups"]}


def save(run_dir: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         ema_shadow: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> None:
    run_dir = Path(run_dir)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_parts(optimizer)
    tensors.update({f"optim/{k}": v for k, v in opt_tensors.items()})
    for k, v in (ema_shadow or {}).items():
        tensors[f"ema/{k}"] = v.detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    path = run_dir / TENSORS
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    body = {"version": VERSION, "step": int(step), "optimizer": opt_meta, "tensors_sha256": _sha256(path),
            "has_ema": ema_shadow is not None, **meta}
    atomic_write(run_dir / META, json.dumps(body, default=float, allow_nan=True))


def load(run_dir: Path) -> Checkpoint:
    run_dir = Path(run_dir)
    meta_path, tensors_path = run_dir / META, run_dir / TENSORS
    if not meta_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(f"run {run_dir.name} has no checkpoint (it was stopped before its first one). Fix: "
                              "train it again; checkpoints are written every --checkpoint-every seconds")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}). Fix: train the run again") from exc
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path} has checkpoint version {meta.get('version')!r}, this one reads {VERSION}")
    if _sha256(tensors_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensors_path} does not match its checkpoint.json (a write was cut short). "
                              "Fix: train the run again")
    return Checkpoint(step=int(meta["step"]), meta=meta, tensors=load_file(str(tensors_path)))


def remove(run_dir: Path) -> None:
    for name in (META, TENSORS):  # the JSON first: without it the tensors file is ignored
        (Path(run_dir) / name).unlink(missing_ok=True)


def exists(run_dir: Path) -> bool:
    return (Path(run_dir) / META).is_file()
