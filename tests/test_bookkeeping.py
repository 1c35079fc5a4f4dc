"""Book-keeping clipping (dpcore.privacy.bookkeeping) against per-example autograd, in float64.

The DP guarantee rests on each example's contribution being clipped to C: these tests check the
per-example norms and the clipped sums for every layer rule and every code path (ghost norm from
unfolded patches or from pixel Gram matrices, per-example gradients from a grouped conv), then the
optimizer pieces (virtual steps, empty Poisson batches, frozen parameters) and refusals.
"""
import copy

import pytest
import torch
from torch import nn

from dpcore.privacy import bookkeeping as bk
from dpcore.privacy import grad_modes as gm
from dpcore.privacy.bookkeeping import BookKeepingModule, UnsupportedModel


class Zoo(nn.Module):
    """Every layer rule and conv variant: stride, dilation, groups, depthwise, valid padding,
    rectangular kernels, no-bias, GroupNorm, LayerNorm and Linear on (n, T, D) tokens."""

    def __init__(self, k=3):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.g1 = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 8, (3, 2), dilation=(2, 1), padding=(2, 1), groups=2, bias=False)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.c4 = nn.Conv2d(8, 12, 2, stride=(1, 2), padding="valid")
        self.ln = nn.LayerNorm(12)
        self.tok = nn.Linear(12, 10)  # on (n, T, 12) tokens
        self.head = nn.Linear(10, k)

    def forward(self, x):
        x = torch.tanh(self.g1(self.c1(x)))
        x = torch.tanh(self.c2(x))
        x = torch.tanh(self.c3(x))
        x = self.c4(x)  # (n, 12, h, w)
        t = self.ln(x.flatten(2).transpose(1, 2))  # (n, T, 12)
        t = torch.tanh(self.tok(t)).mean(1)
        return self.head(t)


def _data(n=6, size=11, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g, dtype=torch.float64) * 3,
            torch.randint(0, k, (n,), generator=g))


