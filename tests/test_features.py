"""Head-only runs on cached frozen-backbone features: the cache, exact DP accounting, full-model reload."""
import numpy as np
import pytest
import torch

import models
from dpcore.privacy import accounting
from dpcore.training import features
from dpcore.cli.main import main as cli
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.store.events import EventLog
from dpcore.store.model_io import load_weights
from dpcore.analysis.predict import load_run
from dpcore.store.runs import RunStore
from dpcore.training.sweep import parse_epsilons, run_sweep, sweep_configs
from dpcore.training.trainer import train

HEAD = dict(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=2, batch_size=128,
            max_physical_batch_size=64, lr=0.05, scope="head", device="cpu")


def _key(splits, created, **over):
    args = dict(dataset="digits", data_dir=None, seed=0, test_fraction=0.2, medmnist_size=28, skip_unreadable=False,
                splits=splits, backbone="tiny_cnn", weights=created.weights,
                backbone_hash=features.backbone_digest(created.model), data_config=created.data_config)
    return features.feature_key(**{**args, **over})


def test_second_extraction_hits_the_cache_and_the_key_tracks_its_inputs(tmp_path):
    splits = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    created = models.create_model("tiny_cnn", 10, image_size=16)
    key = _key(splits, created)
    kw = dict(key=key, cache_dir=tmp_path, splits=splits, model=created.model, data_config=created.data_config,
              device=torch.device("cpu"), skip_unreadable=False)
    first = features.load_or_extract(**kw)
    assert not first.hit and first.path.exists() and first.train_x.shape == (len(splits.train), 512)
    features._MEMORY.clear()
    second = features.load_or_extract(**kw)
    assert second.hit
    torch.testing.assert_close(second.train_x, first.train_x)
    assert features.load_or_extract(**kw).hit  # and again from memory

    torch.manual_seed(1)
    other = models.create_model("tiny_cnn", 10, image_size=16)  # other (random-init) weights
    assert _key(splits, other) != key
    bigger = models.create_model("tiny_cnn", 10, image_size=24)  # other preprocessing size
    assert _key(splits, created, data_config=bigger.data_config) != key
    assert _key(load_dataset("digits", seed=1), created) != key  # other split = other data
    assert _key(splits, created, weights={**created.weights, "sha256": "x"}) != key
    assert _key(splits, created) == key


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("runs"))
    log = EventLog()
    result = train(RunConfig(epsilon=3.0, **HEAD), store, listener=log)
    return store, result, log.snapshot()


def test_head_run_card_epsilon_is_the_accountants(head_run):
    store, result, events = head_run
    card = result.card
    assert result.status == "done"
    assert card["model"]["features"]["used"] is True
    assert card["model"]["features"]["cache_file"].startswith(str(store.root / "feature_cache"))
    assert card["epsilon"] == accounting.epsilon(card["noise_multiplier"], card["sample_rate"], card["steps"],
                                                 card["delta"], card["accountant"])
    assert card["epsilon"] <= 3.0 and card["privacy"]["poisson_sampling"] is True
    steps = [e for e in events if e.kind == "step"]
    assert card["steps"] == len(steps) == steps[-1].total_steps
    assert all(e.epsilon is not None and e.loss is None for e in steps)  # a DP run never releases its batch loss
    assert sum(e.kind == "eval" for e in events) == 2 and events[-1].kind == "finished"


def test_head_run_reloads_as_a_full_model_with_the_same_probabilities(head_run):
    store, result, _ = head_run
    z = np.load(store.run_dir(result.run_id) / "test_predictions.npz")
    splits = load_dataset("digits", seed=0)
    idx = z["test_index"][:10]
    probs = load_run(store, result.run_id).predict_proba([splits.test.image(int(i)) for i in idx], calibrated=False)
    np.testing.assert_allclose(probs, z["probs"][:10], atol=1e-5)


def test_head_run_changes_only_the_head(head_run):
    store, result, _ = head_run
    torch.manual_seed(0)
    fresh = models.create_model("tiny_cnn", 10, image_size=16)
    torch.manual_seed(0)
    trained = models.create_model("tiny_cnn", 10, image_size=16)
    load_weights(trained.model, store.run_dir(result.run_id) / "model.safetensors")
    head = {"head.weight", "head.bias"}
    before, after = fresh.model.state_dict(), trained.model.state_dict()
    for name in before:
        if name in head:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_non_private_head_run_never_touches_the_privacy_engine(tmp_path, monkeypatch):
    import opacus

    monkeypatch.setattr(opacus.PrivacyEngine, "make_private", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    result = train(RunConfig(epsilon=None, **HEAD), RunStore(tmp_path))
    assert result.status == "done" and result.card["epsilon"] is None
    assert result.card["model"]["features"]["used"] is True


def test_sweep_extracts_once_and_stores_one_run_per_point(tmp_path):
    assert parse_epsilons("2, 0.5,2") == [0.5, 2.0]
    with pytest.raises(Exception, match="epsilons"):
        parse_epsilons("1,-2")
    store = RunStore(tmp_path)
    features._MEMORY.clear()
    log = EventLog()
    points = run_sweep(sweep_configs(RunConfig(**HEAD), [1, 4], non_private=True), store, listener=log)
    assert [p.status for p in points] == ["done"] * 3
    assert [p.target_epsilon for p in points] == [1.0, 4.0, None]
    assert all(p.epsilon <= p.target_epsilon for p in points[:2]) and points[2].epsilon is None
    messages = [e.message for e in log.snapshot() if e.kind == "log" and e.message.startswith("features: ")]
    assert sum("extracting" in m for m in messages) == 1
    assert len(list((tmp_path / "feature_cache").glob("*.safetensors"))) == 1


def test_cli_sweep_prints_the_frontier_table(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    assert cli(["sweep", "--runs-dir", runs, "--dataset", "digits", "--image-size", "16", "--epochs", "1",
                "--batch-size", "128", "--epsilons", "2,8", "--non-private", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ε target" in out[1] and len(out) == 5 and "nonDP" in out[-1]
    assert len(RunStore(runs).list_runs()) == 3
