"""Which Opacus ``grad_sample_mode`` to use for a backbone, chosen from a *measured* table.

Opacus 1.6 offers several ways to get the per-example gradient (norms) DP-SGD clips:

* ``"hooks"``      per-layer grad samplers on forward/backward hooks (the default; always works for
                   ``models.create_model`` backbones, including the custom samplers that
                   ``models/opacus_compat.py`` registers);
* ``"functorch"``  ``vmap(grad(...))`` over every trainable leaf module;
* ``"ew"``         torch's ExpandedWeights (Linear/Conv/GroupNorm/LayerNorm/Embedding only: our
                   custom modules such as ``DPTokenPosEmbed`` make it fail);
* ``"ghost"``      fast gradient / ghost clipping: per-example *norms* only, then a second backward
                   pass with the loss re-weighted by the clipping coefficients. It needs the wrapped
                   criterion ``make_private`` returns (see ``uses_wrapped_criterion``).
* ``"bk"``         book-keeping (``dpcore.privacy.bookkeeping``): norms from each layer's activations and
                   output gradients, the clipped sum in one weight-gradient op, no second backward;
                   Opacus' optimizer adds the noise. Also a wrapped criterion.

``python -m bench.step_ratio --write-table`` times all of them (DP step vs non-private step) and
writes ``bench/grad_modes.json``: per device (``"cpu"``/``"cuda"``) and per backbone name (and per
family, as a fallback for backbones that were not measured) the fastest mode whose clipped, summed
gradient equals the ``"hooks"`` one on the same batch (noise 0). ``choose_grad_sample_mode`` reads
that table; without one (or for an unmeasured backbone/device) it answers ``"hooks"``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

import models.opacus_samplers  # noqa: F401  (registers Opacus grad samplers for timm's Conv2dSame, ...)

MODES = ("hooks", "functorch", "ew", "ghost", "bk")
DEFAULT_MODE = "hooks"
TABLE_PATH = Path(__file__).resolve().parents[2] / "bench" / "grad_modes.json"
TABLE_ENV = "DP_GRAD_MODES_TABLE"  # override the table's path (tests, other machines)
REL_TOL = 1e-4  # relative L2 error of the clipped summed gradient vs hooks (float32 on CPU)
REL_TOL_CUDA = 5e-3  # CUDA: convolutions / matmuls may use TF32 (10-bit mantissa)


def rel_tol(device) -> float:
    """Tolerance for ``grad_rel_error`` on ``device``; a wrong per-sample gradient gives O(1)."""
    return REL_TOL_CUDA if device_kind(device) == "cuda" else REL_TOL


def device_kind(device) -> str:
    """``"cuda"`` for any CUDA device (``"cuda"``, ``"cuda:1"``, ``torch.device``), else ``"cpu"``."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def uses_wrapped_criterion(mode: str) -> bool:
    """Ghost modes return ``(module, optimizer, criterion, loader)`` from ``make_private``; the
    training loop must compute the loss with that criterion (its ``.backward()`` runs both passes)."""
    return "ghost" in mode or mode == "bk"


def table_path() -> Path:
    return Path(os.environ.get(TABLE_ENV) or TABLE_PATH)


def load_table(path: Optional[os.PathLike] = None) -> dict:
    """The measured table, or ``{}`` when there is none / it cannot be read."""
    p = Path(path) if path is not None else table_path()
    try:
        with open(p, encoding="utf-8") as f:
            table = json.load(f)
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}


def _family(backbone: str) -> Optional[str]:
    try:
        from models.registry import get_spec

        return get_spec(backbone).family
    except Exception:
        return None