def _reference(model, x, y):
    """Per-example gradients (n, P) of the trainable parameters by plain autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows), params


def _bk_step(model, x, y, clip):
    module = BookKeepingModule(model, clip)
    norms = module.backward_and_clip(nn.functional.cross_entropy(module(x), y), per_example_scale=len(x))
    return norms, [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("path", ["auto", "ghost", "direct"])
def test_norms_and_clipped_sums_equal_per_example_autograd(monkeypatch, path):
    if path != "auto":  # force every layer onto one path, so each is checked on every conv variant
        monkeypatch.setattr(bk, "_ghost_is_cheaper", lambda T, D, p: path == "ghost")
    torch.manual_seed(0)
    model = Zoo().double()
    x, y = _data()
    ref, _ = _reference(model, x, y)
    clip = 1.05 * float(ref.norm(dim=1).median())  # some examples clipped, some not
    norms, grads = _bk_step(model, x, y, clip)
    torch.testing.assert_close(norms, ref.norm(dim=1), rtol=1e-10, atol=1e-12)
    coef = (clip / (ref.norm(dim=1) + 1e-6)).clamp(max=1)
    assert (coef < 1).any() and (coef == 1).any()
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), (ref * coef[:, None]).sum(0),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), dilation=2, padding=(1, 0)),
    dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, padding=2, stride=(2, 1)),
    dict(in_channels=4, out_channels=4, kernel_size=5, groups=4, padding=2),
])
def test_patch_gram_from_pixels_equals_unfolded_patches(conv):
    m = nn.Conv2d(**conv).double()
    a = torch.randn(3, 4, 9, 10, dtype=torch.float64)
    torch.testing.assert_close(bk._patch_gram(m, a, "pixels"), bk._patch_gram(m, a, "unfold"))


def test_one_example_contributes_at_most_C_whatever_its_loss():
    torch.manual_seed(1)
    model = Zoo().double()
    x, y = _data(n=4)
    clip = 0.01
    module = BookKeepingModule(model, clip)
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(module(x[i:i + 1]), y[i:i + 1]) * 1e4
        module.backward_and_clip(loss)
        total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert clip * (1 - 1e-4) <= total <= clip * (1 + 1e-6)


def test_frozen_parameters_get_no_gradient_and_do_not_count():
    torch.manual_seed(2)
    model = Zoo().double()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))  # BiTFiT-style bias-only fine-tuning
    x, y = _data()
    ref, params = _reference(model, x, y)
    norms, grads = _bk_step(model, x, y, clip=1e9)
    torch.testing.assert_close(norms, ref.norm(dim=1))
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), ref.sum(0))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _optimizer(model, clip, sigma=0.0, expected=8):
    module, opt, crit = gm.make_bookkeeping(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                            nn.CrossEntropyLoss(), noise_multiplier=sigma, clip_norm=clip,
                                            expected_batch_size=expected)
    return module, opt, crit


def test_virtual_steps_accumulate_to_the_full_batch_clipped_sum():
    torch.manual_seed(3)
    model = Zoo().double()
    x, y = _data(n=8)
    ref, _ = _reference(model, x, y)
    clip = float(ref.norm(dim=1).median())
    expected = (ref * (clip / (ref.norm(dim=1) + 1e-6)).clamp(max=1)[:, None]).sum(0) / 8
    module, opt, crit = _optimizer(copy.deepcopy(model), clip)
    before = [p.detach().clone() for p in module.parameters()]
    for part, last in ((slice(0, 3), False), (slice(3, 3), False), (slice(3, 8), True)):  # incl. an empty one
        opt.zero_grad(set_to_none=True)
        opt.signal_skip_step(do_skip=not last)
        crit(module(x[part]), y[part]).backward()
        opt.step()
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, module.parameters())])  # lr 1
    torch.testing.assert_close(update, expected, rtol=1e-10, atol=1e-12)


def test_empty_poisson_batch_gives_zero_gradient_then_noise_only():
    model = Zoo()
    module, opt, crit = _optimizer(model, clip=1.0, sigma=0.0)
    x, y = _data(n=0)
    opt.zero_grad(set_to_none=True)
    crit(module(x.float()), y).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert opt.pre_step()


def test_matches_opacus_hooks_on_a_registry_backbone():
    import models

    torch.manual_seed(0)
    base = models.create_model("resnet18", 4, pretrained="none", image_size=32).model
    x = torch.randn(6, 3, 32, 32)
    y = torch.randint(0, 4, (6,))
    err = gm.grad_rel_error(gm.clipped_summed_grad(base, x, y, "bk"), gm.clipped_summed_grad(base, x, y, "hooks"))
    assert err < 1e-4


def test_refuses_what_it_cannot_clip():
    with pytest.raises(UnsupportedModel, match="BatchNorm"):
        BookKeepingModule(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 1.0)

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.gamma

    with pytest.raises(UnsupportedModel, match="no rule"):
        BookKeepingModule(nn.Sequential(nn.Linear(3, 3), Scale()), 1.0)
    shared = nn.Linear(3, 3)
    module = BookKeepingModule(nn.Sequential(shared, nn.Tanh(), shared), 1.0)
    with pytest.raises(RuntimeError, match="twice"):
        module(torch.randn(2, 3))


def test_clipping_frees_the_recorded_activations_while_the_loss_is_still_held():
    """A training loop keeps the last loss / output until its next forward has run; the hooks on that output
    must not keep every layer's input and output gradient alive that long."""
    model = Zoo()
    module = BookKeepingModule(model, 1.0)
    x, y = _data()
    out = module(x.float())
    recorded = dict(module._records)
    loss = nn.functional.cross_entropy(out, y)
    module.backward_and_clip(loss, per_example_scale=len(x))
    assert recorded and all(entry == [] for entry in recorded.values())
    assert module._records == {} and all(p.grad is not None for p in model.parameters())


def test_eval_forward_records_nothing_and_keeps_parameters_trainable():
    model = Zoo()
    module = BookKeepingModule(model, 1.0)
    with torch.no_grad():
        module(_data()[0].float())
    assert module._records == {}
    module(_data()[0].float())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("path", ["auto", "ghost", "direct"])
