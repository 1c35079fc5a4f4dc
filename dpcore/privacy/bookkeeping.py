"""Book-keeping DP-SGD: per-example clipping without per-example gradients.

Why: Opacus' ``hooks`` mode materialises every example's gradient (batch × parameters; ~3 GB for
resnet18 at batch 64) and still lets autograd compute the ordinary weight gradients it then throws
away; ``ghost`` avoids the per-example tensors for Linear layers only and pays a second backward
pass. Profiling (bench/RESULTS.md) put 75% of the DP step there.

Book-keeping (Bu et al. 2023, "Differentially private optimization on large model at small cost")
keeps what one backward pass computes anyway, each layer's input ``a`` and output gradient ``g``:

* each example's gradient norm comes from (a, g) per layer: the "ghost norm" from Gram matrices
  (cost T²·(D+p) for T positions) where that is cheaper than the example's gradient (T·D·p), the
  gradient itself where not ("mixed ghost clipping", Bu et al. 2022);
* the clipped sum Σᵢ cᵢ·∇ᵢ, cᵢ = min(1, C/‖∇ᵢ‖), is then ONE ordinary weight-gradient op with the
  output gradients scaled per example by cᵢ: no second backward pass;
* the parameters do not require grad during the forward, so autograd computes input gradients
  only and never the (discarded) unclipped weight gradients.

Exactly Opacus' clipping (flat, ``C / (‖∇ᵢ‖ + 1e-6)`` capped at 1) and Opacus' optimizer adds the
noise, so the DP guarantee and the accounting are unchanged; ``tests/test_bookkeeping.py`` checks
the clipped sums against Opacus' hooks mode. Supported layers (exact types): Linear (on any
(n, ..., D) input: tokens, NHWC maps), Conv2d (any groups, zero padding), timm's Conv2dSame (TF
"same" padding), GroupNorm, LayerNorm, timm's LayerNorm2d, timm's GroupNormAct (an elementwise
activation after the norm), and (``dpcore.privacy.bookkeeping_rules``) the class token / position
embedding, layer scales and BEiT's relative position bias of ``models.opacus_compat``; so ViT,
BEiT, ConvNeXt, VGG, ResNet and EfficientNet-Lite / MobileNet (GroupNorm or folded BN) are covered.
A model with trainable parameters elsewhere is refused (the trainer then runs hooks and says so).

Rules, for one example with positions t (K augmented views: their positions together):

* Linear / conv: ∇W = Σ_t g_t a_tᵀ over the (unfolded) input patches a_t; its squared norm is
  either the ghost norm Σ_{t,t'} (a_t·a_t')(g_t·g_t') or ‖∇W‖² of the formed gradient, whichever
  costs fewer operations; ∇b = Σ_t g_t. A conv with groups G is G independent convs (one per
  group; the norms add). Depthwise (G = C_in, one input channel per group: D = k², p = 1) always
  forms the gradient, ONE grouped weight-gradient conv over the batch (groups = batch × C), as
  cheap as the non-private weight gradient. Pointwise (1×1, stride 1, ungrouped) is a Linear over
  the T positions: ∇W = G·Aᵀ by one batched matmul, or the ghost norm from AᵀA and GᵀG.
* Conv2dSame (timm): forward is ``conv2d(pad_same(x), W, b, padding=0)`` with an input-size
  dependent, possibly asymmetric zero pad; the recorded input is padded with timm's own
  ``pad_same`` and the layer is then a conv with zero padding 0 (the rule above).
* GroupNorm: ∇γ_c = Σ_hw x̂·g, ∇β_c = Σ_hw g (x̂ = normalised input, per example, no copy).
  GroupNormAct: y = act(z), z = GroupNorm(x); the hook sees ∂L/∂y, and ∂L/∂z = act'(z)·∂L/∂y
  (z recomputed from the recorded input, act' by autograd on that elementwise function); then
  the GroupNorm rule with ∂L/∂z.
* LayerNorm: as GroupNorm over the normalised trailing dimensions (one position per example, e.g.
  a pooled (n, D) feature: no sum). LayerNorm2d: the same on the NHWC view of its NCHW input.
* DPTokenPosEmbed, DPLayerScale / LayerScale, DPRelPosBias: see ``dpcore.privacy.bookkeeping_rules``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from dpcore.privacy import bookkeeping_rules as rules
from dpcore.errors import ConfigError

CLIP_EPS = 1e-6  # Opacus' flat clipping: C / (norm + 1e-6)
# F.unfold writes each unfolded number at about the cost of this many multiply-adds in a batched matmul (measured on
# a 2-core CPU, resnet18's layer2-4 shapes at batch 128: e.g. 512 channels at 2×2, unfold 4.7 ms vs pixels 0.9 ms)
UNFOLD_COST = 40


def _timm_types(*names: str, module: str = "norm") -> tuple[type, ...]:
    try:
        import importlib

        mod = importlib.import_module(f"timm.layers.{module}")
    except Exception:  # pragma: no cover - timm is a requirement, but keep this module importable
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


def _timm_pad_same():
    try:
        from timm.layers.padding import pad_same
    except Exception:  # pragma: no cover
        return None
    return pad_same


# Exact types only: a subclass may change the maths (timm's LayerNorm2d normalises over channels of
# an NCHW tensor, StdConv2d standardises its weight), and a wrong per-example norm breaks the guarantee.
LINEAR = (nn.Linear,)
CONV_SAME = _timm_types("Conv2dSame", module="conv2d_same")  # TF "same": dynamic, asymmetric zero pad
CONV = (nn.Conv2d,) + CONV_SAME
GROUPNORM = (nn.GroupNorm,) + _timm_types("GroupNorm")
GROUPNORM_ACT = _timm_types("GroupNormAct", module="norm_act")  # GroupNorm, then an elementwise activation
LAYERNORM = (nn.LayerNorm,) + _timm_types("LayerNorm")
LAYERNORM2D = _timm_types("LayerNorm2d")  # LayerNorm over the channels of an NCHW tensor (ConvNeXt)
SUPPORTED = LINEAR + CONV + GROUPNORM + GROUPNORM_ACT + LAYERNORM + LAYERNORM2D + rules.PER_EXAMPLE
# activations a GroupNormAct may apply: elementwise (y_j depends on z_j only), so ∂L/∂z = act'(z)·∂L/∂y
ELEMENTWISE_ACTS = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
                    nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish)
_pad_same = _timm_pad_same()


class UnsupportedModel(ConfigError):
    def __init__(self, problem: str):
        super().__init__("grad_sample_mode", problem,
                         "use grad_sample_mode hooks (Opacus per-example gradients) for this backbone")


def check_supported(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers book-keeping handles; raises UnsupportedModel for any other with trainable parameters."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModel(f"{name} is a BatchNorm layer: it mixes examples, so DP-SGD cannot clip "
                                   "one example's influence")
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(m) not in SUPPORTED:
            raise UnsupportedModel(f"{name or 'the model'} ({type(m).__name__}) has trainable parameters and "
                                   "book-keeping has no rule for it")
        if type(m) in CONV and (m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid"):
            raise UnsupportedModel(f"{name}: padding {m.padding!r} / mode {m.padding_mode!r} is not supported")
        if type(m) in CONV_SAME and (tuple(m.padding) != (0, 0) or _pad_same is None):
            raise UnsupportedModel(f"{name}: a Conv2dSame with static padding {m.padding!r} is not supported")
        if type(m) in GROUPNORM_ACT and (type(m.drop) is not nn.Identity or type(m.act) not in ELEMENTWISE_ACTS
                                         or getattr(m, "_fast_norm", False)):
            raise UnsupportedModel(f"{name}: GroupNormAct with drop {type(m.drop).__name__} / act "
                                   f"{type(m.act).__name__} / fast norm is not supported")
        if type(m) in LAYERNORM + LAYERNORM2D and getattr(m, "_fast_norm", False):
            raise UnsupportedModel(f"{name}: timm's fast (low-precision) norm is not supported")
        why = rules.problem(m) if type(m) in rules.PER_EXAMPLE else None
        if why:
            raise UnsupportedModel(f"{name} ({type(m).__name__}): {why}")
        layers.append((name, m))
    return layers


class BookKeepingModule(nn.Module):
    """Wraps a model; after ``backward_and_clip(loss)`` every trainable ``p.grad`` is Σᵢ cᵢ·∇ᵢ.

    ``_module`` is the wrapped model (as in Opacus' GradSampleModule), so saving code is shared.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float):
        super().__init__()
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self._layers = check_supported(module)
        if not self._layers:
            raise UnsupportedModel("the model has no trainable parameters")
        self._params = [p for _, m in self._layers for p in m.parameters(recurse=False) if p.requires_grad]
        self._records: dict[nn.Module, list] = {}
        self._handles = [m.register_forward_hook(self._capture) for _, m in self._layers]
        self.last_norms: torch.Tensor | None = None  # per-example gradient norms of the last batch
        # Augmentation multiplicity: the batch holds K views of each example, example-major (row
        # i·K + k is view k of example i). Their gradients are averaged before clipping, so each
        # example still contributes one clipped gradient (De et al. 2022).
        self.views_per_example = 1
        self.capturing = True  # off: the wrapped model computes ordinary gradients (patient-level DP's
        # oversized patients, accumulated over several physical batches: dpcore.training.trainer)

    # -- forward: record each layer's input, and its output gradient during backward -------------
    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self._module(*args, **kwargs)
        self._records = {}
        for p in self._params:
            p.requires_grad_(False)  # autograd then builds no weight-gradient work at all
        try:
            return self._module(*args, **kwargs)
        finally:
            for p in self._params:
                p.requires_grad_(True)

    def _capture(self, module: nn.Module, inputs, output):
        if not torch.is_grad_enabled() or not self.capturing:
            return None
        if module in self._records:
            raise RuntimeError(f"{type(module).__name__} ran twice in one forward pass; book-keeping needs "
                               "each layer once per step (use grad_sample_mode hooks)")
        entry = [inputs[0].detach(), None]
        if type(module) in GROUPNORM_ACT:  # its output y = act(z) gives act'(z) for ReLU / ReLU6
            entry += [output.detach(), output._version]
        self._records[module] = entry
        out = output if output.requires_grad else output.detach().requires_grad_()

        def keep(grad):
            if entry:  # emptied once clipped (clip_into_grads)
                entry[1] = grad
        out.register_hook(keep)
        return out if out is not output else None

    # -- after backward: per-example norms, then the clipped sums -------------------------------
    def backward_and_clip(self, loss: torch.Tensor, *, per_example_scale: float = 1.0) -> torch.Tensor:
        """``loss.backward()``, then set ``p.grad`` to the clipped sum over the batch.

        ``per_example_scale`` turns the captured output gradients into per-example loss gradients
        (the batch size when ``loss`` is a mean over the batch, 1 for a sum). Returns the norms.
        """
        loss.backward()
        return self.clip_into_grads(per_example_scale)

    @torch.no_grad()
    def clip_into_grads(self, per_example_scale: float = 1.0) -> torch.Tensor:
        records = self._records
        self._records = {}
        try:
            return self._clip_into_grads(records, per_example_scale)
        finally:
            # The output-gradient hooks' closures hold these entries for as long as the caller keeps the
            # batch's output or loss (a training loop: until the next forward has run). Emptying them frees
            # every layer's recorded input and output gradient now, not one forward later (lite0 at batch 128:
            # the next forward ran 3-5x slower, allocating beside them).
            for entry in records.values():
                entry.clear()

    def _clip_into_grads(self, records: dict, per_example_scale: float) -> torch.Tensor:
        K = int(self.views_per_example)
        rows = next((e[0].shape[0] for e in records.values()), 0)
        if rows % K:
            raise RuntimeError(f"{rows} rows are not whole groups of {K} views per example")
        n = rows // K
        # The captured g are s × the per-example loss gradients (mean over the K views), s = K / scale.
        # Everything below is linear in g (the squared norms quadratic), so instead of rescaling every
        # output gradient (a pass over all of them) the squared norms are scaled by 1/s² and the
        # clipping coefficients by 1/s.
        unit = per_example_scale / K
        parts = []  # (module, a, g)
        for _, m in self._layers:
            entry = records.get(m)
            if entry is None or entry[1] is None or n == 0:
                continue
            a, g = entry[0], entry[1]
            if type(m) in CONV_SAME:  # its forward pads the input (TF "same"), then convolves with padding 0
                a = _pad_same(a, m.weight.shape[-2:], m.stride, m.dilation)
            elif type(m) in GROUPNORM_ACT:  # the hook saw ∂L/∂act(z): back through the activation to ∂L/∂z
                g = _pre_activation_grad(m, a, g, *entry[2:])
            parts.append((m, a, g))
        sq = torch.zeros(n, dtype=parts[0][1].dtype if parts else torch.float32,
                         device=parts[0][1].device if parts else "cpu")
        cache = {}
        for m, a, g in parts:
            sq += _sq_norms(m, a, g, cache, K)
        norms = sq.sqrt() * abs(unit)
        coef = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        done = set()
        for m, a, g in parts:
            for p, grad in _clipped_sums(m, a, g, coef * unit, cache.get(m), K).items():
                p.grad = grad.to(p.dtype)
                done.add(p)
        for p in self._params:  # layers that saw no example (empty Poisson batch) get a zero sum
            if p not in done:
                p.grad = torch.zeros_like(p)
        self.last_norms = norms
        return norms

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# -- per layer type ---------------------------------------------------------------------------------

def _trainable(p) -> bool:
    return p is not None and p.requires_grad


def _ghost_is_cheaper(T: int, D: int, p: int) -> bool:
    """Ghost norm costs T²·(D+p) per example, the per-example gradient T·D·p (Bu et al. 2022)."""
    return T * (D + p) < D * p


def _linear_sq_norms(a: torch.Tensor, g: torch.Tensor):
    """‖Σ_t g_t a_tᵀ‖² per example for a (n, T, D), g (n, T, p); also the per-example gradients
    (n, p, D) when computing them was the cheaper way (they are reused for the clipped sum)."""
    n, T, D = a.shape
    p = g.shape[-1]
    if T == 1:
        return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2)), None
    if _ghost_is_cheaper(T, D, p):  # <Σ g a, Σ g a> = Σ_{t,t'} (a_t·a_t')(g_t·g_t')
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)), None
    per_example = torch.bmm(g.transpose(1, 2), a)  # (n, p, D)
    return _sq_sum(per_example), per_example


