"""``create_model`` / ``set_trainable``: build a registered backbone, load its weights, make it DP-ready."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from torch import nn

from dpcore.errors import ConfigError, WeightsError

from .opacus_compat import make_opacus_compatible
from .registry import BackboneSpec, get_spec
from .tiny_cnn import TinyCNN

HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class CreatedModel:
    model: nn.Module  # already made Opacus-compatible
    spec: BackboneSpec
    data_config: dict  # input_size (3,H,W), mean, std, interpolation, crop_pct (+ crop_mode for timm)
    weights: dict = field(default_factory=dict)  # source, name, sha256, skipped_keys


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _create_timm_from_hub(spec: BackboneSpec, num_classes: int, kwargs: dict) -> nn.Module:
    import timm

    hub_log = logging.getLogger("huggingface_hub")
    old_level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        try:  # 1) cached already? no network needed
            with _hf_offline():
                return timm.create_model(spec.timm_name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception:
            pass
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


def _load_file(model: nn.Module, spec: BackboneSpec, path_str: str) -> dict:
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
        state = _adapt_state_dict(model, spec, state)
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


def _data_config(model: nn.Module, spec: BackboneSpec, size: int) -> dict:
    if spec.timm_name is None:
        cfg = model.pretrained_cfg
        return {"input_size": (3, size, size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"], "crop_mode": cfg["crop_mode"]}
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return {"input_size": (3, size, size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
            "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"],
            "crop_mode": cfg.get("crop_mode", "center")}


# ---------------------------------------------------------------------------------------------
# public API


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: Optional[str] = "none",
    image_size: Optional[int] = None,
) -> CreatedModel:
    """Build backbone ``name`` with a fresh ``num_classes`` head, load weights, make it Opacus-ready.

    ``pretrained``: ``"none"`` (random init), ``"hub"`` (timm's pretrained weights, cached or
    downloaded) or the path of a local ``.safetensors`` file with the backbone's (timm) state dict.
    ``image_size``: input side length; ViT/BEiT are built for it (position embeddings resampled),
    for CNNs it only sets ``data_config["input_size"]``.
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
    source = "none" if pretrained in (None, "", "none") else ("hub" if pretrained == "hub" else "file")

    if spec.timm_name is None:
        if source == "hub":
            raise WeightsError(f"{spec.name} has no pretrained weights on the Hub. "
                               "Fix: use pretrained='none' or a local .safetensors file")
        model = TinyCNN(num_classes=num_classes)
        weights: dict = {"source": "none", "name": None, "sha256": None, "skipped_keys": []}
    else:
        import timm

        kwargs: dict[str, Any] = {"img_size": size} if spec.is_transformer else {}
        if source == "hub":
            model = _create_timm_from_hub(spec, num_classes, kwargs)
            weights = {"source": "hub", "name": spec.timm_name, "sha256": None, "skipped_keys": []}
            if model.pretrained_cfg.get("num_classes") != num_classes:  # timm re-initialised the head
                head = _classifier_prefix(model)
                weights["skipped_keys"] = sorted(k for k in model.state_dict() if _is_head_key(k, head))
        else:
            model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
            weights = {"source": "none", "name": None, "sha256": None, "skipped_keys": []}
    if source == "file":
        weights = _load_file(model, spec, str(pretrained))

    data_config = _data_config(model, spec, size)
    model = make_opacus_compatible(model)
    return CreatedModel(model=model, spec=spec, data_config=data_config, weights=weights)


SCOPES = ("full", "head", "bias")


def set_trainable(model: nn.Module, scope: str) -> dict:
    """Choose what is fine-tuned: ``"full"`` (everything), ``"head"`` (the classifier only) or
    ``"bias"`` (BiTFiT: every bias term plus the classifier). Returns parameter counts
    ``{"trainable": n, "total": n}`` (numbers of scalars)."""
    if scope not in SCOPES:
        raise ConfigError("scope", f"unknown fine-tuning scope {scope!r}", "use one of: " + ", ".join(SCOPES))
    head_params = {id(p) for p in model.get_classifier().parameters()}
    trainable = total = 0
    for name, p in model.named_parameters():
        on = (
            scope == "full"
            or id(p) in head_params
            or (scope == "bias" and name.rsplit(".", 1)[-1] == "bias")
        )
        p.requires_grad_(on)
        total += p.numel()
        trainable += p.numel() if on else 0
    return {"trainable": trainable, "total": total}