def test_augmentation_multiplicity_averages_views_before_clipping(monkeypatch, path):
    """K views of an example (rows i·K + k) give ONE clipped gradient: that of the mean view loss."""
    if path != "auto":
        monkeypatch.setattr(bk, "_ghost_is_cheaper", lambda T, D, p: path == "ghost")
    torch.manual_seed(4)
    model = Zoo().double()
    n, K = 4, 3
    x, y = _data(n=n * K)
    y = y[:n].repeat_interleave(K)  # every view keeps its example's label
    params = list(model.parameters())
    ref = []
    for i in range(n):
        rows = slice(i * K, (i + 1) * K)
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[rows]), y[rows]), params)
        ref.append(torch.cat([g.flatten() for g in grads]))
    ref = torch.stack(ref)
    clip = 1.05 * float(ref.norm(dim=1).median())
    module = BookKeepingModule(model, clip)
    module.views_per_example = K
    norms = module.backward_and_clip(nn.functional.cross_entropy(module(x), y), per_example_scale=n * K)
    torch.testing.assert_close(norms, ref.norm(dim=1), rtol=1e-10, atol=1e-12)
    coef = (clip / (ref.norm(dim=1) + 1e-6)).clamp(max=1)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), (ref * coef[:, None]).sum(0),
                               rtol=1e-10, atol=1e-12)


# -- the EfficientNet-Lite / MobileNet layer types (timm Conv2dSame, depthwise, folded-BN biases) -----

import math  # noqa: E402

import timm  # noqa: E402
from timm.layers import Conv2dSame  # noqa: E402
from timm.layers.norm_act import BatchNormAct2d, GroupNormAct  # noqa: E402
from timm.layers.padding import pad_same_arg  # noqa: E402

import models  # noqa: E402


class MobileZoo(nn.Module):
    """The layer types of tf_efficientnet_lite0 / mobilenetv2_100 / mobilenetv1_100 (pad_type "same"):
    Conv2dSame stride 2 with an asymmetric pad (stem, and a depthwise k5), depthwise k3 with and
    without bias, pointwise 1×1 with and without bias (folded BatchNorm), GroupNormAct (ReLU6 in
    place, SiLU), ReLU6, Linear. Input 12×12: the stem pads (0, 1), the k5 depthwise (1, 2)."""

    size = 12

    def __init__(self, k=3):
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2, bias=True)  # 12 -> 6
        self.gn1 = GroupNormAct(8, 4, act_layer=nn.ReLU6, inplace=True)
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
        self.pw1 = nn.Conv2d(8, 16, 1, bias=True)
        self.dw2 = Conv2dSame(16, 16, 5, stride=2, groups=16, bias=False)  # 6 -> 3
        self.gn2 = GroupNormAct(16, 8, act_layer=nn.SiLU)
        self.pw2 = nn.Conv2d(16, 12, 1, bias=False)
        self.head = nn.Linear(12, k)

    def forward(self, x):
        x = self.gn1(self.stem(x))
        x = nn.functional.relu6(self.dw1(x))
        x = nn.functional.relu6(self.pw1(x))
        x = self.gn2(self.dw2(x))
        return self.head(self.pw2(x).mean((2, 3)))


def test_mobile_zoo_pads_asymmetrically():
    assert pad_same_arg([12, 12], [3, 3], [2, 2]) == [0, 1, 0, 1]
    assert pad_same_arg([6, 6], [5, 5], [2, 2]) == [1, 2, 1, 2]
    m = MobileZoo()
    assert m.stem(torch.randn(1, 3, 12, 12)).shape[-2:] == (6, 6)
    assert bk.check_supported(m) and all(type(mod) in bk.SUPPORTED for _, mod in bk.check_supported(m))


@pytest.mark.parametrize("path", ["auto", "ghost", "direct"])
def test_mobile_layer_rules_equal_per_example_autograd(monkeypatch, path):
    if path != "auto":
        monkeypatch.setattr(bk, "_ghost_is_cheaper", lambda T, D, p: path == "ghost")
    torch.manual_seed(5)
    model = MobileZoo().double()
    x, y = _data(size=MobileZoo.size)
    ref, _ = _reference(model, x, y)
    clip = 1.05 * float(ref.norm(dim=1).median())
    norms, grads = _bk_step(model, x, y, clip)
    torch.testing.assert_close(norms, ref.norm(dim=1), rtol=1e-10, atol=1e-12)
    coef = (clip / (ref.norm(dim=1) + 1e-6)).clamp(max=1)
    assert (coef < 1).any() and (coef == 1).any()
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), (ref * coef[:, None]).sum(0),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["auto", "ghost", "direct"])
def test_mobile_layer_rules_with_augmentation_multiplicity(monkeypatch, path):
    if path != "auto":
        monkeypatch.setattr(bk, "_ghost_is_cheaper", lambda T, D, p: path == "ghost")
    torch.manual_seed(6)
    model = MobileZoo().double()
    n, K = 3, 2
    x, y = _data(n=n * K, size=MobileZoo.size)
    y = y[:n].repeat_interleave(K)
    _check_views(model, x, y, n, K)


