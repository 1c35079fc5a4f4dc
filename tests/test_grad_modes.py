"""dpcore.privacy.grad_modes: every mode the table may pick clips the same gradient as hooks; the chooser."""

import json
import warnings

import pytest
import torch

import models
from dpcore.privacy import grad_modes as gm


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _batch(size, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("backbone,supported", [
    ("tiny_cnn", ("functorch", "ew", "ghost", "bk")),
    ("vit_tiny_patch16_224", ("functorch", "ghost")),  # ew cannot handle DPTokenPosEmbed's expand
])
def test_modes_clip_the_same_gradient_as_hooks(backbone, supported):
    torch.manual_seed(0)
    model = models.create_model(backbone, 10, pretrained="none", image_size=32).model
    x, y = _batch(32)
    ref = gm.clipped_summed_grad(model, x, y, "hooks", clip_norm=0.05)
    assert ref["__grad_sample__"], "hooks gave no per-sample gradients"
    assert any(v.abs().sum() > 0 for k, v in ref.items() if not k.startswith("__"))
    for mode in supported:
        g = gm.clipped_summed_grad(model, x, y, mode, clip_norm=0.05)
        assert gm.grad_rel_error(g, ref) < gm.REL_TOL, mode
    # the clipping is active: without clipping the gradient differs
    unclipped = gm.clipped_summed_grad(model, x, y, "hooks", clip_norm=1e6)
    assert gm.grad_rel_error(unclipped, ref) > 1e-2


def test_frozen_parameters_get_no_per_sample_gradients():
    torch.manual_seed(0)
    model = models.create_model("tiny_cnn", 10, pretrained="none").model
    models.set_trainable(model, "head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    x, y = _batch(32)
    for mode in ("hooks", "ghost", "bk"):
        g = gm.clipped_summed_grad(model, x, y, mode)
        assert set(g["__grad_sample__"]) <= trainable, mode
        assert set(k for k in g if not k.startswith("__")) == trainable


def _table():
    return {"devices": {
        "cpu": {"models": {"vit_tiny_patch16_224": {"mode": "ghost", "ranked": ["ghost", "hooks"]},
                           "tiny_cnn": {"mode": "ew", "ranked": ["ew", "hooks"]}},
                "families": {"vit": {"mode": "ghost", "ranked": ["ghost", "hooks"]}}},
        "cuda": {"models": {"tiny_cnn": {"mode": "hooks", "ranked": ["hooks"]}}, "families": {}},
    }}


def test_choose_reads_the_table():
    t = _table()
    assert gm.choose_grad_sample_mode("tiny_cnn", "cpu", table=t) == "ew"
    assert gm.choose_grad_sample_mode("tiny_cnn", "cuda:0", table=t) == "hooks"
    assert gm.choose_grad_sample_mode("vit_tiny_patch16_224", torch.device("cpu"), table=t) == "ghost"
    # an unmeasured model of a measured family, and one of an unmeasured family
    assert gm.choose_grad_sample_mode("vit_small_patch16_224", "cpu", table=t) == "ghost"
    assert gm.choose_grad_sample_mode("resnet50", "cpu", table=t) == "hooks"
    assert gm.choose_grad_sample_mode("vit_small_patch16_224", "cuda", table=t) == "hooks"
    # a loop that cannot use the wrapped criterion gets the next eligible mode
    assert gm.choose_grad_sample_mode("vit_tiny_patch16_224", "cpu", table=t,
                                      allowed=("hooks", "functorch", "ew")) == "hooks"


def test_choose_falls_back_to_hooks_without_a_table(tmp_path, monkeypatch):
    monkeypatch.setenv(gm.TABLE_ENV, str(tmp_path / "missing.json"))
    assert gm.load_table() == {}
    assert gm.choose_grad_sample_mode("vit_tiny_patch16_224", "cpu") == "hooks"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(gm.TABLE_ENV, str(bad))
    assert gm.choose_grad_sample_mode("tiny_cnn", "cpu") == "hooks"
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_table()))
    monkeypatch.setenv(gm.TABLE_ENV, str(good))
    assert gm.choose_grad_sample_mode("tiny_cnn", "cpu") == "ew"