def _sq_sum(per_example: torch.Tensor) -> torch.Tensor:
    """Σ x² per example (row) in one pass, without a squared copy of the per-example gradients."""
    return torch.linalg.vector_norm(per_example.reshape(per_example.shape[0], -1), dim=1).square()


def _conv_padding(m: nn.Conv2d):
    """The zero padding of the conv on the (recorded) input; a Conv2dSame's input is padded first."""
    return (0, 0) if m.padding == "valid" or type(m) in CONV_SAME else tuple(m.padding)


def _is_pointwise(m: nn.Conv2d) -> bool:
    return (m.groups == 1 and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
            and _conv_padding(m) == (0, 0))


def _pre_activation_grad(m: nn.Module, a: torch.Tensor, g: torch.Tensor, y: torch.Tensor | None = None,
                         version: int | None = None) -> torch.Tensor:
    """∂L/∂z = act'(z)·∂L/∂y for y = act(z), z = group_norm(a).

    ReLU6 / ReLU: from the recorded output y, as autograd does (0 < y < 6 ⟺ 0 < z < 6; y > 0 ⟺ z > 0),
    one fused pass, if nothing changed y in place since. Otherwise z is recomputed from the recorded
    input and act' taken by autograd on the (elementwise) activation."""
    act = type(m.act)
    if act is nn.Identity:
        return g
    if y is not None and y._version == version and y.shape == g.shape:
        if act is nn.ReLU6:
            return torch.ops.aten.hardtanh_backward(g, y, 0.0, 6.0)
        if act is nn.ReLU:
            return torch.ops.aten.threshold_backward(g, y, 0.0)
    with torch.enable_grad():
        z = F.group_norm(a, m.num_groups, m.weight, m.bias, m.eps).detach().requires_grad_()
        (gz,) = torch.autograd.grad(m.act(z.clone()), z, g)
    return gz


