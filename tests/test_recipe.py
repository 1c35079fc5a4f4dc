"""The DP fine-tuning recipe (De et al. 2022): augmentation multiplicity, EMA, weight standardisation,
lr schedule, last-k scope, public pretraining. The privacy-relevant parts are checked against
per-example autograd: K views of one example give ONE clipped gradient."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

import models
from dpcore.training import augment
from dpcore.config import RunConfig
from dpcore.training.ema import EMA, ema_decay_at
from dpcore.errors import ConfigError
from dpcore.training.schedule import LRSchedule, lr_factor
from dpcore.store.runs import RunStore
from dpcore.training.trainer import average_views, train
from models.factory import WSConv2d, bake_weight_standardization, set_trainable

FAST = dict(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, batch_size=128,
            max_physical_batch_size=64, lr=0.05)


def _tiny(ws: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create_model("tiny_cnn", 10, image_size=16, weight_standardization=ws).model


def _reference_clipped_sum(model, x, y, k: int, clip: float) -> dict[str, torch.Tensor]:
    """Σᵢ clip_C(∇ mean_k loss(view k of example i)) by per-example autograd (one example at a time)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for i in range(len(y)):
        rows = x[i * k:(i + 1) * k]
        loss = torch.nn.functional.cross_entropy(model(rows), y[i].repeat(k))  # mean over the K views
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        coef = min(1.0, clip / (float(norm) + 1e-6))
        for n, g in zip(names, grads):
            total[n] += coef * g
    return total


def _dp_step_grads(model, x, y, k: int, clip: float, mode: str) -> dict[str, torch.Tensor]:
    """p.grad after one DP step with σ = 0, expected batch 1: the clipped per-example sum."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
    if mode == "hooks":
        module = GradSampleModule(m)
        dp = DPOptimizer(opt, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=1)
        loss = torch.nn.functional.cross_entropy(module(x), y.repeat_interleave(k))
        loss.backward()
        average_views(module, len(y), k)
        dp.pre_step()
    else:
        from dpcore.privacy import grad_modes

        module, dp, criterion = grad_modes.make_bookkeeping(m, opt, torch.nn.CrossEntropyLoss(), noise_multiplier=0.0,
                                                            clip_norm=clip, expected_batch_size=1)
        module.views_per_example = k
        criterion(module(x), y.repeat_interleave(k)).backward()
        dp.pre_step()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def _views(n: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    x = augment.views(base.float(), k, augment.make_policy("natural"), generator=g)
    return (x - 127.5) / 64.0, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_k_views_of_one_example_give_one_clipped_gradient(mode):
    model = _tiny()
    k, clip = 4, 1e-3  # C far below any gradient norm: every example is clipped
    x, y = _views(1, k)
    grads = _dp_step_grads(model, x, y, k, clip, mode)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert norm == pytest.approx(clip, rel=1e-3)  # exactly C, not K·C


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_views_averaged_before_clipping_match_per_example_autograd(mode):
    model = _tiny()
    k, clip = 3, 0.5
    x, y = _views(4, k, seed=2)
    ref = _reference_clipped_sum(model, x, y, k, clip)
    got = _dp_step_grads(model, x, y, k, clip, mode)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)


def test_weight_standardization_per_example_gradients_are_correct():
    """Opacus' functorch fallback differentiates WSConv2d's own forward: gradients w.r.t. the raw weight."""
    model = _tiny(ws=True)
    assert any(isinstance(m, WSConv2d) for m in model.modules())
    x, y = _views(3, 1, seed=3)
    ref = _reference_clipped_sum(model, x, y, 1, 0.3)
    got = _dp_step_grads(model, x, y, 1, 0.3, "hooks")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)
    # book-keeping has no rule for it and refuses it (the trainer then uses hooks)
    from dpcore.privacy.bookkeeping import UnsupportedModel, check_supported

    with pytest.raises(UnsupportedModel):
        check_supported(model)


def test_baking_weight_standardization_keeps_the_function_and_the_keys():
    model = _tiny(ws=True).eval()
    x, _ = _views(2, 1)
    before = model(x)
    keys = set(model.state_dict())
    assert bake_weight_standardization(model) == 2
    assert not any(isinstance(m, WSConv2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    plain = _tiny(ws=False)
    assert set(plain.state_dict()) == keys
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain.eval()(x), before, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("runs"))
    base = train(RunConfig(epsilon=4.0, **FAST), store)
    recipe = train(RunConfig(epsilon=4.0, augmult=2, ema_decay=0.9, lr_schedule="cosine", warmup_fraction=0.2,
                             **FAST), store)
    return store, base, recipe


def test_augmult_run_has_the_same_epsilon(runs):
    _, base, recipe = runs
    a, b = base.card, recipe.card
    assert b["status"] == "done"
    for key in ("noise_multiplier", "sample_rate", "steps", "epsilon"):
        assert b[key] == a[key]
    assert b["training"]["recipe"]["views_averaged_before_clipping"] is True


def test_ema_run_reports_and_saves_the_ema_weights(runs):
    from dpcore.data import load_dataset
    from dpcore.analysis.predict import load_run

    store, base, recipe = runs
    card = recipe.card
    assert card["model"]["evaluated_weights"] == "ema" and base.card["model"]["evaluated_weights"] == "raw"
    assert card["metrics_ema"]["accuracy"] == card["test_accuracy"]
    assert card["metrics_raw"] is not None and "raw" in card["eval_history"][-1]
    config = json.loads((store.run_dir(recipe.run_id) / "config.json").read_text())
    for field in ("augmult", "augment", "ema_decay", "weight_standardization", "lr_schedule", "warmup_fraction",
                  "trainable_blocks"):
        assert field in config
    assert config["augmult"] == 2 and config["ema_decay"] == 0.9
    # the saved model is the EMA one: it predicts exactly the stored (EMA) test predictions
    saved = np.load(store.run_dir(recipe.run_id) / "test_predictions.npz")
    splits = load_dataset("digits", seed=0)
    idx = saved["test_index"][:16]
    probs = load_run(store, recipe.run_id).predict_proba([splits.test.image(int(i)) for i in idx], calibrated=False)
    np.testing.assert_allclose(probs, saved["probs"][:16], atol=1e-5)


def test_weight_standardized_private_augmult_run_on_hooks_reloads(tmp_path):
    """WS makes book-keeping step aside: Opacus' hooks, with the K views averaged in the real loop."""
    from dpcore.analysis.predict import load_run

    store = RunStore(tmp_path)
    r = train(RunConfig(epsilon=4.0, weight_standardization=True, scope="last-k", trainable_blocks=1, augmult=2,
                        **FAST), store)
    assert r.status == "done" and r.card["privacy"]["grad_sample_mode"] in ("hooks", "functorch")
    assert r.card["training"]["recipe"]["augment_policy"]["name"] == "natural"
    assert r.card["model"]["weight_standardization"] is True and r.card["model"]["trainable_blocks"] == 1
    assert r.card["model"]["trainable_params"]["trainable"] < r.card["model"]["trainable_params"]["total"]
    load_run(store, r.run_id)