def test_committed_table_only_names_known_modes():
    table = gm.load_table(gm.TABLE_PATH)
    for dev in (table.get("devices") or {}).values():
        for group in ("models", "families"):
            for entry in (dev.get(group) or {}).values():
                assert entry["mode"] in gm.MODES
                assert set(entry["ranked"]) <= set(gm.MODES)


def test_uses_wrapped_criterion():
    assert gm.uses_wrapped_criterion("ghost") and gm.uses_wrapped_criterion("bk")
    assert not gm.uses_wrapped_criterion("hooks")
    assert gm.device_kind("cuda:1") == "cuda" and gm.device_kind("cpu") == "cpu"


# -- conv grad samplers for Opacus' hooks (models/opacus_samplers.py, registered via dpcore.privacy.grad_modes) --

def _conv_stack():
    from timm.layers import Conv2dSame

    # 12 px: the stem pads (0, 1) (TF "same", asymmetric), the depthwise k5 stride 2 pads (1, 2)
    return torch.nn.Sequential(
        Conv2dSame(3, 6, 3, stride=2, bias=True), torch.nn.ReLU6(),  # 6x6
        torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True), torch.nn.Tanh(),  # depthwise
        Conv2dSame(6, 6, 5, stride=2, groups=6, bias=False), torch.nn.Tanh(),  # 3x3, depthwise
        torch.nn.Conv2d(6, 4, (3, 2), padding=(1, 0), dilation=(1, 2), groups=2), torch.nn.Tanh(),  # 3x1
        torch.nn.Conv2d(4, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 3, 3))


@pytest.mark.parametrize("frozen", [False, True])
def test_conv_grad_samplers_for_hooks_are_exact(frozen):
    from opacus import GradSampleModule
    from timm.layers import Conv2dSame

    import models.opacus_samplers as samplers

    assert GradSampleModule.GRAD_SAMPLERS[Conv2dSame] is samplers.compute_conv2d_same_grad_sample
    assert GradSampleModule.GRAD_SAMPLERS[torch.nn.Conv2d] is samplers.compute_conv2d_grad_sample
    torch.manual_seed(0)
    model = _conv_stack().double()
    if frozen:  # a frozen weight with a trainable bias, and a frozen layer
        model[2].weight.requires_grad_(False)
        model[4].weight.requires_grad_(False)
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    params = [p for p in model.parameters() if p.requires_grad]
    ref = [torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
           for i in range(len(x))]
    gsm = GradSampleModule(model, loss_reduction="sum")
    # no module went to Opacus' (slow) functorch fallback
    assert not any(hasattr(m, "ft_compute_sample_grad") for m in model.modules())
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for j, p in enumerate(params):
        torch.testing.assert_close(p.grad_sample, torch.stack([r[j] for r in ref]), rtol=1e-10, atol=1e-12)
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters() if not p.requires_grad)
    gsm._close()


@pytest.mark.parametrize("name,kwargs", [("mobilenetv2_100", {"pad_type": "same"}), ("tf_efficientnet_lite0", {})])
def test_timm_mobile_backbones_clip_the_same_gradient_in_hooks_and_bk(name, kwargs):
    import timm

    torch.manual_seed(0)
    model = models.make_opacus_compatible(timm.create_model(name, pretrained=False, num_classes=3, **kwargs))
    x, y = _batch(32, n=4)
    y = y % 3
    ref = gm.clipped_summed_grad(model, x, y, "hooks", clip_norm=0.05)
    assert any("conv_stem" in n for n in ref["__grad_sample__"])  # the Conv2dSame stem was sampled
    assert gm.grad_rel_error(gm.clipped_summed_grad(model, x, y, "bk", clip_norm=0.05), ref) < gm.REL_TOL
