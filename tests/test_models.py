"""Tests for the backbone registry ``models`` (CPU, small images, tiny batches)."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from safetensors.torch import save_file

import models
from dpcore.errors import ConfigError, WeightsError
from models import create_model, get_spec, list_models, make_opacus_compatible, set_trainable

HEAVY = {"vgg11", "beit_base_patch16_224.in22k_ft_in22k", "resnet50", "convnext_tiny", "convnext_tiny.in22k"}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: a second thread only adds contention on a 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _batch(n: int, classes: int = 3, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % classes


def _per_example_grads(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        out.append(torch.autograd.grad(loss, params))
    return params, [torch.stack(gs) for gs in zip(*out)]


def _check_per_sample_grads(model, x, y, atol=1e-5):
    model.train()
    params, expected = _per_example_grads(model, x, y)
    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    names = {id(p): n for n, p in model.named_parameters()}
    for p, exp in zip(params, expected):
        assert p.grad_sample is not None, names[id(p)]
        scale = exp.abs().max().item()
        err = (p.grad_sample - exp).abs().max().item()
        assert err <= atol * max(scale, 1e-3), (names[id(p)], err, scale)  # relative to the grads' size
    gsm._close()


# --------------------------------------------------------------------------------------------
# registry


def test_registry_names_specs_and_alias():
    names = list_models()
    for n in ["tiny_cnn", "vgg11", "beit_base_patch16_224.in22k_ft_in22k", "vit_tiny_patch16_224",
              "vit_small_patch16_224", "resnet18", "resnet50", "convnext_tiny", "convnext_tiny.in22k"]:
        assert n in names
    assert get_spec("beit_base_in22k") == get_spec("beit_base_patch16_224.in22k_ft_in22k")
    assert get_spec("tiny_cnn").timm_name is None
    assert get_spec("convnext_tiny").pretrained_tag == "in1k"
    assert get_spec("convnext_tiny.in22k").pretrained_tag == "in22k"
    assert get_spec("vit_tiny_patch16_224").family == "vit"
    with pytest.raises(ConfigError) as e:
        get_spec("resnet9000")
    assert e.value.field == "backbone" and "tiny_cnn" in e.value.fix
    with pytest.raises(ConfigError):
        create_model("resnet9000", 3)


def test_data_config():
    c = create_model("tiny_cnn", 10)
    assert c.data_config["input_size"] == (3, 32, 32)
    assert c.data_config["mean"] == c.data_config["std"] == (0.5, 0.5, 0.5)
    assert c.data_config["crop_pct"] == 1.0 and c.data_config["interpolation"] == "bilinear"
    c = create_model("vit_tiny_patch16_224", 10, image_size=64)
    assert c.data_config["input_size"] == (3, 64, 64)
    assert c.data_config["interpolation"] == "bicubic" and len(c.data_config["mean"]) == 3
    assert c.model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert create_model("resnet18", 2).data_config["input_size"] == (3, 224, 224)
    with pytest.raises(ConfigError):
        create_model("vit_tiny_patch16_224", 10, image_size=40)
    with pytest.raises(ConfigError):
        create_model("tiny_cnn", 0)


# --------------------------------------------------------------------------------------------
# every backbone: Opacus-valid, one DP step, grad_sample for every trainable parameter


def _dp_step(name: str, batch: int = 2):
    c = create_model(name, 3, image_size=32)
    model = c.model
    assert ModuleValidator.validate(model, strict=False) == []
    x, y = _batch(batch)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pe = PrivacyEngine()
    gsm, opt, loader = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
                                       max_grad_norm=1e6, poisson_sampling=False, grad_sample_mode="hooks")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = time.perf_counter()
    for xb, yb in loader:
        F.cross_entropy(gsm(xb), yb).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad_sample is None]
        assert missing == []
        for n, p in model.named_parameters():
            assert p.grad_sample.shape == (len(xb),) + p.shape, n
        opt.step()
    elapsed = time.perf_counter() - t
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    head = {n for n, p in model.named_parameters() if any(p is q for q in model.get_classifier().parameters())}
    assert head and head <= set(changed), (head, changed[:5])
    return elapsed


@pytest.mark.parametrize("name", [n for n in list_models() if n not in HEAVY])
def test_dp_step_light(name):
    _dp_step(name, batch=4)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg11" else n for n in sorted(HEAVY)]
)
def test_dp_step_heavy(name):  # vgg11: ~133M parameters, ~15-20 s for one DP step on 1 CPU thread
    _dp_step(name, batch=2)


# --------------------------------------------------------------------------------------------
# per-sample gradients equal per-example autograd gradients


def test_per_sample_grads_tiny_cnn():
    torch.manual_seed(0)
    _check_per_sample_grads(create_model("tiny_cnn", 3).model, *_batch(4))


def test_per_sample_grads_vit_tiny():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 3, image_size=32).model
    with torch.no_grad():  # random init leaves cls_token ~1e-6; make every parameter matter
        model.token_pos.cls_token.normal_(0, 0.5)
        model.token_pos.pos_embed.normal_(0, 0.5)
    assert not any(n in dict(model.named_parameters()) for n in ("cls_token", "pos_embed"))
    _check_per_sample_grads(model, *_batch(3))


def test_per_sample_grads_small_beit():
    """A small timm BEiT with everything the base model has (cls token, layer scale, q/v biases,
    relative position tables) plus an absolute position embedding."""
    from timm.models.beit import Beit

    torch.manual_seed(0)
    model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                 use_abs_pos_emb=True, use_rel_pos_bias=True, init_values=0.1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bias" in n or "token" in n or "pos_embed" in n:
                p.normal_(0, 0.3)
            if "gamma" in n:
                p.uniform_(0.5, 1.0)
    x, _ = _batch(3)
    ref = model(x)
    model = make_opacus_compatible(model)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)  # same function after the fix
    assert ModuleValidator.validate(model, strict=False) == []
    _check_per_sample_grads(model, *_batch(3))


def test_per_sample_grads_resnet18_and_small_convnext():
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    _check_per_sample_grads(create_model("resnet18", 3, image_size=32).model, *_batch(2), atol=1e-4)
    model = make_opacus_compatible(ConvNeXt(num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)))
    with torch.no_grad():  # layer scale starts at 1e-6: make the blocks matter
        for n, p in model.named_parameters():
            if n.endswith("ls.gamma"):
                p.uniform_(0.5, 1.0)
    _check_per_sample_grads(model, *_batch(3))


def test_channels_last_conv_input_gets_correct_per_sample_grads():
    """Opacus 1.6's Conv2d sampler is wrong for channels-last inputs; the fix makes inputs contiguous."""
    torch.manual_seed(0)
    model = make_opacus_compatible(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 3)))
    x, y = _batch(3)
    _check_per_sample_grads(model, x.contiguous(memory_format=torch.channels_last), y)