def test_refuses_mobile_layers_it_cannot_clip():
    odd = Conv2dSame(3, 4, 3, stride=2)
    odd.padding = (1, 1)  # not what Conv2dSame builds: refuse rather than guess
    with pytest.raises(UnsupportedModel, match="static padding"):
        BookKeepingModule(nn.Sequential(odd), 1.0)
    with pytest.raises(UnsupportedModel, match="GroupNormAct"):
        BookKeepingModule(nn.Sequential(nn.Conv2d(3, 4, 1), GroupNormAct(4, 2, drop_layer=nn.Dropout)), 1.0)
    with pytest.raises(UnsupportedModel, match="GroupNormAct"):
        BookKeepingModule(nn.Sequential(nn.Conv2d(3, 4, 1), GroupNormAct(4, 2, act_layer=nn.Softmax)), 1.0)
    with pytest.raises(UnsupportedModel, match="BatchNorm"):  # an unfolded, unconverted BatchNormAct2d
        BookKeepingModule(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4)), 1.0)


def _check_views(model, x, y, n, K, params=None):
    """Norms and clipped sums with K views per example (rows i·K + k) vs per-example autograd."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    ref = []
    for i in range(n):
        rows = slice(i * K, (i + 1) * K)
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[rows]), y[rows]), params)
        ref.append(torch.cat([g.flatten() for g in grads]))
    ref = torch.stack(ref)
    clip = 1.05 * float(ref.norm(dim=1).median())
    module = BookKeepingModule(model, clip)
    module.views_per_example = K
    norms = module.backward_and_clip(nn.functional.cross_entropy(module(x), y), per_example_scale=n * K)
    module.remove_hooks()
    torch.testing.assert_close(norms, ref.norm(dim=1), rtol=1e-10, atol=1e-12)
    coef = (clip / (ref.norm(dim=1) + 1e-6)).clamp(max=1)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), (ref * coef[:, None]).sum(0),
                               rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    return norms


TIMM_MOBILE = {"tf_efficientnet_lite0": {}, "mobilenetv2_100": {"pad_type": "same"},
               "mobilenetv1_100": {"pad_type": "same"}}


@pytest.fixture
def one_thread():
    """These float64 checks are many small ops: on a busy 2-core machine two OpenMP threads wait on each
    other (observed 1-2 s → 20-60 s per test); one thread keeps them at ~1-2 s."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def groupnorm_act(model: nn.Module) -> nn.Module:
    """Random init, BatchNormAct2d -> GroupNormAct(gcd(32, C)) keeping the activation."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d):
                c = child.num_features
                gn = GroupNormAct(c, math.gcd(32, c), eps=child.eps)
                gn.act = child.act
                setattr(parent, name, gn)
    return model


def timm_mobile(name: str, variant: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=3, **TIMM_MOBILE[name])
    assert any(type(x) is Conv2dSame for x in m.modules())
    if variant == "folded":
        from models.bn_fold import fold_batchnorm

        fold_batchnorm(m)
    elif variant == "groupnorm_act":
        groupnorm_act(m)
    m = models.make_opacus_compatible(m)
    return m.double().train()


# each model in each variant once: random init (BatchNorm -> GroupNorm by make_opacus_compatible, or
# -> GroupNormAct keeping the activation) and pretrained-like (BatchNorm folded into conv biases)
@pytest.mark.parametrize("name,variant", [("tf_efficientnet_lite0", "groupnorm"), ("mobilenetv2_100", "folded"),
                                          ("mobilenetv1_100", "groupnorm_act")])
def test_timm_mobile_models_full_fine_tuning(name, variant, one_thread):
    model = timm_mobile(name, variant)
    types = {type(m) for _, m in bk.check_supported(model)}
    assert Conv2dSame in types and nn.Linear in types
    if variant == "folded":
        assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    x, y = _data(n=4, size=32, k=3, seed=1)
    _check_views(model, x, y, 4, 1)


@pytest.mark.parametrize("name,variant", [("tf_efficientnet_lite0", "folded"), ("mobilenetv2_100", "groupnorm_act"),
                                          ("mobilenetv1_100", "groupnorm")])
def test_timm_mobile_models_last_k_with_augmult(name, variant, one_thread):
    model = timm_mobile(name, variant, seed=2)
    models.set_trainable(model, "last-k", 2)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and any(p.requires_grad for p in model.parameters())
    n, K = 3, 2
    x, y = _data(n=n * K, size=32, k=3, seed=2)
    _check_views(model, x, y[:n].repeat_interleave(K), n, K)


@pytest.mark.parametrize("name,variant", [("tf_efficientnet_lite0", "groupnorm_act"), ("mobilenetv2_100", "groupnorm"),
                                          ("mobilenetv1_100", "folded")])
def test_timm_mobile_models_bias_only_and_empty_batch(name, variant, one_thread):
    model = timm_mobile(name, variant, seed=3)
    models.set_trainable(model, "bias")  # BiTFiT: the (folded / norm) biases + the classifier
    x, y = _data(n=4, size=32, k=3, seed=3)
    _check_views(model, x, y, 4, 1)
    module, opt, crit = _optimizer(model, clip=1.0)
    opt.zero_grad(set_to_none=True)
    crit(module(x[:0]), y[:0]).backward()  # an empty Poisson batch
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.requires_grad)
    assert opt.pre_step()


def test_group_norm_act_mask_falls_back_when_its_output_changed_in_place(monkeypatch):
    """The ReLU6 mask is read from the recorded output; if a later op changed it in place, z is recomputed."""

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gn = GroupNormAct(4, 2, act_layer=nn.ReLU6, inplace=False)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            y = self.gn(self.conv(x))
            y = y.add_(2.5)  # in place on the recorded output: 0 < y < 6 no longer says 0 < z < 6
            return self.head(torch.tanh(y).mean((2, 3)))

    calls = []
    real = bk._pre_activation_grad
    monkeypatch.setattr(bk, "_pre_activation_grad", lambda *a: calls.append(a[3]._version != a[4]) or real(*a))
    torch.manual_seed(7)
    model = Shifted().double()
    x, y = _data(n=4, size=6)
    _check_views(model, x, y, 4, 1)
    assert calls == [True]


# -- ViT / BEiT / ConvNeXt: class token + position embedding, layer scale, relative position bias,
#    LayerNorm2d (models.opacus_compat's modules, dpcore.privacy.bookkeeping_rules) -------------------------

from dpcore.privacy import bookkeeping_rules as rules  # noqa: E402
from models import opacus_compat as oc  # noqa: E402

# the registry's architectures, narrowed (float64 per-example autograd of the real widths is GBs);
# the same timm classes, made Opacus-compatible as models.create_model does
TINY_TRANSFORMERS = {
    "vit": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=16, depth=2, num_heads=2, init_values=0.3)),
    "beit": ("beit_base_patch16_224", dict(patch_size=8, embed_dim=16, depth=2, num_heads=2, init_values=0.3,
                                           use_abs_pos_emb=True, use_rel_pos_bias=True)),
    "convnext": ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 24), ls_init_value=0.3)),
    "convnext_conv_mlp": ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 24), ls_init_value=0.3,
                                                conv_mlp=True)),
}


def tiny_transformer(kind: str, seed: int = 0) -> nn.Module:
    name, kwargs = TINY_TRANSFORMERS[kind]
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=3, img_size=32, **kwargs) if "convnext" not in kind \
        else timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    m = models.make_opacus_compatible(m)
    with torch.no_grad():  # random, non-trivial values for the parameters a fresh model sets to 0 / 1
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.double().train()


def _rule_types(model):
    return {type(m) for _, m in bk.check_supported(model)}


def test_tiny_transformers_use_every_new_rule():
    assert {oc.DPTokenPosEmbed, timm.layers.LayerScale, nn.Linear, nn.Conv2d} <= _rule_types(tiny_transformer("vit"))
    beit = tiny_transformer("beit")
    assert {oc.DPTokenPosEmbed, oc.DPLayerScale, oc.DPRelPosBias} <= _rule_types(beit)
    assert beit.token_pos.pos_embed is not None and beit.token_pos.cls_token is not None
    assert {timm.layers.LayerNorm2d, oc.DPLayerScale} <= _rule_types(tiny_transformer("convnext"))
    assert {timm.layers.LayerNorm2d, oc.DPLayerScale} <= _rule_types(tiny_transformer("convnext_conv_mlp"))


@pytest.mark.parametrize("kind", list(TINY_TRANSFORMERS))
def test_tiny_transformers_full_fine_tuning(kind, one_thread):
    model = tiny_transformer(kind)
    x, y = _data(n=4, size=32, k=3, seed=1)
    norms = _check_views(model, x, y, 4, 1)
    assert torch.isfinite(norms).all()


@pytest.mark.parametrize("path", ["ghost", "direct"])
def test_tiny_vit_token_linears_on_either_path(monkeypatch, path, one_thread):
    monkeypatch.setattr(bk, "_ghost_is_cheaper", lambda T, D, p: path == "ghost")
    model = tiny_transformer("vit", seed=4)
    x, y = _data(n=3, size=32, k=3, seed=4)
    _check_views(model, x, y, 3, 1)


@pytest.mark.parametrize("kind", ["vit", "beit", "convnext"])
def test_tiny_transformers_last_k_with_augmult(kind, one_thread):
    model = tiny_transformer(kind, seed=2)
    if kind == "beit":  # BEiT's blocks are a ModuleList, which models.backbone_blocks does not know yet
        last = {id(p) for part in (model.blocks[-1], model.fc_norm, model.head) for p in part.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in last)
    else:
        models.set_trainable(model, "last-k", 1)
    assert any(not p.requires_grad for p in model.parameters())
    n, K = 3, 2
    x, y = _data(n=n * K, size=32, k=3, seed=2)
    _check_views(model, x, y[:n].repeat_interleave(K), n, K)


@pytest.mark.parametrize("kind", ["vit", "beit", "convnext"])
def test_tiny_transformers_only_the_new_parameters_with_augmult(kind, one_thread):
    """Everything frozen but the class token / position embedding / layer scales / bias tables /
    LayerNorm2d: each rule alone decides the norm."""
    model = tiny_transformer(kind, seed=5)
    new = rules.PER_EXAMPLE + bk.LAYERNORM2D
    keep = {id(p) for m in model.modules() if type(m) in new for p in m.parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    assert keep
    n, K = 3, 2
    x, y = _data(n=n * K, size=32, k=3, seed=5)
    _check_views(model, x, y[:n].repeat_interleave(K), n, K)


def _bias_only_then_an_empty_batch(model) -> None:
    """Bias-only clipping against float64 autograd, then an empty Poisson batch of the whole model: noise only."""
    models.set_trainable(model, "bias")
    x, y = _data(n=4, size=32, k=3, seed=3)
    _check_views(model, x, y, 4, 1)
    models.set_trainable(model, "full")
    module, opt, crit = _optimizer(model, clip=1.0)
    opt.zero_grad(set_to_none=True)
    crit(module(x[:0]), y[:0]).backward()  # an empty Poisson batch
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert opt.pre_step()


@pytest.mark.parametrize("kind", ["vit", "beit", "convnext"])
def test_tiny_transformers_bias_only_and_empty_batch(kind, one_thread):
    model = tiny_transformer(kind, seed=3)
    _bias_only_then_an_empty_batch(model)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_tiny"])
def test_registry_transformers_match_opacus_hooks(name, one_thread):
    torch.manual_seed(0)
    base = models.create_model(name, 4, pretrained="none", image_size=32).model
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 4, (4,))
    err = gm.grad_rel_error(gm.clipped_summed_grad(base, x, y, "bk"), gm.clipped_summed_grad(base, x, y, "hooks"))
    assert err < 1e-4


@pytest.mark.parametrize("name,types", [
    ("beit_base_patch16_224.in22k_ft_in22k", {oc.DPTokenPosEmbed, oc.DPLayerScale, oc.DPRelPosBias,
                                              timm.layers.LayerNorm, nn.Linear, nn.Conv2d}),
    ("vgg11", {nn.Conv2d, nn.Linear}),
])
def test_big_registry_backbones_are_supported(name, types):
    """Too big for per-example autograd in a test; their layer types are checked above on narrow copies."""
    model = models.create_model(name, 4, pretrained="none", image_size=32).model
    assert _rule_types(model) == types


def test_refuses_transformer_layers_it_cannot_clip():
    ls = timm.layers.LayerScale(4, inplace=True)
    with pytest.raises(UnsupportedModel, match="in-place layer scale"):
        BookKeepingModule(nn.Sequential(nn.Linear(3, 4), ls), 1.0)
    odd = oc.DPTokenPosEmbed(nn.Parameter(torch.zeros(1, 2, 4)), None)
    with pytest.raises(UnsupportedModel, match="class token of shape"):
        BookKeepingModule(nn.Sequential(nn.Linear(3, 4), odd), 1.0)
    ln2d = timm.layers.LayerNorm2d(4)
    ln2d._fast_norm = True
    with pytest.raises(UnsupportedModel, match="fast"):
        BookKeepingModule(nn.Sequential(nn.Conv2d(3, 4, 1), ln2d), 1.0)
    with pytest.raises(UnsupportedModel, match="no rule"):  # a subclass is not its parent: exact types only
        BookKeepingModule(nn.Sequential(nn.Linear(3, 4), type("MyScale", (oc.DPLayerScale,), {})(
            nn.Parameter(torch.ones(4)))), 1.0)


# -- VGG (timm's VGG: Conv2d + ReLU + MaxPool features, the ConvMlp classifier — a 7×7 conv on an input
#    adaptive-pooled up to 7×7 at small image sizes, Dropout, a 1×1 conv — and ClassifierHead) ----------

from timm.models.vgg import VGG  # noqa: E402


def tiny_vgg(drop_rate: float = 0.0, seed: int = 0) -> nn.Module:
    """The registry's VGG classes, narrowed: three stages (8, 16, 16+16 channels), a 16-wide ConvMlp."""
    torch.manual_seed(seed)
    m = VGG([8, "M", 16, "M", 16, 16, "M"], num_classes=3, mlp_ratio=16 / 4096, drop_rate=drop_rate)
    m = models.make_opacus_compatible(m)
    return m.double().train()


