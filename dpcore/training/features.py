"""Frozen-backbone features, computed once and cached on disk, for head-only ("linear probe") runs.

When only the classifier is trained (scope "head"), the backbone is a fixed public function of each
image, so its pooled pre-logits features can be computed once — batched, without gradients, on the
GPU when there is one — and DP-SGD then runs on the head alone (Tramèr & Boneh 2021). The privacy
analysis is unchanged: the private examples only ever touch the head's per-example gradients.

The cache is one safetensors file per key under `<runs_dir>/feature_cache/` (or `$DPCORE_FEATURE_CACHE`),
so it lives and is deleted with the runs it serves and tests never write to the home folder. The key
hashes everything the features depend on: the data set (name, folder, split seed and fraction, each
image's source with file size and mtime or the array bytes, and the labels), the backbone, its weights
(source, name, sha256 and a hash of the backbone tensors themselves, which also covers random init),
and the preprocessing (data_config). Change any of them and the key changes; nothing is reused stale.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dpcore.data import DataSplits, ImageList, hash_file_signatures, materialize
from dpcore.errors import DPCoreError
from dpcore.training.preprocess import Normalizer, make_to_uint8

CACHE_ENV = "DPCORE_FEATURE_CACHE"
FORMAT = "dpcore-features-v1"


@dataclass
class Features:
    """Cached pre-logits features of the train and test splits (float32) and what was left out."""

    key: str
    path: Path
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_kept: list[int]
    skipped: dict[str, list] = field(default_factory=dict)
    hit: bool = False  # True when read from the cache, False when just extracted

    @property
    def dim(self) -> int:
        return int(self.train_x.shape[1])


def default_cache_dir(runs_dir: str | Path) -> Path:
    """`$DPCORE_FEATURE_CACHE` if set, else `<runs_dir>/feature_cache`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(runs_dir) / "feature_cache"


def _hash_images(h: "hashlib._Hash", images: ImageList) -> None:
    """Each item's identity: file path + size + mtime (folders), or the pixel bytes (in-memory arrays)."""
    h.update(np.ascontiguousarray(np.asarray(images.labels, dtype=np.int64)).tobytes())
    array = getattr(images, "array", None)
    if isinstance(array, np.ndarray):
        h.update(str((array.shape, str(array.dtype))).encode())
        h.update(np.ascontiguousarray(array).tobytes())
        h.update(np.asarray(getattr(images, "index", []), dtype=np.int64).tobytes())
        return
    hash_file_signatures(h, images)


def backbone_digest(model: torch.nn.Module) -> str:
    """Hash of every backbone tensor (the classifier excluded): the weights the features come from."""
    head = {id(t) for t in model.get_classifier().state_dict(keep_vars=True).values()}
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in head:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def feature_key(*, dataset: str, data_dir: str | None, seed: int, test_fraction: float, medmnist_size: int,
                skip_unreadable: bool, splits: DataSplits, backbone: str, weights: dict[str, Any],
                backbone_hash: str, data_config: dict[str, Any], stage: str = "pooled") -> str:
    """The cache key (hex) of one (data set, split, backbone, weights, preprocessing, what is extracted)
    combination. `stage`: "pooled" (pre-logits features) or "prefix:<start>" (the frozen blocks' output)."""
    h = hashlib.sha256()
    meta = {"format": FORMAT, "dataset": dataset,
            "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
            "seed": seed, "test_fraction": test_fraction, "medmnist_size": medmnist_size,
            "skip_unreadable": skip_unreadable, "class_names": splits.class_names, "backbone": backbone,
            "weights": {k: weights.get(k) for k in ("source", "name", "sha256")}, "backbone_hash": backbone_hash,
            "data_config": data_config}
    if stage != "pooled":  # keys of pooled features stay what they were: existing caches remain valid
        meta["stage"] = stage
    h.update(json.dumps(meta, sort_keys=True, default=list).encode())
    for part in (splits.train, splits.test):
        _hash_images(h, part)
        h.update(b"|")
    return h.hexdigest()[:32]