def test_pretrain_output_loads_for_other_classes_and_is_recorded(tmp_path, fresh_ledger):
    from dpcore.training.pretrain import pretrain, state_dict_keys

    out = tmp_path / "pub.safetensors"
    res = pretrain("digits", out, backbone="tiny_cnn", image_size=16, epochs=1, batch_size=128,
                   max_physical_batch_size=64, lr=0.01, public="test data")
    assert out.is_file() and res.sidecar.is_file()
    assert not any(k.startswith("head.") for k in state_dict_keys(out))
    side = json.loads(res.sidecar.read_text())
    assert side["dataset"] == "digits" and len(side["sha256"]) == 64
    created = models.create_model("tiny_cnn", 3, pretrained=str(out), image_size=16)
    assert created.weights["skipped_keys"] == ["head.weight", "head.bias"]
    assert created.model.head.out_features == 3
    prov = created.weights["provenance"]
    assert prov["pretraining"]["dataset"] == "digits" and prov["sidecar"]["sha256_matches"] is True
    from safetensors.torch import load_file

    state = load_file(str(out))
    torch.testing.assert_close(created.model.state_dict()["features.0.0.weight"], state["features.0.0.weight"])
    from dpcore.store.card import describe_weights

    assert "pretrained without DP on digits" in describe_weights(created.weights)


def test_cli_flags_reach_the_config(tmp_path):
    from dpcore.cli.main import build_parser
    from dpcore.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--augmult", "4", "--augment", "xray", "--ema-decay", "0.999",
                                      "--weight-standardization", "--lr-schedule", "cosine", "--warmup-fraction",
                                      "0.05", "--scope", "last-k", "--trainable-blocks", "2"])
    c = config_from_args(args)
    assert (c.augmult, c.augment, c.ema_decay, c.weight_standardization, c.lr_schedule, c.warmup_fraction,
            c.scope, c.trainable_blocks) == (4, "xray", 0.999, True, "cosine", 0.05, "last-k", 2)
    p = build_parser().parse_args(["pretrain", "--dataset", "digits", "--out", str(tmp_path / "w.safetensors")])
    assert p.command == "pretrain"