def dropout_off(model: nn.Module) -> list:
    """Dropout in eval mode (identity), every other module left in train mode: a per-example reference that
    re-runs each example alone would otherwise draw other masks than the batch did."""
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m in drops:
        m.eval()
    return drops


def test_tiny_vgg_has_the_registry_layers():
    model = tiny_vgg(drop_rate=0.5)
    reg = models.create_model("vgg11", 3, pretrained="none", image_size=32).model
    kinds = lambda m: {type(x) for x in m.modules() if not list(x.children())}  # noqa: E731
    assert kinds(model) == kinds(reg) | {nn.Dropout}
    assert _rule_types(model) == {nn.Conv2d, nn.Linear}
    # at 32 px the last stage is 4×4 < 7: ConvMlp average-pools it up to 7×7 for its 7×7 conv (T = 1)
    assert model.forward_features(torch.zeros(1, 3, 32, 32, dtype=torch.float64)).shape[-1] == 4


@pytest.mark.parametrize("path", ["auto", "ghost", "direct"])
def test_tiny_vgg_full_fine_tuning(monkeypatch, path, one_thread):
    if path != "auto":
        monkeypatch.setattr(bk, "_ghost_is_cheaper", lambda T, D, p: path == "ghost")
    model = tiny_vgg(drop_rate=0.5, seed=1)
    assert len(dropout_off(model)) == 2
    x, y = _data(n=4, size=32, k=3, seed=1)
    _check_views(model, x, y, 4, 1)


