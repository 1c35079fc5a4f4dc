"""Full tiny runs on the bundled digits: train, store, reload, predict; card ε = accountant ε."""
import numpy as np
import pytest
from PIL import Image

from dpcore.privacy import accounting
from dpcore.cli.main import main as cli
from dpcore.config import RunConfig
from dpcore.store.events import EventLog
from dpcore.analysis.predict import load_run
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

FAST = dict(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=2, batch_size=128,
            max_physical_batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("runs"))
    log = EventLog()
    result = train(RunConfig(epsilon=4.0, **FAST), store, listener=log)
    return store, result, log.snapshot()


def test_dp_run_trains_and_stores_everything(dp_run):
    store, result, events = dp_run
    assert result.status == "done"
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "plan" in kinds
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, len(steps) + 1))
    assert all(e.epsilon is not None and e.loss is None for e in steps)  # a DP run never releases its batch loss
    assert [e.epsilon for e in steps] == sorted(e.epsilon for e in steps)
    assert sum(e.kind == "eval" for e in events) == 2
    run_dir = store.run_dir(result.run_id)
    for name in ("config.json", "model.safetensors", "card.json"):
        assert (run_dir / name).exists()
    assert not list(run_dir.glob("*.pt")) and not list(run_dir.glob("*.pkl"))
    rec = store.get_run(result.run_id)
    assert rec.status == "done" and rec.metrics["accuracy"] == result.card["test_accuracy"]
    assert len(store.events(result.run_id)) == len(events)


def test_card_epsilon_is_the_accountants_epsilon(dp_run):
    _, result, events = dp_run
    card = result.card
    for key in ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "clip_norm",
                "test_accuracy", "test_roc_auc"):
        assert key in card
    expected = accounting.epsilon(card["noise_multiplier"], card["sample_rate"], card["steps"], card["delta"],
                                  card["accountant"])
    assert card["epsilon"] == expected
    assert card["epsilon"] <= 4.0
    assert card["steps"] == max(e.step for e in events if e.kind == "step")
    assert card["privacy"]["poisson_sampling"] is True


def test_reload_predicts_the_same_probabilities(dp_run):
    store, result, _ = dp_run
    from dpcore.data import load_dataset

    splits = load_dataset("digits", seed=0)
    images = [splits.test.image(i) for i in range(12)]
    a = load_run(store, result.run_id).predict_proba(images)
    b = load_run(store, result.run_id).predict_proba(images)
    np.testing.assert_allclose(a, b)
    assert a.shape == (12, 10) and np.allclose(a.sum(1), 1, atol=1e-5)
    # grayscale input is converted exactly like the training images
    gray = [im.convert("L") for im in images[:3]]
    np.testing.assert_allclose(load_run(store, result.run_id).predict_proba(gray), a[:3], atol=1e-5)


def test_non_private_run_really_is_non_private(tmp_path, monkeypatch):
    import opacus

    def forbidden(*args, **kwargs):
        raise AssertionError("non-private run touched the privacy engine")

    monkeypatch.setattr(opacus.PrivacyEngine, "make_private", forbidden)
    store = RunStore(tmp_path)
    result = train(RunConfig(epsilon=None, **FAST), store)
    card = result.card
    assert result.status == "done"
    assert card["epsilon"] is None and card["noise_multiplier"] is None and card["clip_norm"] is None
    assert card["privacy"]["private"] is False
    assert "no privacy guarantee" in card["guarantee"]


def test_cancel_stops_between_steps_and_is_recorded(tmp_path):
    import threading

    store = RunStore(tmp_path)
    cancel = threading.Event()

    def listener(ev):
        if ev.kind == "step" and ev.step == 2:
            cancel.set()

    result = train(RunConfig(epsilon=4.0, **{**FAST, "epochs": 5}), store, listener=listener, cancel=cancel)
    assert result.status == "cancelled"
    assert store.get_run(result.run_id).status == "cancelled"
    assert result.card["steps"] == 2
    assert result.card["epsilon"] == accounting.epsilon(result.card["noise_multiplier"], result.card["sample_rate"],
                                                        2, result.card["delta"])


def test_crash_is_recorded_as_failed(tmp_path, monkeypatch):
    import dpcore.training.trainer as trainer_mod

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trainer_mod, "classification_metrics", boom)
    store = RunStore(tmp_path)
    with pytest.raises(RuntimeError):
        train(RunConfig(epsilon=4.0, **FAST), store)
    rec = store.list_runs()[0]
    assert rec.status == "failed" and "disk on fire" in rec.error
    assert len(store.events(rec.run_id, "step")) > 0  # what was recorded before the crash is kept


def test_cli_train_runs_predict(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    args = ["train", "--runs-dir", runs, "--dataset", "digits", "--backbone", "tiny_cnn", "--image-size", "16",
            "--epochs", "1", "--batch-size", "128", "--epsilon", "3", "--accountant", "pld"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "step" in out and "eval @ step" in out and "model card" in out and "PLD" in out
    assert cli(["runs", "--runs-dir", runs, "--ids"]) == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 1
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype("uint8")).save(img)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert cli(["predict", "--runs-dir", runs, "--run", ids[0], str(img)]) == 0
    assert "predicted" in capsys.readouterr().out
    assert cli(["predict", "--runs-dir", runs, "--run", ids[0], str(bad)]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_cli_accounting_commands(capsys):
    assert cli(["epsilon", "--noise", "1.1", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"epsilon {accounting.epsilon(1.1, 0.01, 1000, 1e-5):.6g}")
    assert cli(["calibrate", "--epsilon", "0.5", "--delta", "1e-5", "--sample-rate", "0.2", "--steps", "100"]) == 0
    sigma = float(capsys.readouterr().out.split()[1])
    assert 0.99 * 0.5 <= accounting.epsilon(sigma, 0.2, 100, 1e-5) <= 0.5
    assert cli(["epsilon", "--noise", "1", "--sample-rate", "2", "--steps", "10"]) == 2
    assert "sample_rate" in capsys.readouterr().err


def test_bookkeeping_run_with_virtual_steps(tmp_path, monkeypatch):
    """The trainer's book-keeping path: Poisson batches split into physical batches (virtual steps,
    empty batches possible), Opacus' noise and accountant; the card's ε is the accountant's."""
    import json

    from dpcore.privacy import grad_modes as gm

    table = tmp_path / "modes.json"
    table.write_text(json.dumps({"devices": {"cpu": {"models": {"tiny_cnn": {"mode": "bk", "ranked": ["bk"]}}}}}))
    monkeypatch.setenv(gm.TABLE_ENV, str(table))
    store = RunStore(tmp_path / "runs")
    cfg = RunConfig(epsilon=4.0, device="cpu", **{**FAST, "max_physical_batch_size": 24})
    result = train(cfg, store)
    p = result.card["privacy"]
    assert p["grad_sample_mode"] == "bk"
    assert p["epsilon"] == pytest.approx(accounting.epsilon(p["noise_multiplier"], p["sample_rate"], p["steps"],
                                                            cfg.delta, cfg.accountant))
    assert p["epsilon"] <= 4.0
    assert result.card["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