def test_fix_is_deterministic_and_reloadable(tmp_path):
    for name in ["tiny_cnn", "vit_tiny_patch16_224", "resnet18"]:
        a = create_model(name, 4, image_size=32).model.eval()
        b = create_model(name, 4, image_size=32).model.eval()
        b.load_state_dict(a.state_dict())  # strict
        x, _ = _batch(2)
        torch.testing.assert_close(a(x), b(x))
        assert make_opacus_compatible(a) is a  # idempotent


# --------------------------------------------------------------------------------------------
# fine-tuning scopes


def test_set_trainable_scopes():
    model = create_model("tiny_cnn", 10).model
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    head = model.head.weight.numel() + model.head.bias.numel()
    biases = sum(p.numel() for n, p in params.items() if n.endswith(".bias"))
    assert set_trainable(model, "full") == {"trainable": total, "total": total}
    assert set_trainable(model, "head") == {"trainable": head, "total": total}
    assert [n for n, p in params.items() if p.requires_grad] == ["head.weight", "head.bias"]
    assert set_trainable(model, "bias") == {"trainable": biases + model.head.weight.numel(), "total": total}
    with pytest.raises(ConfigError) as e:
        set_trainable(model, "lora")
    assert e.value.field == "scope"

    vit = create_model("vit_tiny_patch16_224", 3, image_size=32).model
    counts = set_trainable(vit, "head")
    assert counts["trainable"] == 192 * 3 + 3
    counts = set_trainable(vit, "bias")
    assert 0 < counts["trainable"] < counts["total"]
    # Opacus still produces grad samples for exactly the trainable parameters
    gsm = GradSampleModule(vit)
    x, y = _batch(2)
    F.cross_entropy(gsm(x), y).backward()
    for n, p in vit.named_parameters():
        assert (getattr(p, "grad_sample", None) is not None) == p.requires_grad, n
    gsm._close()


# --------------------------------------------------------------------------------------------
# weights: local safetensors files, hub


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)


def test_load_safetensors_resnet18_folds_bn_by_default(tmp_path):
    import timm

    src = timm.create_model("resnet18", num_classes=3)
    _randomize(src)
    with torch.no_grad():  # real running statistics, so folding them matters
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "r18.safetensors"
    save_file(src.state_dict(), str(path))
    c = create_model("resnet18", 3, pretrained=str(path))
    assert c.weights["norm"] == "folded-bn" and c.weights["batchnorm"]["folded"] == 20
    assert isinstance(c.model.bn1, torch.nn.Identity) and c.model.conv1.bias is not None
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in c.model.modules())
    x, _ = _batch(2)
    src.eval(), c.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(c.model(x), src(x), rtol=1e-4, atol=1e-5)


