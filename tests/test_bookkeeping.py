"""Book-keeping clipping (dpcore.bookkeeping) against per-example autograd, in float64.

The DP guarantee rests on each example's contribution being clipped to C: these tests check the
per-example norms and the clipped sums for every layer rule and every code path (ghost norm from
unfolded patches or from pixel Gram matrices, per-example gradients from a grouped conv), then the
optimizer pieces (virtual steps, empty Poisson batches, frozen parameters) and refusals.
"""
import copy

import pytest
import torch
from torch import nn

from dpcore import bookkeeping as bk
from dpcore import grad_modes as gm
from dpcore.bookkeeping import BookKeepingModule, UnsupportedModel


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
