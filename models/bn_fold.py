"""Fold every eval-mode BatchNorm of a pretrained network into the convolution before it.

Why: BatchNorm mixes the examples of a batch, so DP-SGD cannot use it as is; swapping it for GroupNorm
(what ``make_opacus_compatible`` does for random init) throws away what a pretrained BN network learned,
its running statistics. With those statistics frozen, a BN is a fixed per-channel affine map
``y = γ (x − μ) / √(σ² + ε) + β``; after a convolution it folds into that convolution:

    W' = W · s (per output channel),  b' = (b − μ) · s + β,  with s = γ / √(σ² + ε)

The folded network computes what the original computes in eval mode, mixes nothing across examples, and
keeps β as the convolution's (trainable) bias. timm's ``BatchNormAct2d`` (BN, then drop, then activation)
becomes its drop + activation. The TFLite MobileNets' BNs are already folded by TF (γ = 1, μ = 0,
σ² = 1 − ε): the same code turns them into plain conv biases.

Which convolution a BN belongs to is found by tracing a dummy forward pass with hooks (the BN's input
must be the very tensor a convolution returned, and nothing but that BN may use it), not by module names.
A BN that does not directly follow a convolution is refused with a clear error. ``fold_batchnorm`` can
also check the result numerically (eval mode, before vs after) and refuses a fold that changes outputs.

The folded architecture depends only on the network's structure, never on the weights' values, so
folding a random-init model gives the same module tree and state-dict keys (conv biases, no BN): a run's
saved weights load strictly into ``create_model(..., pretrained="none", norm="folded-bn")``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from dpcore.errors import WeightsError

try:  # timm's BN + drop + activation layer
    from timm.layers import BatchNormAct2d as _BatchNormAct2d
except ImportError:  # pragma: no cover
    _BatchNormAct2d = None

TRACE_SIZE = 64  # side of the dummy image traced (any size the network accepts will do)
VERIFY_RTOL = 1e-3  # a fold whose outputs move by more than this (relative to their size) is refused


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def has_batchnorm(model: nn.Module) -> bool:
    return bool(_batchnorms(model))


def _replacement(bn: nn.Module, name: str) -> nn.Module:
    """What a BN becomes once its affine map lives in the convolution: nothing, or its drop + activation."""
    if type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return nn.Identity()
    if _BatchNormAct2d is not None and isinstance(bn, _BatchNormAct2d) and type(bn).forward is _BatchNormAct2d.forward:
        drop, act = bn.drop, bn.act
        if isinstance(drop, nn.Identity):
            return act
        return nn.Sequential(drop, act)
    raise WeightsError(
        f"BatchNorm {name!r} is a {type(bn).__name__}, whose forward pass is unknown to BN folding. Fix: use "
        "norm='groupnorm' (GroupNorm instead of BatchNorm: fine for random init, it loses pretrained statistics)"
    )


@torch.no_grad()
def find_conv_bn_pairs(model: nn.Module, trace_size: int = TRACE_SIZE) -> list[tuple[str, str]]:
    """``(conv name, BN name)`` for every BatchNorm of ``model``, found by tracing one dummy forward pass
    in eval mode. Raises ``WeightsError`` naming every BN that does not directly follow a Conv2d, whose
    convolution's output is also used elsewhere, or that runs more than once."""
    bns = _batchnorms(model)
    if not bns:
        return []
    convs = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    produced: dict[int, str] = {}  # id(output tensor) -> conv name
    consumers: dict[int, list[str]] = defaultdict(list)  # id(tensor) -> modules that took it as input
    calls: dict[str, int] = defaultdict(int)  # BN name -> times run
    conv_calls: dict[str, int] = defaultdict(int)
    bn_input: dict[str, Optional[int]] = {}
    keep: list[torch.Tensor] = []  # holds every traced tensor, so no id() is reused during the trace
    hooks = []

    def conv_hook(module, args, out):
        name = convs[module]
        conv_calls[name] += 1
        produced[id(out)] = name
        keep.append(out)

    def make_pre_hook(name: str, is_bn: bool):
        def pre_hook(module, args):
            if is_bn:
                calls[name] += 1
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            keep.extend(tensors)
            for t in tensors:
                consumers[id(t)].append(name)
            if is_bn:
                bn_input[name] = id(tensors[0]) if len(tensors) == 1 else None
        return pre_hook

    bn_names = set(bns)
    for name, m in model.named_modules():
        if m in convs:
            hooks.append(m.register_forward_hook(conv_hook))
        # leaf modules consume tensors; Identity passes its input on unchanged, so it does not count
        if (name in bn_names or not any(True for _ in m.children())) and not isinstance(m, nn.Identity):
            hooks.append(m.register_forward_pre_hook(make_pre_hook(name, name in bn_names)))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, 3, trace_size, trace_size, dtype=p.dtype, device=p.device)
        model(x)
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"BN folding could not trace {type(model).__name__} on a {trace_size}px dummy image "
                           f"({type(e).__name__}: {e}). Fix: use norm='groupnorm'") from e
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    pairs, problems = [], []
    for name in bns:
        src = bn_input.get(name)
        conv = produced.get(src) if src is not None else None
        if name not in bn_input:
            problems.append(f"{name!r} (never ran)")
        elif calls[name] != 1:
            problems.append(f"{name!r} (runs {calls[name]} times per forward pass)")
        elif conv is None:
            problems.append(f"{name!r} (its input is not a convolution's output)")
        elif conv_calls[conv] != 1:
            problems.append(f"{name!r} (its convolution {conv} runs {conv_calls[conv]} times)")
        elif consumers[src] != [name]:
            others = [c for c in consumers[src] if c != name]
            problems.append(f"{name!r} (the output of {conv} is also used by {', '.join(others)})")
        elif bns[name].num_features != model.get_submodule(conv).out_channels:
            problems.append(f"{name!r} ({bns[name].num_features} features after {conv}'s "
                            f"{model.get_submodule(conv).out_channels} channels)")
        elif bns[name].running_mean is None or bns[name].running_var is None:
            problems.append(f"{name!r} (keeps no running statistics)")
        else:
            pairs.append((conv, name))
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise WeightsError(
            f"cannot fold the BatchNorm layers of {type(model).__name__} into convolutions: {shown}. Fix: use "
            "norm='groupnorm' (GroupNorm instead of BatchNorm: fine for random init, it loses what the pretrained "
            "statistics encode), or a backbone whose every BatchNorm directly follows a convolution"
        )
    return pairs


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.Module) -> None:
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    new_bias = (bias - mean) * scale + beta
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))