def _pointwise_sq_norms(a: torch.Tensor, g: torch.Tensor, K: int = 1):
    """A 1×1 conv is a Linear over the T positions: ∇W = G Aᵀ for A (C_in, T), G (C_out, T) of an
    example. One batched matmul (2-6x faster than the grouped weight-gradient conv here), or the
    ghost norm from AᵀA and GᵀG (positions of all K views together)."""
    rows, c_in = a.shape[:2]
    c_out = g.shape[1]
    n = rows // K
    A, G = a.reshape(rows, c_in, -1), g.reshape(rows, c_out, -1)
    T = A.shape[-1]
    if _ghost_is_cheaper(K * T, c_in, c_out):
        if K > 1:
            A = A.reshape(n, K, c_in, T).transpose(1, 2).reshape(n, c_in, K * T)
            G = G.reshape(n, K, c_out, T).transpose(1, 2).reshape(n, c_out, K * T)
        return (torch.bmm(A.transpose(1, 2), A) * torch.bmm(G.transpose(1, 2), G)).sum((1, 2)), None
    per_example = torch.bmm(G, A.transpose(1, 2))  # (rows, C_out, C_in)
    if K > 1:
        per_example = per_example.reshape(n, K, c_out, c_in).sum(1)
    return _sq_sum(per_example), per_example.reshape(n, c_out, c_in, 1, 1)