def pooled_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def extract(model: torch.nn.Module, images: torch.Tensor, normalize: Normalizer, device: torch.device,
            batch_size: int = 256, fn: Callable | None = None) -> torch.Tensor:
    """Pooled pre-logits features, `forward_head(forward_features(x), pre_logits=True)`, as float32 on the CPU;
    with `fn`, `fn(model, x)` instead (the frozen prefix's activations for last-k, any shape)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device))
            out.append((fn or pooled_features)(model, x).float().cpu())
    finally:
        model.train(was_training)
    feats = torch.cat(out) if out else torch.zeros((0, 0))
    if fn is None and feats.ndim != 2:
        raise DPCoreError(f"the backbone's pre-logits features have shape {tuple(feats.shape)}, not (N, D); "
                          "this backbone cannot use the cached-features path. Fix: train it with --scope full")
    return feats.contiguous()


_MEMORY: dict[str, Features] = {}  # the most recent features, so a sweep reads the file only once
_MEMORY_LOCK = threading.Lock()


def _file_stem(cache_dir: Path, key: str) -> str:
    """The cache file's name: the key under a secret salt kept in the cache folder. The key is a hash of the
    training split (for arrays, of its pixels): shown in a log, a card or a file name it would let anyone
    holding candidate data sets test which one was trained on; salted it tells nothing."""
    salt_file = cache_dir / ".salt"
    if not salt_file.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".salt.{os.getpid()}.tmp"
        tmp.write_bytes(os.urandom(32))
        try:
            os.link(tmp, salt_file)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return hashlib.blake2b(key.encode(), key=salt_file.read_bytes()[:32], digest_size=16).hexdigest()


def load_or_extract(*, key: str, cache_dir: Path, splits: DataSplits, model: torch.nn.Module,
                    data_config: dict[str, Any], device: torch.device, skip_unreadable: bool,
                    batch_size: int = 256, log: Callable[[str], None] = lambda _: None,
                    fn: Callable | None = None) -> Features:
    """The features of `key`: from memory, else from the cache file, else extracted now and saved. `fn`: what
    to extract (default: pooled pre-logits features); its identity must be part of `key`."""
    path = Path(cache_dir) / f"{_file_stem(Path(cache_dir), key)}.safetensors"
    with _MEMORY_LOCK:
        hit = _MEMORY.get(key)
    if hit is not None and path.exists():
        log(f"features: reusing the features already in memory ({path})")
        return dataclasses.replace(hit, hit=True)
    if path.exists():
        try:
            feats = _read(key, path)
            log(f"features: read {len(feats.train_y)} train + {len(feats.test_y)} test features from {path}")
        except Exception as exc:  # a torn or foreign file: say so, then rebuild it
            log(f"features: cache file {path} is unreadable ({type(exc).__name__}: {exc}); extracting again")
            feats = None
    else:
        feats = None
    if feats is None:
        feats = _extract_all(key, path, splits, model, data_config, device, skip_unreadable, batch_size, log, fn)
    with _MEMORY_LOCK:
        _MEMORY.clear()
        _MEMORY[key] = feats
    return feats


def _extract_all(key, path, splits, model, data_config, device, skip_unreadable, batch_size, log,
                 fn=None) -> Features:
    to_uint8 = make_to_uint8(data_config)
    log(f"features: decoding {len(splits.train)} train + {len(splits.test)} test images and extracting "
        f"backbone features on {device} (once; cached as {path})")
    train_m = materialize(splits.train, to_uint8, skip_unreadable=skip_unreadable)
    test_m = materialize(splits.test, to_uint8, skip_unreadable=skip_unreadable)
    normalize = Normalizer.from_config(data_config).to(device)
    model = model.to(device)
    feats = Features(key=key, path=path, train_x=extract(model, train_m.images, normalize, device, batch_size, fn),
                     train_y=train_m.labels, test_x=extract(model, test_m.images, normalize, device, batch_size, fn),
                     test_y=test_m.labels, test_kept=list(test_m.kept),
                     skipped={"train": [list(s) for s in train_m.skipped], "test": [list(s) for s in test_m.skipped]})
    _write(feats)
    return feats


def _write(f: Features) -> None:
    f.path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"train_x": f.train_x, "train_y": f.train_y, "test_x": f.test_x, "test_y": f.test_y,
               "test_kept": torch.as_tensor(f.test_kept, dtype=torch.int64)}
    tmp = f.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "key": f.key, "skipped": json.dumps(f.skipped)})
    tmp.replace(f.path)  # atomic: readers see the old file or the whole new one


def _read(key: str, path: Path) -> Features:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("key") != key:
            raise ValueError(f"not a {FORMAT} file for key {key}")
        t = {name: fh.get_tensor(name) for name in ("train_x", "train_y", "test_x", "test_y", "test_kept")}
    return Features(key=key, path=path, train_x=t["train_x"], train_y=t["train_y"], test_x=t["test_x"],
                    test_y=t["test_y"], test_kept=t["test_kept"].tolist(),
                    skipped={k: [tuple(s) for s in v] for k, v in json.loads(meta.get("skipped", "{}")).items()},
                    hit=True)