def _outputs(model: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(x).detach().double() for x in xs]


@torch.no_grad()
def fold_batchnorm(model: nn.Module, *, verify: bool = True, trace_size: int = TRACE_SIZE) -> dict:
    """Fold every BatchNorm of ``model`` into the convolution before it, in place (see the module docstring).

    ``verify``: compare eval-mode outputs on two random images before and after, and refuse (``WeightsError``)
    a fold that changes them by more than ``VERIFY_RTOL`` of their size (a convolution output also used by a
    functional op that hooks cannot see would do that). Returns ``{"folded": n, "max_abs_error": e,
    "max_rel_error": r}`` (errors None when not verified)."""
    pairs = find_conv_bn_pairs(model, trace_size)
    info: dict = {"folded": len(pairs), "max_abs_error": None, "max_rel_error": None}
    if not pairs:
        return info
    was_training = model.training
    model.eval()
    try:
        if verify:
            p = next(model.parameters())
            g = torch.Generator().manual_seed(0)
            xs = [torch.randn(2, 3, trace_size, trace_size, generator=g).to(device=p.device, dtype=p.dtype)
                  for _ in range(2)]
            before = _outputs(model, xs)
        for conv_name, bn_name in pairs:
            bn = model.get_submodule(bn_name)
            _fold_pair(model.get_submodule(conv_name), bn)
            _set_submodule(model, bn_name, _replacement(bn, bn_name))
        if verify:
            after = _outputs(model, xs)
            abs_err = max((a - b).abs().max().item() for a, b in zip(after, before))
            size = max(b.abs().max().item() for b in before)
            info["max_abs_error"], info["max_rel_error"] = abs_err, abs_err / max(size, 1e-12)
            if abs_err > VERIFY_RTOL * max(size, 1.0):
                raise WeightsError(
                    f"folding the BatchNorm layers of {type(model).__name__} changed its outputs by {abs_err:.3g} "
                    f"(outputs up to {size:.3g}): a convolution's output is used by more than its BatchNorm. "
                    "Fix: use norm='groupnorm'")
    finally:
        model.train(was_training)
    return info


__all__ = ["TRACE_SIZE", "find_conv_bn_pairs", "fold_batchnorm", "has_batchnorm"]
