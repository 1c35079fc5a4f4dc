"""``create_model`` / ``set_trainable``: build a registered backbone, load its weights, make it DP-ready."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from dpcore.errors import ConfigError, WeightsError

from . import weight_sources
from .bn_fold import fold_batchnorm, has_batchnorm
from .opacus_compat import make_opacus_compatible
from .registry import BackboneSpec, get_spec
from .tiny_cnn import TinyCNN

HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class CreatedModel:
    model: nn.Module  # already made Opacus-compatible
    spec: BackboneSpec
    data_config: dict  # input_size (3,H,W), mean, std, interpolation, crop_pct (+ crop_mode for timm)
    # source (none|hub|bundled|file|weights-dir), requested, name, path, sha256, skipped_keys, provenance,
    # lineage / legacy_run (files), norm (groupnorm|folded-bn), batchnorm (what was done to BN), tried (default)
    weights: dict = field(default_factory=dict)


NORMS = ("auto", "groupnorm", "folded-bn")


# ---------------------------------------------------------------------------------------------
# helpers


def _classifier_prefix(model: nn.Module) -> str:
    head = model.get_classifier()
    for name, m in model.named_modules():
        if m is head:
            return name
    raise RuntimeError("classifier module not found in model")  # pragma: no cover


def _is_head_key(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _sha256(path: Path) -> str:
    return weight_sources.sha256_file(path)


@contextlib.contextmanager
def _hf_offline():
    """Let huggingface_hub use its local cache only (no network, no retries)."""
    import huggingface_hub.constants as hfc

    old = hfc.HF_HUB_OFFLINE
    hfc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hfc.HF_HUB_OFFLINE = old


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to the Hugging Face Hub be opened within ``timeout`` seconds?

    Without this check an offline machine spends ~45 s in huggingface_hub's retries. Behind a proxy
    we cannot tell, so we say yes and let the download itself decide.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        import huggingface_hub.constants as hfc

        endpoint = hfc.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    ok = [False]

    def probe():  # DNS lookups ignore socket timeouts, hence the thread
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return ok[0]


def _hub_error(spec: BackboneSpec, why: str) -> WeightsError:
    return WeightsError(
        f"pretrained weights {spec.timm_name!r} for backbone {spec.name!r} could not be downloaded "
        f"from the Hugging Face Hub ({why}). Fix: run once online (with internet access) so that "
        "they are cached (~/.cache/huggingface), or pass a local .safetensors file of the backbone's "
        "state dict as pretrained=PATH"
    )


def _create_timm_from_hub(spec: BackboneSpec, num_classes: int, kwargs: dict, offline_only: bool = False) -> nn.Module:
    import timm

    hub_log = logging.getLogger("huggingface_hub")
    old_level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        try:  # 1) cached already? no network needed
            with _hf_offline():
                return timm.create_model(spec.timm_name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as e:
            if offline_only:
                raise _hub_error(spec, f"the cached checkpoint did not load: {type(e).__name__}: {e}") from e
        if not _hub_reachable():  # 2) fail in seconds when offline
            raise _hub_error(spec, f"no connection to the Hub within {HUB_PROBE_TIMEOUT_S:g} s")
        try:  # 3) download
            return timm.create_model(spec.timm_name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as e:
            raise _hub_error(spec, f"{type(e).__name__}: {e}") from e
    finally:
        hub_log.setLevel(old_level)


def _adapt_state_dict(model: nn.Module, spec: BackboneSpec, state: dict) -> dict:
    """timm's own filters resample position embeddings / relative position tables to the model's size."""
    if spec.family == "vit":
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn(state, model)
    if spec.family == "beit":
        from timm.models.beit import checkpoint_filter_fn

        return checkpoint_filter_fn(state, model)
    return state


def _load_file(model: nn.Module, spec: BackboneSpec, path_str: str, adapt: bool = True) -> dict:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} does not exist. Fix: pass the path of a .safetensors file with the "
            f"state dict of a {spec.name} model, pretrained='hub' to download timm's weights, or pretrained='none'"
        )
    if path.suffix != ".safetensors":
        raise WeightsError(
            f"weights file {str(path)!r} is not a .safetensors file; pickle-based checkpoints (.pth/.bin/.pt) "
            "are never loaded because they can run code. Fix: convert it once with "
            "safetensors.torch.save_file(state_dict, 'weights.safetensors')"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"weights file {str(path)!r} could not be read as safetensors ({e}). "
                           "Fix: re-save it with safetensors.torch.save_file") from e
    try:
        state = _adapt_state_dict(model, spec, state) if adapt else state
    except Exception as e:
        raise WeightsError(f"weights file {str(path)!r} does not fit backbone {spec.name!r} ({e}). "
                           f"Fix: use weights saved from a {spec.name} model") from e

    own = model.state_dict()
    head = _classifier_prefix(model)
    skipped, mismatched, missing, unexpected = [], [], [], []
    for k, v in own.items():
        if k not in state:
            (skipped if _is_head_key(k, head) else missing).append(k)
        elif tuple(state[k].shape) != tuple(v.shape):
            if _is_head_key(k, head):
                skipped.append(k)
            else:
                mismatched.append(f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})")
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                parts.append(f"{label} keys: {shown}")
        raise WeightsError(
            f"weights file {str(path)!r} does not fit backbone {spec.name!r}: " + "; ".join(parts)
            + f". Fix: use a state dict saved from a timm {spec.timm_name or spec.name} model "
            "(before make_opacus_compatible), with any number of classes"
        )
    to_load = {k: v for k, v in state.items() if k not in skipped}
    model.load_state_dict(to_load, strict=False)
    return {"source": "file", "name": str(path), "sha256": _sha256(path), "skipped_keys": skipped}


# Files written by DP Explorer itself (a run's model.safetensors, a `pretrain` output) hold the state dict
# of a model *after* make_opacus_compatible (its keys differ for ViT/BEiT/ConvNeXt), so they are loaded
# after it; a timm state dict is loaded before.
DPCORE_FORMATS = ("dpcore-run-v1", "dpcore-backbone-v1")


def _file_metadata(path_str: str) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(path_str).expanduser()), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):  # unreadable files: _load_file says so clearly
        return {}


def weights_provenance(path_str: str, meta: dict | None = None) -> dict:
    """What a local weights file says about itself: the `pretrain` facts stored in its safetensors
    metadata, and those of its sidecar JSON (``weights.json`` or ``weights.safetensors.json``), if any."""
    import json

    path = Path(path_str).expanduser()
    meta = _file_metadata(path_str) if meta is None else meta
    out: dict[str, Any] = {"format": meta.get("format", "state_dict")}
    if meta.get("pretraining"):
        try:
            out["pretraining"] = json.loads(meta["pretraining"])
        except ValueError:
            out["pretraining"] = meta["pretraining"]
    if meta.get("run_id"):
        out["from_run"] = meta["run_id"]
    for side in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
        if side.is_file():
            try:
                facts = json.loads(side.read_text())
            except (OSError, ValueError):
                continue
            out["sidecar"] = {"path": str(side), "facts": facts}
            if isinstance(facts, dict) and facts.get("sha256"):
                out["sidecar"]["sha256_matches"] = facts["sha256"] == _sha256(path)
            break
    return out


# ---------------------------------------------------------------------------------------------
# weight standardisation


def standardize_weight(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per output filter (over in-channels × kernel), as in Qiao et al. 2019."""
    dims = tuple(range(1, w.dim()))
    mean = w.mean(dim=dims, keepdim=True)
    var = w.var(dim=dims, keepdim=True, unbiased=False)
    return (w - mean) / torch.sqrt(var + eps)