def test_tiny_vgg_with_dropout_on_equals_per_example_autograd_with_the_same_masks(one_thread):
    """Dropout in train mode: book-keeping clips the gradient of the network the batch ran (its masks).
    The reference re-runs each example alone with the batch's own multiplier of each Dropout replayed."""
    model = tiny_vgg(drop_rate=0.5, seed=6)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    masks, row = {}, {}

    def hook(mod, inputs, out):
        a = inputs[0]
        if "i" not in row:  # the batch: keep the multiplier (0 or 1/(1-p)) it drew
            masks[mod] = torch.where(a != 0, out / a, torch.zeros_like(a)).detach()
            return None
        return a * masks[mod][row["i"]:row["i"] + 1]
    handles = [m.register_forward_hook(hook) for m in drops]
    n = 4
    x, y = _data(n=n, size=32, k=3, seed=6)
    module = BookKeepingModule(model, 1.0)
    loss = nn.functional.cross_entropy(module(x), y)
    assert all(((masks[m] == 0).any() and (masks[m] == 2).any()) for m in drops)  # p = 0.5 did drop units
    module.capturing = False  # the reference's forwards are not the step's
    params = [p for p in model.parameters() if p.requires_grad]
    ref = []
    for i in range(n):
        row["i"] = i
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        ref.append(torch.cat([g.flatten() for g in grads]))
    ref = torch.stack(ref)
    for h in handles:
        h.remove()
    module.capturing = True
    module.max_grad_norm = clip = 1.05 * float(ref.norm(dim=1).median())
    norms = module.backward_and_clip(loss, per_example_scale=n)
    torch.testing.assert_close(norms, ref.norm(dim=1), rtol=1e-10, atol=1e-12)
    coef = (clip / (ref.norm(dim=1) + 1e-6)).clamp(max=1)
    assert (coef < 1).any() and (coef == 1).any()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), (ref * coef[:, None]).sum(0),
                               rtol=1e-10, atol=1e-12)