def test_load_safetensors_resnet18_bn_to_gn(tmp_path):
    import timm

    src = timm.create_model("resnet18", num_classes=1000)
    _randomize(src)
    state = src.state_dict()
    path = tmp_path / "r18.safetensors"
    save_file(state, str(path))
    c = create_model("resnet18", 3, pretrained=str(path), norm="groupnorm")
    assert c.weights["source"] == "file" and c.weights["name"] == str(path)
    assert sorted(c.weights["skipped_keys"]) == ["fc.bias", "fc.weight"]
    assert len(c.weights["sha256"]) == 64
    assert c.weights["norm"] == "groupnorm"
    new = c.model.state_dict()
    assert isinstance(c.model.bn1, torch.nn.GroupNorm)
    compared = 0
    for k, v in state.items():
        if k.startswith("fc.") or "running_" in k or "num_batches_tracked" in k:
            continue
        torch.testing.assert_close(new[k], v, rtol=0, atol=0)  # BN weight/bias land on the GN
        compared += 1
    assert compared == len([k for k in new if not k.startswith("fc.")])
    assert new["fc.weight"].shape == (3, 512)


def test_load_safetensors_vit_resamples_position_embedding(tmp_path):
    import timm

    src = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    _randomize(src)
    state = src.state_dict()
    path = tmp_path / "vit.safetensors"
    save_file(state, str(path))
    c = create_model("vit_tiny_patch16_224", 5, pretrained=str(path), image_size=32)
    assert sorted(c.weights["skipped_keys"]) == ["head.bias", "head.weight"]
    new = c.model.state_dict()
    torch.testing.assert_close(new["token_pos.cls_token"], state["cls_token"], rtol=0, atol=0)
    assert new["token_pos.pos_embed"].shape == (1, 5, 192)
    torch.testing.assert_close(new["token_pos.pos_embed"][:, 0], state["pos_embed"][:, 0], rtol=0, atol=0)
    for k, v in state.items():
        if k not in ("cls_token", "pos_embed", "head.weight", "head.bias"):
            torch.testing.assert_close(new[k], v, rtol=0, atol=0)
    # a file with the same head size loads the head too
    small = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32)
    save_file(small.state_dict(), str(tmp_path / "v5.safetensors"))
    c = create_model("vit_tiny_patch16_224", 5, pretrained=str(tmp_path / "v5.safetensors"), image_size=32)
    assert c.weights["skipped_keys"] == []
    torch.testing.assert_close(c.model.head.weight, small.head.weight, rtol=0, atol=0)


def test_load_safetensors_errors(tmp_path):
    import timm

    state = timm.create_model("resnet18", num_classes=10).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as e:
        create_model("resnet18", 3, pretrained=str(tmp_path / "bad.safetensors"))
    assert "layer1.0.conv1.weight" in str(e.value) and "extra.weight" in str(e.value)

    state = timm.create_model("resnet18", num_classes=10).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(WeightsError, match="conv1.weight"):
        create_model("resnet18", 3, pretrained=str(tmp_path / "shape.safetensors"))

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError) as e:
        create_model("resnet18", 3, pretrained=str(missing))
    assert str(missing) in str(e.value) and "Fix" in str(e.value)

    (tmp_path / "w.pth").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="safetensors"):
        create_model("resnet18", 3, pretrained=str(tmp_path / "w.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(WeightsError):
        create_model("resnet18", 3, pretrained=str(tmp_path / "junk.safetensors"))


def _no_hub_weights(*args, **kwargs):
    raise OSError("offline: no cached weights (test stub)")


def test_hub_offline_fails_fast(monkeypatch):
    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_pretrained", _no_hub_weights)  # cache miss, deterministically
    monkeypatch.setattr(models.factory, "_hub_reachable", lambda *a, **k: False)
    t = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        create_model("resnet18", 3, pretrained="hub")
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert "could not be downloaded" in msg and "resnet18.a1_in1k" in msg
    assert "online" in msg and ".safetensors" in msg


def test_hub_download_error_becomes_weights_error(monkeypatch):
    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_pretrained", _no_hub_weights)
    monkeypatch.setattr(models.factory, "_hub_reachable", lambda *a, **k: True)
    with pytest.raises(WeightsError, match="could not be downloaded"):
        create_model("vit_tiny_patch16_224", 3, pretrained="hub", image_size=32)
    with pytest.raises(WeightsError):
        create_model("tiny_cnn", 3, pretrained="hub")


def test_hub_probe_is_quick(monkeypatch):
    import huggingface_hub.constants as hfc

    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(hfc, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    t = time.perf_counter()
    assert models.factory._hub_reachable(timeout=2) is False
    assert time.perf_counter() - t < 3


# --------------------------------------------------------------------------------------------
# tiny_cnn learns digits


def test_tiny_cnn_learns_digits():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    tr, te = perm[:1400], perm[1400:]
    model = create_model("tiny_cnn", 10).model
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t = time.perf_counter()
    for _ in range(8):
        for idx in tr[torch.randperm(len(tr))].split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
    assert acc > 0.9, acc
    assert time.perf_counter() - t < 30


def test_last_k_finds_the_blocks_of_a_beit():
    """BEiT keeps its blocks in a ModuleList (ViT in a Sequential): scope last-k must find them in both."""
    from timm.models.beit import Beit

    from models.factory import backbone_blocks
    from models.opacus_compat import make_opacus_compatible

    model = make_opacus_compatible(Beit(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2,
                                        num_classes=2, use_rel_pos_bias=True))
    assert len(backbone_blocks(model)) == 3
