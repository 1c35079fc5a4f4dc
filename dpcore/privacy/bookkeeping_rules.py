"""Book-keeping rules for the small parameter modules of ViT / BEiT / ConvNeXt.

Why a module of their own: these layers (``models.opacus_compat``'s DPTokenPosEmbed, DPLayerScale,
DPRelPosBias, and timm's LayerScale) own parameters no larger than their output, so each
example's gradient is formed outright from the recorded input ``a`` and output gradient ``g``
(one pass over ``g``); the norm and the clipped sum Σᵢ cᵢ·∇ᵢ then come from those tensors.
``dpcore.privacy.bookkeeping`` dispatches here by exact type.

Derivations, per example (its K views' rows summed, as everywhere in book-keeping):

* DPTokenPosEmbed: y = cat(cls, x) + pos (the class token broadcast over the batch, the position
  embedding added to every example): ∂L/∂pos = g (N, D), ∂L/∂cls = g[0] (the class-token row).
* DPLayerScale / LayerScale: y = x ⊙ γ over the last dimension: ∂L/∂γ = Σ_t x_t ⊙ g_t over all
  leading positions (tokens, or H×W of ConvNeXt's NHWC MLP output).
* DPRelPosBias: y[h, i, j] = table[index[i, j], h], expanded over the batch: ∂L/∂table[r, h] =
  Σ_{(i, j): index[i, j] = r} g[h, i, j], a scatter-add of the (heads, N, N) output gradient.
"""
from __future__ import annotations

import torch
from torch import nn


def _compat_types(*names: str) -> tuple[type, ...]:
    try:
        from models import opacus_compat
    except Exception:  # pragma: no cover - models is part of the project; keep dpcore importable
        return ()
    return tuple(getattr(opacus_compat, n) for n in names if hasattr(opacus_compat, n))


def _timm_layer_scale() -> tuple[type, ...]:
    try:
        from timm.layers.layer_scale import LayerScale
    except Exception:  # pragma: no cover
        return ()
    return (LayerScale,)


TOKEN_POS = _compat_types("DPTokenPosEmbed")
LAYER_SCALE = _compat_types("DPLayerScale") + _timm_layer_scale()
REL_POS = _compat_types("DPRelPosBias")
PER_EXAMPLE = TOKEN_POS + LAYER_SCALE + REL_POS


def problem(m: nn.Module) -> str | None:
    """Why this module's rule does not apply as built (None: it does). Checked before training."""
    t = type(m)
    if t in TOKEN_POS:
        cls, pos = m.cls_token, m.pos_embed
        if cls is not None and (cls.dim() != 3 or tuple(cls.shape[:2]) != (1, 1)):
            return f"a class token of shape {tuple(cls.shape)} (expected (1, 1, D)) is not supported"
        if pos is not None and (pos.dim() != 3 or pos.shape[0] != 1):
            return f"a position embedding of shape {tuple(pos.shape)} (expected (1, N, D)) is not supported"
    elif t in LAYER_SCALE:
        if m.gamma.dim() != 1:
            return f"a layer scale of shape {tuple(m.gamma.shape)} (expected (D,)) is not supported"
        if getattr(m, "inplace", False):
            return "an in-place layer scale is not supported (it overwrites the recorded input)"
    elif t in REL_POS:
        table = m.relative_position_bias_table
        if table.dim() != 2:
            return f"a relative position bias table of shape {tuple(table.shape)} is not supported"
    return None


def _views_summed(t: torch.Tensor, n: int, K: int) -> torch.Tensor:
    return t.reshape(n, K, *t.shape[1:]).sum(1) if K > 1 else t


def per_example_grads(m: nn.Module, a: torch.Tensor, g: torch.Tensor, n: int, K: int = 1) -> dict:
    """{trainable parameter: (n, *parameter.shape) per-example gradients} for one layer."""
    out = {}
    t = type(m)
    if t in TOKEN_POS:
        gs = _views_summed(g, n, K)  # (n, N, D)
        if m.pos_embed is not None and m.pos_embed.requires_grad:
            if tuple(gs.shape[1:]) != tuple(m.pos_embed.shape[1:]):
                raise RuntimeError(f"position embedding {tuple(m.pos_embed.shape)} does not match the "
                                   f"output {tuple(g.shape)}")
            out[m.pos_embed] = gs.unsqueeze(1)
        if m.cls_token is not None and m.cls_token.requires_grad:
            out[m.cls_token] = gs[:, None, :1]
    elif t in LAYER_SCALE:
        if m.gamma.requires_grad:
            d = m.gamma.shape[0]
            out[m.gamma] = (a * g).reshape(n, -1, d).sum(1)
    elif t in REL_POS:
        table = m.relative_position_bias_table
        if table.requires_grad:
            gs = _views_summed(g, n, K)  # (n, heads, N, N)
            heads = gs.shape[1]
            src = gs.permute(0, 2, 3, 1).reshape(n, -1, heads)
            grads = torch.zeros((n,) + tuple(table.shape), dtype=g.dtype, device=g.device)
            grads.index_add_(1, m._index().reshape(-1), src)
            out[table] = grads
    return out