@pytest.mark.parametrize("changes,field", [
    (dict(augmult=0), "augmult"), (dict(augmult=65), "augmult"), (dict(augmult=2.0), "augmult"),
    (dict(augment="jitter"), "augment"), (dict(scope="head", augmult=2), "augmult"),
    (dict(ema_decay=1.0), "ema_decay"), (dict(ema_decay=0.0), "ema_decay"),
    (dict(weight_standardization="yes"), "weight_standardization"),
    (dict(lr_schedule="step"), "lr_schedule"), (dict(warmup_fraction=0.6), "warmup_fraction"),
    (dict(warmup_fraction=-0.1), "warmup_fraction"), (dict(trainable_blocks=0), "trainable_blocks"),
])
def test_invalid_recipe_values_raise_clear_errors(changes, field):
    with pytest.raises(ConfigError) as err:
        RunConfig(**changes)
    assert err.value.field == field and "Fix:" in str(err.value)


def test_old_configs_without_the_new_fields_still_load():
    data = RunConfig().to_dict()
    for f in ("augmult", "augment", "ema_decay", "weight_standardization", "lr_schedule", "warmup_fraction",
              "trainable_blocks"):
        data.pop(f)
    assert RunConfig.from_dict(data) == RunConfig()


def test_lr_schedule_warmup_then_cosine():
    total = 100
    assert lr_factor(0, total, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, total, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(10, total, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(55, total, "cosine", 0.1) == pytest.approx(0.5)
    assert 0 < lr_factor(99, total, "cosine", 0.1) < 0.01
    assert lr_factor(50, total, "constant", 0.0) == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = LRSchedule(opt, total, "cosine", 0.0)
    sched.apply(50)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_ema_warmup_and_update():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10_000) == 0.999
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin, 0.5)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()  # d = 0.1
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * start + 0.9 * lin.weight.detach())
    with ema.swapped_in():
        torch.testing.assert_close(lin.weight.detach(), ema.shadow["weight"])
    torch.testing.assert_close(lin.weight.detach(), start + 1.0)


def test_augmentation_is_batched_seeded_and_example_major():
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    pol = augment.make_policy("xray")
    a = augment.views(x, 4, pol, generator=torch.Generator().manual_seed(0))
    b = augment.views(x, 4, pol, generator=torch.Generator().manual_seed(0))
    assert a.shape == (12, 3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b)
    # pure flips and 90° turns move whole pixels: each view is an exact flip / rotation of its example
    flips = augment.Policy("flips", hflip=True, rot90=True)
    v = augment.views(x.float(), 8, flips, generator=torch.Generator().manual_seed(1))
    for i in range(3):
        options = [torch.rot90(t, r, dims=(1, 2)) for t in (x[i].float(), x[i].float().flip(2)) for r in range(4)]
        for j in range(8):
            assert any(torch.allclose(v[i * 8 + j], o, atol=1e-3) for o in options)
    assert torch.equal(augment.augment_batch(x, augment.NONE), x)


def test_auto_policies_follow_the_data_set():
    assert augment.resolve_policy("auto", 1, "folder", "data/chest_xray").name == "none"
    assert augment.resolve_policy("auto", 4, "folder", "data/chest_xray").name == "xray"
    assert augment.resolve_policy("auto", 4, "pneumoniamnist").name == "xray"
    assert augment.resolve_policy("auto", 4, "ham10000", "x").name == "dermoscopy"
    assert augment.resolve_policy("auto", 4, "dermamnist").name == "dermoscopy"
    digits, cifar = augment.resolve_policy("auto", 4, "digits"), augment.resolve_policy("auto", 4, "cifar10")
    assert digits.name == cifar.name == "natural" and not digits.hflip and cifar.hflip
    xray = augment.make_policy("xray")
    assert not xray.vflip and xray.rotate_deg == 10 and xray.scale == (0.85, 1.0)


def test_last_k_scope():
    model = _tiny()
    counts = set_trainable(model, "last-k", 1)
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert on == {n for n, _ in model.named_parameters() if n.startswith(("features.1.", "head."))}
    assert counts["trainable"] < counts["total"]
    assert set_trainable(model, "last-k", 2)["trainable"] == counts["total"]
    with pytest.raises(ConfigError) as err:
        set_trainable(model, "last-k", 3)
    assert err.value.field == "trainable_blocks"