def test_tiny_vgg_last_k_with_augmult(one_thread):
    model = tiny_vgg(drop_rate=0.5, seed=2)
    dropout_off(model)
    models.set_trainable(model, "last-k", 2)  # the last features conv (of models.backbone_blocks) + pre_logits
    assert any(not p.requires_grad for p in model.parameters())
    assert model.pre_logits.fc1.weight.requires_grad and not model.features[0].weight.requires_grad
    n, K = 3, 2
    x, y = _data(n=n * K, size=32, k=3, seed=2)
    _check_views(model, x, y[:n].repeat_interleave(K), n, K)


def test_tiny_vgg_bias_only_and_empty_batch(one_thread):
    model = tiny_vgg(drop_rate=0.5, seed=3)
    dropout_off(model)
    _bias_only_then_an_empty_batch(model)


def test_noise_has_std_sigma_c_and_comes_from_the_optimizers_generator_only():
    """BookKeepingOptimizer.add_noise: N(0, (σC)²) on every coordinate (Opacus' scaling after), all of it from
    ``optimizer.generator`` (the trainer's secret one: the same seed, the same noise; another, another) and none
    from torch's global generator."""
    sigma, clip = 1.7, 0.3

    def noise_of(seed, chunk=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(200, 50), nn.Tanh(), nn.Linear(50, 20))  # 11,070 coordinates
        module, opt, crit = _optimizer(model, clip=clip, sigma=sigma, expected=20)
        if chunk:
            opt.NOISE_CHUNK = chunk  # several draws per parameter
        opt.generator = torch.Generator().manual_seed(seed)
        x, y = torch.zeros(20, 200), torch.zeros(20, dtype=torch.long)
        opt.zero_grad(set_to_none=True)
        crit(module(x) * 0.0, y).backward()  # zero gradient: what reaches the optimizer is the noise alone
        before = torch.get_rng_state()
        assert opt.pre_step()
        assert torch.equal(torch.get_rng_state(), before)
        with pytest.raises(ValueError):  # Opacus' guard against noising the same sum twice still holds
            opt.add_noise()
        return torch.cat([p.grad.flatten() for p in model.parameters()]) * opt.expected_batch_size

    a, b, c = noise_of(1234), noise_of(1234), noise_of(99, chunk=1000)
    assert torch.equal(a, b) and not torch.isclose(a, c).any()
    for noise in (a, c):
        assert abs(noise.mean().item()) < 4 * sigma * clip / noise.numel() ** 0.5
        assert noise.std().item() == pytest.approx(sigma * clip, rel=0.03)
