"""Opacus grad samplers for conv layers: timm's ``Conv2dSame``, and grouped / depthwise ``Conv2d``.

Importing this module registers them with Opacus (``register_grad_sampler``, for both the hooks and
the fast-gradient-clipping modules). ``dpcore.privacy.grad_modes`` imports it, so they are registered before
any model is privatised by the trainer or the benchmark. Every sampler here is exact (tested
against per-example autograd in float64, ``tests/test_grad_modes.py``).

* ``timm.layers.Conv2dSame`` (TF "same" padding: the stride-2 convs of EfficientNet-Lite and of
  the MobileNets with ``pad_type="same"``): a ``Conv2d`` subclass whose forward is
  ``conv2d(pad_same(x), W, b, padding=0)``, the zero pad depending on the input size and possibly
  asymmetric (one more row/column at the bottom/right). Opacus looks samplers up by exact type, so
  without one each such layer went to Opacus' functorch fallback (correct, slow). Its per-example
  gradient is that of a plain conv with padding 0 on the padded input: the activations are padded
  with timm's own ``pad_same``, then the ``Conv2d`` rule below is applied to a shallow copy of the
  layer re-classed as ``nn.Conv2d`` with padding (0, 0) (same parameter objects; Opacus' sampler
  needs a layer whose type *is* ``nn.Conv2d`` to unfold the input).
* ``nn.Conv2d`` with groups G > 1 (depthwise: G = C): Opacus' conv sampler unfolds the input to
  (n, C_in·k², T), multiplies with *all* output channels, (n, C_out, C_in·k²), then keeps the
  diagonal blocks: G times the work and memory of the result. For a depthwise conv that is
  n·C²·k² numbers (EfficientNet-Lite's 1152-channel 5×5 depthwise at batch 128: 17 GB, out of
  memory here). Instead, ∇W_i for every example i at once is ONE grouped weight-gradient conv over
  the batch (batch × G groups: example i's input channels against its own output gradients),
  n·|W| numbers, as cheap as the non-private weight gradient. Ungrouped convs (G = 1), string
  paddings and non-zero padding modes keep Opacus' own sampler.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn


def _grouped_conv_grad_sample(layer: nn.Conv2d, x: torch.Tensor,
                              backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a grouped conv: ∇W_i = Σ_t g_i,t ⊗ patch_i,t, per group, for all i at
    once as a conv with groups = n·G (input (1, n·C_in, H, W), "weight" the output gradients)."""
    n, c_in = x.shape[:2]
    ret: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        w = layer.weight
        gs = torch.nn.grad.conv2d_weight(
            x.reshape(1, n * c_in, *x.shape[2:]), (n * w.shape[0],) + tuple(w.shape[1:]),
            backprops.reshape(1, n * backprops.shape[1], *backprops.shape[2:]),
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=n * layer.groups)
        ret[w] = gs.reshape((n,) + tuple(w.shape))
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum((2, 3))
    return ret


@register_grad_sampler(nn.Conv2d)
def compute_conv2d_grad_sample(layer: nn.Conv2d, activations: List[torch.Tensor],
                               backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    x = activations[0]
    if (layer.groups == 1 or x.shape[0] == 0 or isinstance(layer.padding, str)
            or layer.padding_mode != "zeros" or type(layer) is not nn.Conv2d):
        return compute_conv_grad_sample(layer, activations, backprops)
    return _grouped_conv_grad_sample(layer, x.to(backprops.dtype), backprops)


def _as_plain_conv(layer: nn.Conv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` view of ``layer``: same parameter objects, padding (0, 0)."""
    proxy = copy.copy(layer)  # a new __dict__; _parameters (the same Parameter objects) shared
    proxy.__class__ = nn.Conv2d
    proxy.padding = (0, 0)
    return proxy


@register_grad_sampler(Conv2dSame)
def compute_conv2d_same_grad_sample(layer: Conv2dSame, activations: List[torch.Tensor],
                                    backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    x = activations[0]
    if x.shape[0]:
        x = pad_same(x, layer.weight.shape[-2:], layer.stride, layer.dilation)
    return compute_conv2d_grad_sample(_as_plain_conv(layer), [x], backprops)


__all__ = ["compute_conv2d_grad_sample", "compute_conv2d_same_grad_sample"]