def _conv_sq_norms(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, K: int = 1):
    """Per-example ‖∇W‖² of a conv layer, and the per-example gradients if they were computed.

    Ghost norm over unfolded patches where cheaper (deep layers: few positions, many channels);
    otherwise the per-example gradients themselves, in one grouped weight-gradient op over the
    whole batch (groups = batch × groups), which is ~3x faster here than unfold + bmm.
    """
    if _is_pointwise(m):
        return _pointwise_sq_norms(a, g, K)
    rows, c_in, h, w = a.shape
    n = rows // K
    G = m.groups
    kh, kw = m.kernel_size
    T = g.shape[2] * g.shape[3]
    Dg, pg = c_in // G * kh * kw, m.out_channels // G
    if _ghost_is_cheaper(K * T, Dg, pg):
        if K == 1:
            gram_a = _patch_gram(m, a)
            gg = g.reshape(n * G, pg, T)
        else:  # the K views' positions together: an example's gradient sums over all of them
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m), stride=m.stride)
            cols = cols.reshape(n, K, G, Dg, T).permute(0, 2, 3, 1, 4).reshape(n * G, Dg, K * T)
            gram_a = torch.bmm(cols.transpose(1, 2), cols)
            gg = g.reshape(n, K, G, pg, T).permute(0, 2, 3, 1, 4).reshape(n * G, pg, K * T)
        return (gram_a * torch.bmm(gg.transpose(1, 2), gg)).sum((1, 2)).reshape(n, G).sum(1), None
    per_example = torch.nn.grad.conv2d_weight(
        a.reshape(1, rows * c_in, h, w), (rows * m.out_channels, c_in // G, kh, kw),
        g.reshape(1, rows * m.out_channels, *g.shape[2:]), stride=m.stride, padding=_conv_padding(m),
        dilation=m.dilation, groups=rows * G).reshape(n, K, *m.weight.shape).sum(1)
    return _sq_sum(per_example), per_example


def _patch_gram(m: nn.Conv2d, a: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """(n·G, T, T) inner products between the input patches of every pair of output positions.

    Either from the unfolded patches (cost T²·D, plus writing the T·D unfolded numbers: ~UNFOLD_COST
    multiply-adds each on this CPU), or, when cheaper, from the Gram matrix of the padded input's pixels
    (cost P²·C_in, P padded positions) summed over the k² kernel offsets: a patch pair's product is the
    sum, over offsets δ, of the products of the pixels at t+δ, t'+δ.
    """
    n, c_in, h, w = a.shape
    G = m.groups
    kh, kw = m.kernel_size
    (sh, sw), (dh, dw) = m.stride, m.dilation
    ph, pw = _conv_padding(m)
    hp, wp = h + 2 * ph, w + 2 * pw
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    T, P, cg = oh * ow, hp * wp, c_in // G
    D = cg * kh * kw
    if method == "unfold" or method == "auto" and P * P * cg + kh * kw * T * T >= T * T * D + UNFOLD_COST * T * D:
        cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=(ph, pw), stride=m.stride)
        cols = cols.reshape(n * G, cg * kh * kw, T)
        return torch.bmm(cols.transpose(1, 2), cols)
    x = F.pad(a, (pw, pw, ph, ph)).reshape(n * G, cg, P)
    pix = torch.bmm(x.transpose(1, 2), x)  # (n·G, P, P)
    pix = pix.reshape(n * G, hp, wp, hp, wp)
    out = None
    for u in range(kh):  # offset δ = (u, v): the pixels at (i·s + u·d, j·s + v·d) for every (i, j)
        for v in range(kw):
            rs = slice(u * dh, u * dh + (oh - 1) * sh + 1, sh)
            cs = slice(v * dw, v * dw + (ow - 1) * sw + 1, sw)
            block = pix[:, rs, cs, rs, cs]
            out = block.clone() if out is None else out.add_(block)
    return out.reshape(n * G, T, T)


def _sq_norms(m: nn.Module, a: torch.Tensor, g: torch.Tensor, cache: dict, K: int = 1) -> torch.Tensor:
    n = a.shape[0] // K  # rows are example-major: reshaping (n·K, ...) to (n, K·...) groups the views
    out = torch.zeros(n, dtype=a.dtype, device=a.device)
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if type(m) in LINEAR:
        if _trainable(w):
            sq, per_example = _linear_sq_norms(a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1]))
            out += sq
            cache[m] = per_example
        if _trainable(b):
            out += g.reshape(n, -1, g.shape[-1]).sum(1).pow(2).sum(1)
    elif type(m) in CONV:
        if _trainable(w):
            sq, per_example = _conv_sq_norms(m, a, g, K)
            out += sq
            cache[m] = per_example
        if _trainable(b):
            out += g.sum((2, 3)).reshape(n, K, -1).sum(1).pow(2).sum(1)
    elif type(m) in rules.PER_EXAMPLE:  # class token, position embedding, layer scale, rel. pos. bias
        grads = rules.per_example_grads(m, a, g, n, K)
        cache[m] = grads
        for t in grads.values():
            out += t.reshape(n, -1).pow(2).sum(1)
    else:  # GroupNorm / LayerNorm: the per-example gradients are small, so they are computed
        gw, gb = (None if t is None else t.reshape(n, K, *t.shape[1:]).sum(1) for t in _norm_layer_grads(m, a, g))
        cache[m] = (gw, gb)
        for t in (gw, gb):
            if t is not None:
                out += t.reshape(n, -1).pow(2).sum(1)
    return out


