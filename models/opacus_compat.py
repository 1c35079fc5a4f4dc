"""Make timm backbones (and ``tiny_cnn``) train under Opacus 1.6 with correct per-sample gradients.

``make_opacus_compatible(model)`` changes the model in place (and returns it). It is deterministic:
applying it to two models of the same architecture gives the same module tree and the same
``state_dict`` keys, so a run's model can be rebuilt with ``create_model(..., pretrained="none")``
and then ``load_state_dict`` of the saved (fixed) weights. It is idempotent. Pretrained weights must
be loaded *before* it is applied (``create_model`` does that).

What it does, for every model:

* BatchNorm -> GroupNorm(gcd(32, C), C). BatchNorm mixes the samples of a batch, which breaks
  per-sample gradients. ``opacus.validators.ModuleValidator.fix`` does the same replacement but
  initialises the new GroupNorm afresh; here the BatchNorm affine ``weight``/``bias`` are copied
  onto the GroupNorm (same parameter names, so the state-dict keys do not change). The running
  statistics are dropped. timm's ``BatchNormAct2d`` (BN + drop + activation, EfficientNet/MobileNet)
  becomes timm's ``GroupNormAct`` with the same drop and activation (it has no Opacus grad sampler, so
  Opacus differentiates it with its functorch fallback: correct, if slower). ``ModuleValidator.fix``
  is then run for anything else it knows about. This is for random init: a pretrained BN network
  loses what its statistics encode, so ``create_model`` first folds its BNs into the convolutions
  (``models.bn_fold``) and none are left here.
* every convolution gets a forward pre-hook that makes its input contiguous. Opacus 1.6's Conv2d
  grad sampler returns *wrong* per-sample gradients (no error) for a channels-last /
  permuted input, e.g. the output of timm's ``LayerNorm2d`` in ConvNeXt's downsample layers, or a
  channels-last batch from a data loader (found by comparing with per-example autograd).
* every ``inplace`` flag (ReLU, GELU wrappers, Dropout, ...) is set to False. Opacus wraps each
  hooked module's output in a ``BackwardHookFunction`` view; modifying it in place raises
  "Output 0 of BackwardHookFunction is a view and is being modified inplace".

What Opacus 1.6 does with raw ``nn.Parameter``s (found by reading ``GradSampleModule`` and testing):
a module that owns trainable parameters directly and has no registered grad sampler is *not*
recursed into: the whole sub-tree is handled by the functorch fallback (``vmap(grad(...))`` over a
re-run of that module's forward). It does not error and the per-sample gradients are correct, but:

* timm ``VisionTransformer`` owns ``cls_token`` and ``pos_embed`` directly, so the *root* module is
  the only hooked module and the whole network is re-run under vmap for every backward pass
  (slow, memory hungry, and no fast per-layer grad samplers are used at all);
* timm ``Beit`` owns ``cls_token`` too, and below it has buffers (``relative_position_index``,
  ``k_bias``); the functorch fallback refuses modules with buffers, so BEiT fails outright
  ("Model contains a trainable layer with buffers").

Per family fixes (the modules below all have hook-based grad samplers registered with Opacus):

* ViT (timm ``VisionTransformer``): ``cls_token``/``pos_embed`` move into a ``DPTokenPosEmbed``
  sub-module ``token_pos`` (keys ``token_pos.cls_token``, ``token_pos.pos_embed``); the model's
  class becomes ``DPVisionTransformer`` whose ``_pos_embed`` calls it. Per-sample gradient of the
  position embedding is the per-sample gradient of the block input; of the class token its first row.
* BEiT (timm ``Beit``): same for ``cls_token`` (class ``DPBeit``). In every block the layer-scale
  ``gamma_1``/``gamma_2`` become ``DPLayerScale`` modules ``ls1``/``ls2`` (key ``ls1.gamma``);
  in every attention the separate ``q_bias``/``v_bias`` (and the fixed all-zero ``k_bias`` buffer)
  become the ordinary bias of ``qkv`` (a plain ``nn.Linear``); the k-part of that bias gets an
  exactly-zero gradient, since adding the same value to all keys of a query does not change the
  softmax, so training it changes nothing. The relative position bias table moves into a
  ``DPRelPosBias`` module ``rel_pos`` (key ``rel_pos.relative_position_bias_table``) whose index is
  a non-persistent buffer on a parameter-free child, and whose grad sampler scatters the per-sample
  gradient of the (B, heads, N, N) bias back onto the table.
* ResNet (timm ``BasicBlock``/``Bottleneck``): the block's forward adds the shortcut in place
  (``x += shortcut``) onto the output of a hooked norm layer; an empty ``drop_path`` slot is filled
  with ``ResidualSafe`` (returns a copy) so the in-place add no longer touches the hooked view.
  No parameters or keys change.
* ConvNeXt: ``ConvNeXtBlock`` owns ``gamma`` (layer scale), which would send each whole block to
  the functorch fallback; it becomes a ``DPLayerScale`` module ``ls`` (key ``ls.gamma``, class
  ``DPConvNeXtBlock``).
* timm's ``LayerNorm``/``LayerNorm2d`` are subclasses of ``nn.LayerNorm``; Opacus looks grad
  samplers up by exact type, so they get the LayerNorm sampler registered here (otherwise each
  norm layer goes through functorch, which in ViT made a step ~8x slower than necessary).
* VGG and ``tiny_cnn``: Conv2d/Linear/GroupNorm only; nothing beyond the common steps.
* EfficientNet-Lite / MobileNets: timm's ``Conv2dSame`` (TF padding, computed in its forward) and
  grouped (depthwise) convolutions get exact, fast grad samplers from ``models.opacus_samplers``,
  imported here so that every Opacus-compatible model has them, whoever privatises it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from timm import layers as _timm_layers
from opacus.validators import ModuleValidator
from torch import nn

from . import opacus_samplers as _opacus_samplers  # noqa: F401  (Conv2dSame / grouped-conv grad samplers)

# ---------------------------------------------------------------------------------------------
# DP-friendly building blocks with hook-based grad samplers


class DPTokenPosEmbed(nn.Module):
    """Prepend a class token and add a position embedding to (B, L, D) tokens."""

    def __init__(self, cls_token: Optional[nn.Parameter], pos_embed: Optional[nn.Parameter]):
        super().__init__()
        self.cls_token = cls_token
        self.pos_embed = pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x


@register_grad_sampler(DPTokenPosEmbed)
def _token_pos_grad_sample(layer: DPTokenPosEmbed, activations: List[torch.Tensor], backprops: torch.Tensor):
    ret: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.pos_embed is not None and layer.pos_embed.requires_grad:
        ret[layer.pos_embed] = backprops.unsqueeze(1)  # (B, 1, N, D)
    if layer.cls_token is not None and layer.cls_token.requires_grad:
        ret[layer.cls_token] = backprops[:, :1].unsqueeze(1)  # (B, 1, 1, D)
    return ret


class DPLayerScale(nn.Module):
    """``x * gamma`` over the last dimension (layer scale)."""

    def __init__(self, gamma: nn.Parameter):
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


@register_grad_sampler(DPLayerScale)
def _layer_scale_grad_sample(layer: DPLayerScale, activations: List[torch.Tensor], backprops: torch.Tensor):
    if not layer.gamma.requires_grad:
        return {}
    prod = activations[0] * backprops
    return {layer.gamma: prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1)}


class DPRelPosBias(nn.Module):
    """BEiT relative position bias: ``table[index]`` as a (B, heads, N, N) attention bias.

    Takes the attention input only to know the batch size (Opacus needs a batched input/output).
    The constant index is a plain tensor attribute, not a buffer: Opacus refuses trainable modules
    with buffers, even in sub-modules. It follows the table's device lazily.
    """

    def __init__(self, table: nn.Parameter, index: torch.Tensor):
        super().__init__()
        self.relative_position_bias_table = table
        self.index = index.detach().clone()

    def _index(self) -> torch.Tensor:
        if self.index.device != self.relative_position_bias_table.device:
            self.index = self.index.to(self.relative_position_bias_table.device)
        return self.index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self._index()
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)
        return bias.unsqueeze(0).expand(x.shape[0], -1, -1, -1)


@register_grad_sampler(DPRelPosBias)
def _rel_pos_grad_sample(layer: DPRelPosBias, activations: List[torch.Tensor], backprops: torch.Tensor):
    table = layer.relative_position_bias_table
    if not table.requires_grad:
        return {}
    b, h = backprops.shape[0], backprops.shape[1]
    src = backprops.permute(0, 2, 3, 1).reshape(b, -1, h).to(table.dtype)
    gs = torch.zeros((b,) + tuple(table.shape), dtype=table.dtype, device=table.device)
    gs.index_add_(1, layer._index().reshape(-1), src)
    return {table: gs}


# timm's LayerNorm / LayerNorm2d subclass nn.LayerNorm; Opacus looks samplers up by exact type,
# so without these they would fall back to functorch.
register_grad_sampler(_timm_layers.LayerNorm)(compute_layer_norm_grad_sample)


@register_grad_sampler(_timm_layers.LayerNorm2d)
def _layer_norm_2d_grad_sample(layer: nn.LayerNorm, activations: List[torch.Tensor], backprops: torch.Tensor):
    return compute_layer_norm_grad_sample(
        layer, [activations[0].permute(0, 2, 3, 1)], backprops.permute(0, 2, 3, 1)
    )


class ResidualSafe(nn.Module):
    """Runs the wrapped drop-path (if any) and makes sure the result is a fresh tensor."""

    def __init__(self, inner: Optional[nn.Module] = None):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x) if self.inner is not None else x
        return y.clone() if y is x else y


# ---------------------------------------------------------------------------------------------
# model classes swapped in for the timm ones (subclasses: isinstance checks keep working)

from timm.models import beit as _beit  # noqa: E402
from timm.models import convnext as _convnext  # noqa: E402
from timm.models import resnet as _resnet  # noqa: E402
from timm.models import vision_transformer as _vit  # noqa: E402


class DPVisionTransformer(_vit.VisionTransformer):
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # NHWC output of a dynamic-size patch embed
            x = x.flatten(1, 2)
        return self.pos_drop(self.token_pos(x))


class DPBeit(_beit.Beit):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.token_pos(self.patch_embed(x)))
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=None)
        return self.norm(x)


class DPBeitBlock(_beit.Block):
    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class DPBeitAttention(_beit.Attention):
    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape
        head_dim = self.qkv.out_features // (3 * self.num_heads)  # explicit: an empty batch cannot infer -1
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # detached: the bias does not depend on x, and a full backward hook whose inputs need grad
        # fires only once the gradient reaches those inputs, i.e. never (found by testing)
        bias = self.rel_pos(x.detach()) if self.rel_pos is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )
        x = x.transpose(1, 2).reshape(b, n, self.num_heads * head_dim)
        return self.proj_drop(self.proj(x))


class DPConvNeXtBlock(_convnext.ConvNeXtBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.ls(self.mlp(self.norm(x)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            x = self.ls(self.mlp(self.norm(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.drop_path(x) + self.shortcut(shortcut)


# ---------------------------------------------------------------------------------------------
# the fixes


def _fix_convnext_block(block: _convnext.ConvNeXtBlock) -> None:
    if block.gamma is not None:
        gamma = block.gamma
        block.gamma = None
        block.ls = DPLayerScale(gamma)
    else:
        block.ls = nn.Identity()
    block.__class__ = DPConvNeXtBlock


def _replace_batchnorm(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            c = child.num_features
            if isinstance(child, _timm_layers.BatchNormAct2d):  # keep its drop + activation
                gn = _timm_layers.GroupNormAct(c, math.gcd(32, c), eps=child.eps, affine=child.affine, apply_act=False)
                gn.drop, gn.act = child.drop, child.act
            else:
                gn = nn.GroupNorm(math.gcd(32, c), c, eps=child.eps, affine=child.affine)
            if child.affine:
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
                gn.weight.requires_grad_(child.weight.requires_grad)
                gn.bias.requires_grad_(child.bias.requires_grad)
            gn.to(device=next(child.parameters(), torch.empty(0)).device)
            setattr(module, name, gn)
        else:
            _replace_batchnorm(child)


def _fix_vit(model: _vit.VisionTransformer) -> None:
    if model.reg_token is not None or model.no_embed_class or getattr(model, "dynamic_img_size", False):
        raise NotImplementedError(
            "register tokens, no_embed_class and dynamic_img_size ViTs are not supported by make_opacus_compatible"
        )
    model.token_pos = DPTokenPosEmbed(model.cls_token, model.pos_embed)
    model.cls_token = None
    model.pos_embed = None
    model.__class__ = DPVisionTransformer


def _fix_beit_attention(attn: _beit.Attention) -> None:
    if attn.q_bias is not None:
        bias = torch.cat((attn.q_bias.detach(), torch.zeros_like(attn.q_bias.detach()), attn.v_bias.detach()))
        requires = attn.q_bias.requires_grad
        attn.qkv.bias = nn.Parameter(bias, requires_grad=requires)
        attn.q_bias = None
        attn.v_bias = None
    if "k_bias" in attn._buffers:
        del attn._buffers["k_bias"]
        attn.k_bias = None
    if attn.relative_position_bias_table is not None:
        table, index = attn.relative_position_bias_table, attn.relative_position_index
        attn.relative_position_bias_table = None
        del attn._buffers["relative_position_index"]
        attn.relative_position_index = None
        attn.rel_pos = DPRelPosBias(table, index)
    else:
        attn.rel_pos = None
    attn.__class__ = DPBeitAttention


def _fix_beit_block(block: _beit.Block) -> None:
    if block.gamma_1 is not None:
        g1, g2 = block.gamma_1, block.gamma_2
        block.gamma_1 = None
        block.gamma_2 = None
        block.ls1, block.ls2 = DPLayerScale(g1), DPLayerScale(g2)
    else:
        block.ls1, block.ls2 = nn.Identity(), nn.Identity()
    block.__class__ = DPBeitBlock


def _fix_beit(model: _beit.Beit) -> None:
    if model.rel_pos_bias is not None:
        raise NotImplementedError("BEiT with a shared relative position bias is not supported by make_opacus_compatible")
    model.token_pos = DPTokenPosEmbed(model.cls_token, model.pos_embed)
    model.cls_token = None
    model.pos_embed = None
    model.__class__ = DPBeit


def _contiguous_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def make_opacus_compatible(model: nn.Module) -> nn.Module:
    """Fix ``model`` in place for Opacus DP-SGD (see the module docstring); returns it."""
    _replace_batchnorm(model)
    was_training = model.training
    model.train()  # validate() also complains about eval mode, which is not ours to fix
    if ModuleValidator.validate(model, strict=False):  # fix() deep-copies the model: only when needed
        model = ModuleValidator.fix(model)
    model.train(was_training)
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    for m in list(model.modules()):
        t = type(m)
        if isinstance(m, nn.modules.conv._ConvNd) and not getattr(m, "_dp_contiguous_inputs", False):
            m.register_forward_pre_hook(_contiguous_inputs)
            m._dp_contiguous_inputs = True
        if t is _vit.VisionTransformer:
            _fix_vit(m)
        elif t is _beit.Beit:
            _fix_beit(m)
        elif t is _beit.Block:
            _fix_beit_block(m)
        elif t is _beit.Attention:
            _fix_beit_attention(m)
        elif t is _convnext.ConvNeXtBlock:
            _fix_convnext_block(m)
        elif t in (_resnet.BasicBlock, _resnet.Bottleneck) and not isinstance(m.drop_path, ResidualSafe):
            m.drop_path = ResidualSafe(m.drop_path)
    return model
