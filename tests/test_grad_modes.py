"""dpcore.grad_modes: every mode the table may pick clips the same gradient as hooks; the chooser."""

import json
import warnings

import pytest
import torch

import models
from dpcore import grad_modes as gm


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