def _norm_layer_grads(m: nn.Module, a: torch.Tensor, g: torch.Tensor):
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if type(m) in GROUPNORM or type(m) in GROUPNORM_ACT:  # GroupNormAct: g is ∂L/∂z already
        # Σ_hw x̂·g = (Σ_hw a·g − μ·Σ_hw g)/σ per channel: no normalised copy of the activation.
        n, c = a.shape[:2]
        G = m.num_groups
        flat_a, flat_g = a.reshape(n, c, -1), g.reshape(n, c, -1)
        count = flat_a.shape[-1] * (c // G)
        mean = flat_a.sum(-1).reshape(n, G, -1).sum(-1) / count  # per (example, group); sums are
        sumsq = torch.linalg.vector_norm(flat_a, dim=-1).square()  # one pass, no a² temporary (~5x faster)
        var = (sumsq.reshape(n, G, -1).sum(-1) / count - mean * mean).clamp_min(0)  # sums: ~4x faster
        rstd = (var + m.eps).rsqrt().repeat_interleave(c // G, dim=1)  # than var_mean here
        mean = mean.repeat_interleave(c // G, dim=1)
        sum_g = flat_g.sum(-1)
        # Σ_hw a·g as a batched matmul: no a·g temporary (4x faster here than (a * g).sum(-1))
        gw = (torch.einsum("ncx,ncx->nc", flat_a, flat_g) - mean * sum_g) * rstd if _trainable(w) else None
        return gw, (sum_g if _trainable(b) else None)
    if type(m) in LAYERNORM2D:  # its forward: NCHW -> NHWC, layer_norm over C, back to NCHW
        a, g = a.permute(0, 2, 3, 1), g.permute(0, 2, 3, 1)
    xhat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
    dims = tuple(range(1, a.dim() - len(m.normalized_shape)))
    if not dims:  # one position per example, e.g. a pooled (n, D) feature: sum(()) would sum everything
        return (xhat * g if _trainable(w) else None), (g if _trainable(b) else None)
    gw = (xhat * g).sum(dims) if _trainable(w) else None
    gb = g.sum(dims) if _trainable(b) else None
    return gw, gb


def _clipped_sums(m: nn.Module, a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, cached, K: int = 1):
    """{parameter: Σᵢ cᵢ ∇ᵢ} for one layer (rows: K views per example, example-major)."""
    rows = a.shape[0]
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    out = {}
    shape = (rows,) + (1,) * (g.dim() - 1)
    row_coef = coef.repeat_interleave(K) if K > 1 else coef
    if type(m) in LINEAR:
        gc = g * row_coef.reshape(shape)
        if _trainable(w):
            if cached is not None:
                out[w] = torch.einsum("n,npd->pd", coef, cached)
            else:
                out[w] = gc.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
        if _trainable(b):
            out[b] = gc.reshape(-1, g.shape[-1]).sum(0)
    elif type(m) in CONV:
        if _trainable(w):
            if cached is not None:
                out[w] = torch.einsum("n,n...->...", coef, cached)
            else:  # Σᵢ cᵢ ∇ᵢ is linear in each example's a and g: scale the smaller one
                ac, gc = (a * row_coef.reshape(shape), g) if a.numel() < g.numel() else (a, g * row_coef.reshape(shape))
                out[w] = torch.nn.grad.conv2d_weight(ac, w.shape, gc, stride=m.stride, padding=_conv_padding(m),
                                                     dilation=m.dilation, groups=m.groups)
        if _trainable(b):
            out[b] = row_coef @ g.sum((2, 3))
    elif type(m) in rules.PER_EXAMPLE:
        for p, t in cached.items():
            out[p] = torch.einsum("n,n...->...", coef, t)
    else:
        gw, gb = cached
        if gw is not None:
            out[w] = torch.einsum("n,n...->...", coef, gw)
        if gb is not None:
            out[b] = torch.einsum("n,n...->...", coef, gb)
    return out


class BookKeepingOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for already-clipped sums (noise σ·C, scaling, step hooks, virtual steps).

    Two changes, same results: the first physical batch's ``p.grad`` becomes the running sum without a
    copy (book-keeping assigns a fresh tensor to ``p.grad`` every batch, so nothing else holds it); and
    the noise is drawn in one call into one flat buffer and added in place (``add_noise``).
    """

    def accumulate(self):
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach()

    NOISE_CHUNK = 1 << 18  # coordinates per draw: 1 MB of float32, drawn and added while in cache

    def add_noise(self):
        """Gaussian noise of std σ·C on every coordinate of the clipped sum, from ``self.generator`` (the
        trainer's secret generator; torch's global one only where none was attached, as in Opacus).

        Opacus draws each parameter's noise into a fresh tensor after zero-filling another, then adds the two
        into a third: four passes over the model's size, three of them allocations (page faults on the CPU).
        Here the noise is drawn in chunks into one small buffer and added in place while still in cache: the
        same distribution, from the same generator. Opacus' secure mode (four draws per coordinate) stays
        Opacus'."""
        if self.secure_mode:
            return super().add_noise()
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        bufs: dict = {}
        for p in self.params:
            sg = p.summed_grad
            if std > 0:
                if not sg.is_contiguous():
                    sg.add_(torch.empty_like(sg).normal_(0.0, std, generator=self.generator))
                else:
                    buf = bufs.get((sg.device, sg.dtype))
                    if buf is None:
                        buf = bufs[(sg.device, sg.dtype)] = torch.empty(self.NOISE_CHUNK, device=sg.device,
                                                                        dtype=sg.dtype)
                    flat = sg.view(-1)
                    for start in range(0, flat.numel(), self.NOISE_CHUNK):
                        part = flat[start:start + self.NOISE_CHUNK]
                        part.add_(buf[:part.numel()].normal_(0.0, std, generator=self.generator))
            p.grad = sg.view_as(p)
            _mark_as_processed(sg)
        for buf in bufs.values():  # no copy of the noise outlives the step
            buf.zero_()


class BookKeepingLoss:
    """A criterion whose result's ``.backward()`` also clips (like Opacus' ghost-clipping criterion),
    so one training loop serves every mode: ``criterion(model(x), y).backward()``."""

    def __init__(self, module: BookKeepingModule, criterion: nn.Module):
        self.module, self.criterion = module, criterion
        if getattr(criterion, "reduction", "mean") not in ("mean", "sum"):
            raise ValueError("book-keeping needs a criterion with reduction 'mean' or 'sum'")

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> "BookKeepingLossValue":
        loss = self.criterion(output, target)
        n = output.shape[0]
        scale = float(n) if getattr(self.criterion, "reduction", "mean") == "mean" else 1.0
        return BookKeepingLossValue(loss, lambda: self.module.backward_and_clip(loss, per_example_scale=scale))


class BookKeepingLossValue:
    def __init__(self, loss: torch.Tensor, backward: Callable[[], torch.Tensor]):
        self.loss, self._backward = loss, backward

    def backward(self) -> torch.Tensor:
        return self._backward()

    def detach(self) -> torch.Tensor:
        return self.loss.detach()

    def item(self) -> float:
        return self.loss.item()

    def __float__(self) -> float:
        return float(self.loss)