class WSConv2d(nn.Conv2d):
    """A Conv2d that convolves with its standardised weight; the parameter (and key) stays ``weight``.

    Per-example gradients: Opacus looks grad samplers up by exact type, so this class has none and
    Opacus' functorch fallback differentiates this module's own forward, standardisation included:
    the per-example gradient is w.r.t. the raw ``weight`` (tested against per-example autograd).
    Book-keeping (also exact types) refuses it, and the trainer then uses Opacus' hooks. A subclass
    that Opacus' Conv2d sampler handled would give the gradient w.r.t. the standardised weight: wrong.
    """

    ws_eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.ws_eps), self.bias)


def apply_weight_standardization(model: nn.Module) -> int:
    """Turn every plain Conv2d with a fan-in ≥ 2 into a WSConv2d in place (hooks, keys and weights kept).
    Returns how many were converted."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv2d and m.weight[0].numel() >= 2:
            m.__class__ = WSConv2d
            n += 1
    return n


@torch.no_grad()
def bake_weight_standardization(model: nn.Module) -> int:
    """Store each WSConv2d's standardised weight as a plain Conv2d's weight (same function, same keys),
    so the saved model loads into a plain model. Returns how many were baked."""
    n = 0
    for m in model.modules():
        if isinstance(m, WSConv2d):
            m.weight.copy_(standardize_weight(m.weight, m.ws_eps))
            m.__class__ = nn.Conv2d
            n += 1
    return n


_DATA_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


def _data_config(model: nn.Module, spec: BackboneSpec, size: int, sidecar: Optional[dict] = None) -> dict:
    """timm's preprocessing config for the model, with the weights' own normalisation where it differs:
    the spec's ``mean_std`` (TFLite MobileNets: mean = std = 128/255), then a weights file's sidecar
    ``data_config`` (mean, std, interpolation, crop_pct, crop_mode)."""
    if spec.timm_name is None:
        cfg = model.pretrained_cfg
        out = {"input_size": (3, size, size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
               "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"], "crop_mode": cfg["crop_mode"]}
    else:
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        out = {"input_size": (3, size, size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
               "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"],
               "crop_mode": cfg.get("crop_mode", "center")}
    if spec.mean_std is not None:
        out["mean"], out["std"] = (spec.mean_std[0],) * 3, (spec.mean_std[1],) * 3
    extra = (sidecar or {}).get("data_config")
    if isinstance(extra, dict):
        for k in (k for k in _DATA_KEYS if k in extra):
            v = extra[k]
            if k in ("mean", "std"):
                v = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3
            out[k] = v
    return out


def _bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _norm_of_keys(keys, bn_names: list[str]) -> str:
    """Which architecture a DP Explorer file was saved from: GroupNorm keeps the BN layers' ``weight`` and
    ``bias`` keys; folded BN has none of them (its affine maps live in the conv biases)."""
    keys = set(keys)
    if not bn_names:
        return "groupnorm"  # no BatchNorm: both choices are the same network
    if any(f"{b}.weight" in keys or f"{b}.bias" in keys for b in bn_names):
        return "groupnorm"
    return "folded-bn"


def saved_norm(backbone: str, path: str | Path) -> str:
    """The ``norm`` a DP Explorer weights file (a run's model.safetensors) was trained with, from its keys:
    pass it to ``create_model(..., pretrained="none", norm=...)`` to rebuild that architecture."""
    return _norm_of_keys(_file_keys(str(path)), _bn_names(weight_sources.meta_model(get_spec(backbone))))


def _apply_norm(model: nn.Module, norm: str, verify: bool) -> dict:
    """Fold BN into the convolutions (``folded-bn``) or leave it to make_opacus_compatible (GroupNorm)."""
    n = len(_bn_names(model))
    if n == 0:
        return {"count": 0, "treatment": "none in this architecture"}
    if norm == "folded-bn":
        info = fold_batchnorm(model, verify=verify)
        return {"count": n, "treatment": "folded into the preceding convolutions (frozen running statistics)",
                **info}
    return {"count": n, "treatment": "replaced by GroupNorm (affine copied, running statistics dropped)"}


# ---------------------------------------------------------------------------------------------
# public API


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: Optional[str] = "none",
    image_size: Optional[int] = None,
    weight_standardization: bool = False,
    norm: str = "auto",
) -> CreatedModel:
    """Build backbone ``name`` with a fresh ``num_classes`` head, load weights, make it Opacus-ready.

    ``pretrained``: ``"none"`` (random init), ``"hub"`` (timm's pretrained weights, cached or
    downloaded), ``"bundled"`` (weights shipped as a package: tf_efficientnet_lite0), ``"default"`` (the
    local hub cache, then the bundled package, then ``$DPCORE_WEIGHTS_DIR``; see
    ``models.weight_sources``) or the path of a local ``.safetensors`` file with the backbone's (timm)
    state dict. ``image_size``: input side length; ViT/BEiT are built for it (position embeddings
    resampled), for CNNs it only sets ``data_config["input_size"]``. A file written by DP Explorer (a
    run's ``model.safetensors`` or a ``python -m dpcore pretrain`` output) is loaded after the model is
    made Opacus-compatible, its head dropped for the new classes; ``weights["provenance"]`` says where it
    came from. ``weight_standardization``: every Conv2d standardises its weight (``WSConv2d``).

    ``norm``: what BatchNorm becomes. ``"folded-bn"``: folded into the convolution before it (pretrained
    BN networks keep their function; ``models.bn_fold``); ``"groupnorm"``: GroupNorm (random init);
    ``"auto"``: folded-bn for pretrained weights, groupnorm for ``"none"``, and for a DP Explorer file the
    architecture it was saved from. Recorded as ``weights["norm"]``; ``saved_norm`` reads it back from a
    saved file, so ``pretrained="none"`` with that ``norm`` rebuilds a run's architecture.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("num_classes", f"must be a positive integer, got {num_classes!r}",
                          "set it to the number of classes in the data set")
    size = spec.default_image_size if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ConfigError("image_size", f"must be an integer >= 8, got {image_size!r}", "use e.g. 32, 64 or 224")
    if spec.is_transformer and size % 16:
        raise ConfigError("image_size", f"{spec.name} uses 16x16 patches, {size} is not a multiple of 16",
                          "use a multiple of 16, e.g. 32, 64, 224")
    if norm not in NORMS:
        raise ConfigError("norm", f"unknown norm {norm!r}", "use one of: " + ", ".join(NORMS))
    resolved = weight_sources.resolve(spec, pretrained)
    kwargs: dict[str, Any] = {"img_size": size} if spec.is_transformer else {}
    kwargs.update(spec.kwargs)

    model: nn.Module
    weights: dict
    if resolved.source == "hub":
        try:
            model = _create_timm_from_hub(spec, num_classes, kwargs, offline_only=resolved.hub_offline)
        except WeightsError:
            if resolved.requested != "default":
                raise
            resolved = weight_sources.resolve(spec, "default", skip_hub=True)
    if resolved.source == "hub":
        cached = weight_sources.hub_cached(spec)
        weights = {"source": "hub", "name": spec.timm_name, "sha256": _sha256(cached) if cached else None,
                   "path": str(cached) if cached else None, "skipped_keys": []}
        if model.pretrained_cfg.get("num_classes") != num_classes:  # timm re-initialised the head
            head = _classifier_prefix(model)
            weights["skipped_keys"] = sorted(k for k in model.state_dict() if _is_head_key(k, head))
    elif spec.timm_name is None:
        model = TinyCNN(num_classes=num_classes)
        weights = {"source": "none", "name": None, "sha256": None, "skipped_keys": []}
    else:
        import timm

        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
        weights = {"source": "none", "name": None, "sha256": None, "skipped_keys": []}

    path = str(resolved.path) if resolved.path is not None else None
    meta = _file_metadata(path) if path else {}
    post_compat = meta.get("format") in DPCORE_FORMATS
    if norm == "auto":
        if post_compat:
            norm = _norm_of_keys(_file_keys(path), _bn_names(model))
        else:
            norm = "groupnorm" if resolved.source == "none" else "folded-bn"
    if path and not post_compat:
        weights = _load_file(model, spec, path)
    sidecar = weight_sources.sidecar_facts(Path(path)) if path else None
    data_config = _data_config(model, spec, size, sidecar if resolved.source in ("file", "weights-dir") else None)
    batchnorm = _apply_norm(model, norm, verify=resolved.source != "none" and not post_compat)
    model = make_opacus_compatible(model)
    if path and post_compat:
        weights = _load_file(model, spec, path, adapt=False)
    weights["source"] = resolved.source
    weights["requested"] = resolved.requested
    if resolved.source in ("bundled", "weights-dir"):
        weights["name"] = resolved.name
    if path:
        weights["path"] = path
    weights.setdefault("path", None)
    if resolved.source == "bundled":
        weights["provenance"] = dict(resolved.provenance)
        weights["lineage"] = None
    elif path:
        weights["provenance"] = {**weights_provenance(path, meta), **resolved.provenance}
        from models.lineage_metadata import from_metadata

        try:
            weights["lineage"] = from_metadata(meta)
        except ValueError as e:
            raise WeightsError(f"weights file {path!r}: {e}. Fix: use the file as DP Explorer wrote it") from e
        if weights["lineage"] is None and meta.get("run_id"):
            weights["legacy_run"] = meta["run_id"]  # a run's weights from before lineage was recorded
    if resolved.tried:
        weights["tried"] = list(resolved.tried)
    if resolved.source != "none" and weights.get("skipped_keys"):
        # A new classifier on pretrained features starts at zero (De et al. 2022): uniform predictions,
        # not timm's init (EfficientNet's U(±1/√fan_out) head gives logits of ~10 on these features, a loss
        # of 3+ that DP noise then has to undo).
        with torch.no_grad():
            for p in model.get_classifier().parameters():
                p.zero_()
        weights["head_init"] = "zeros (a new classifier on pretrained features)"
    weights["norm"] = norm
    weights["batchnorm"] = batchnorm
    weights["preprocessing"] = {"mean": data_config["mean"], "std": data_config["std"]}
    if weight_standardization:
        weights["weight_standardized_convs"] = apply_weight_standardization(model)
    return CreatedModel(model=model, spec=spec, data_config=data_config, weights=weights)


def _file_keys(path: str) -> list[str]:
    return list(weight_sources._file_keys(Path(path).expanduser())[0])


SCOPES = ("full", "head", "bias", "last-k")


def backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order, for scope "last-k": ViT/BEiT ``blocks``, EfficientNet /
    MobileNet stages (``blocks``), ConvNeXt ``stages``, ResNet ``layer1..4``, VGG each conv of ``features`` then ``pre_logits``, tiny_cnn its
    conv blocks (``features``)."""
    if isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):  # BEiT: a ModuleList
        return list(model.blocks)
    if isinstance(getattr(model, "stages", None), nn.Sequential):
        return list(model.stages)
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [getattr(model, f"layer{i}") for i in range(1, 5)]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and hasattr(model, "pre_logits"):  # timm VGG
        return [m for m in features if isinstance(m, nn.Conv2d)] + [model.pre_logits]
    if isinstance(features, nn.Sequential):
        return list(features)
    raise ConfigError("scope", f"scope 'last-k' does not know the blocks of {type(model).__name__}",
                      "use scope full, bias or head for this backbone")


# top-level modules that run after the blocks (final norms, pooling heads, EfficientNet's 1x1 head conv);
# trained with them under last-k
_AFTER_BLOCKS = ("norm", "fc_norm", "norm_pre", "head", "attn_pool", "global_pool", "conv_head", "bn2")


def _last_k_params(model: nn.Module, k: int) -> set[int]:
    """ids of the parameters of the last k blocks, of the final norms / head after them, and of the
    classifier."""
    blocks = backbone_blocks(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(blocks):
        raise ConfigError("trainable_blocks", f"{type(model).__name__} has {len(blocks)} blocks, asked for {k!r}",
                          f"use --trainable-blocks between 1 and {len(blocks)}, or scope full")
    out = {id(p) for b in blocks[-k:] for p in b.parameters()}
    for name, child in model.named_children():
        if name in _AFTER_BLOCKS:
            out |= {id(p) for p in child.parameters()}
    return out


def set_trainable(model: nn.Module, scope: str, trainable_blocks: int = 1) -> dict:
    """Choose what is fine-tuned: ``"full"`` (everything), ``"head"`` (the classifier only),
    ``"bias"`` (BiTFiT: every bias term plus the classifier) or ``"last-k"`` (the last
    ``trainable_blocks`` blocks of the backbone, see ``backbone_blocks``, plus what follows them:
    final norm and classifier). Returns parameter counts ``{"trainable": n, "total": n}`` (numbers
    of scalars)."""
    if scope not in SCOPES:
        raise ConfigError("scope", f"unknown fine-tuning scope {scope!r}", "use one of: " + ", ".join(SCOPES))
    head_params = {id(p) for p in model.get_classifier().parameters()}
    last_k = _last_k_params(model, trainable_blocks) if scope == "last-k" else set()
    trainable = total = 0
    for name, p in model.named_parameters():
        on = (
            scope == "full"
            or id(p) in head_params
            or (scope == "bias" and name.rsplit(".", 1)[-1] == "bias")
            or id(p) in last_k
        )
        p.requires_grad_(on)
        total += p.numel()
        trainable += p.numel() if on else 0
    return {"trainable": trainable, "total": total}