def choose_grad_sample_mode(backbone: str, device="cpu", *, allowed: Iterable[str] = MODES,
                            table: Optional[dict] = None) -> str:
    """The fastest correct grad_sample_mode measured for ``backbone`` on ``device``.

    Looks up ``table["devices"][device_kind(device)]["models"][backbone]``, then the backbone's
    family in ``...["families"]``; falls back to ``"hooks"`` when the table, the device or the
    backbone is missing, or when the measured mode is not in ``allowed`` (e.g. pass
    ``allowed=("hooks", "functorch", "ew")`` from a loop that cannot use the ghost criterion).
    """
    allowed = tuple(allowed)
    table = load_table() if table is None else table
    dev = (table.get("devices") or {}).get(device_kind(device)) or {}
    candidates = []
    entry = (dev.get("models") or {}).get(backbone)
    if entry is None:
        fam = _family(backbone)
        entry = (dev.get("families") or {}).get(fam) if fam else None
    if isinstance(entry, dict):
        # "ranked": eligible modes, fastest first; "mode": the fastest
        candidates = list(entry.get("ranked") or []) or [entry.get("mode")]
    for mode in candidates:
        if mode in allowed and mode in MODES:
            return mode
    return DEFAULT_MODE


# ---------------------------------------------------------------------------------------------
# building a DP step for a mode (shared by the benchmark and the tests)


def make_private(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, *, noise_multiplier: float,
                 clip_norm: float, lr: float = 0.01, criterion: Optional[nn.Module] = None):
    """Wrap ``model`` (in place: pass a copy) for DP-SGD with ``mode`` over the fixed batch (x, y).

    No Poisson sampling (the batch is fixed), ``loss_reduction="mean"``, expected batch size len(x).
    Returns ``(module, optimizer, criterion)``; ``criterion`` is Opacus' wrapper for ghost modes.
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    criterion = criterion or nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    if mode == "bk":
        return make_bookkeeping(model, optimizer, criterion, noise_multiplier=noise_multiplier,
                                clip_norm=clip_norm, expected_batch_size=len(x))
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    engine = PrivacyEngine(accountant="rdp")
    out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                              noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                              poisson_sampling=False, grad_sample_mode=mode)
    if uses_wrapped_criterion(mode):
        module, optimizer, criterion, _ = out
    else:
        module, optimizer, _ = out
    return module, optimizer, criterion


def make_bookkeeping(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, *,
                     noise_multiplier: float, clip_norm: float, expected_batch_size: int):
    """``(module, optimizer, criterion)`` for book-keeping: our clipping, Opacus' noise and scaling.

    Opacus' ``DPOptimizerFastGradientClipping`` expects ``p.grad`` to hold the clipped sum already
    (as after ghost clipping's second pass); book-keeping puts it there in one pass.
    """
    from dpcore.privacy.bookkeeping import BookKeepingLoss, BookKeepingModule, BookKeepingOptimizer

    module = BookKeepingModule(model, clip_norm)
    dp_optimizer = BookKeepingOptimizer(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
        expected_batch_size=expected_batch_size, loss_reduction="mean")
    return module, dp_optimizer, BookKeepingLoss(module, criterion)


def clipped_summed_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, *,
                        clip_norm: float = 0.05) -> dict:
    """``{name: grad}`` of one DP step with noise 0 (the clipped per-example gradients, summed and
    divided by the batch size) for a deep copy of ``model``. Also ``"__grad_sample__"``: names of the
    parameters that were given a per-example gradient (frozen ones must not be)."""
    m = copy.deepcopy(model)
    m.train()
    names = {id(p): n for n, p in m.named_parameters()}
    module, optimizer, criterion = make_private(m, x, y, mode, noise_multiplier=0.0, clip_norm=clip_norm)
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(module(x), y)
    loss.backward()
    sampled = sorted(names[id(p)] for p in m.parameters()
                     if getattr(p, "grad_sample", None) is not None or getattr(p, "_norm_sample", None) is not None)
    optimizer.pre_step()  # clip + accumulate + noise (0) + scale; no parameter update
    out = {names[id(p)]: p.grad.detach().clone() for p in m.parameters() if p.requires_grad}
    out["__grad_sample__"] = sampled
    if hasattr(module, "_close"):
        module._close()
    return out


def grad_rel_error(a: dict, b: dict) -> float:
    """Relative L2 distance between two ``clipped_summed_grad`` results (inf if the keys differ)."""
    keys = sorted(k for k in a if not k.startswith("__"))
    if keys != sorted(k for k in b if not k.startswith("__")):
        return float("inf")
    va = torch.cat([a[k].flatten().double() for k in keys])
    vb = torch.cat([b[k].flatten().double() for k in keys])
    return float((va - vb).norm() / vb.norm().clamp_min(1e-30))
