"""The per-image privacy ledger: real training runs are recorded with the (σ, q, T) they trained and the images
they trained on; each image's ε equals dp-accounting's own composition of the runs that included it; deleted
runs keep their entries; uses without a guarantee void their images; budgets refuse; the file fails closed;
the CLI and backfill."""
from __future__ import annotations

import json
import math
import threading
import warnings

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dpcore.cli import main as cli
from dpcore.privacy.accounting import PLD_DISCRETIZATION
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.privacy.ledger import Ledger, LedgerCorrupt, LedgerError, compose
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

BASE = {"dataset": "digits", "backbone": "tiny_cnn", "scope": "head", "epochs": 2, "batch_size": 128,
        "device": "cpu", "image_size": 16}


def _train(store: RunStore, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(RunConfig(**{**BASE, **kw}), store)


@pytest.fixture(scope="module")
def spent(tmp_path_factory):
    """Two DP runs (ε 1 and 2, one under PLD) on digits' training split, in a ledger of their own."""
    root = tmp_path_factory.mktemp("ledger_runs")
    path = root / "ledger.sqlite"
    mp = pytest.MonkeyPatch()
    mp.setenv("DPCORE_LEDGER", str(path))
    store = RunStore(root)
    cards = [_train(store, epsilon=1.0).card, _train(store, epsilon=2.0, accountant="pld", epochs=3).card]
    mp.undo()
    return root, path, cards


def reference_epsilon(events, delta, kind):
    """dp-accounting composing the same mechanisms directly (compose(event, count) per run)."""
    acc = (rdp_privacy_accountant.RdpAccountant() if kind == "rdp"
           else pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION))
    for sigma, q, steps in events:
        acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_every_training_run_is_recorded_with_what_it_trained(spent):
    _, path, cards = spent
    ledger = Ledger(path)
    (ds,) = ledger.datasets()
    assert ds["n_images"] == 1797 and ds["name"] == "digits"  # train and test images of the split
    entries = ledger.entries(ds["key"])
    assert [e.run_id for e in entries] == [c["run_id"] for c in cards]
    for e, c in zip(entries, cards):
        assert e.private and e.status == "done" and e.kind == "train" and e.n_train == 1437 and e.n_test == 360
        assert (e.noise_multiplier, e.sample_rate, e.steps) == (c["noise_multiplier"], c["sample_rate"], c["steps"])
        assert e.epsilon == pytest.approx(c["epsilon"]) and e.delta == c["delta"]
        assert len(ledger.run_image_ids(e.run_id)) == 1437 and len(ledger.run_image_ids(e.run_id, "test")) == 360


def test_each_images_epsilon_is_dp_accountings_composition(spent):
    _, path, cards = spent
    ledger = Ledger(path)
    s = ledger.summary("digits")
    events = [(c["noise_multiplier"], c["sample_rate"], c["steps"]) for c in cards]
    assert s.delta == 1e-5
    assert s.epsilon_of("rdp") == pytest.approx(reference_epsilon(events, 1e-5, "rdp"), rel=1e-9)
    assert s.epsilon_of("pld") == pytest.approx(reference_epsilon(events, 1e-5, "pld"), rel=1e-9)
    hist = dict(s.exposure.histogram())
    assert hist[0.0] == 360  # test images: never trained on
    assert sum(n for e, n in hist.items() if e > 0) == 1437
    assert max(c["epsilon"] for c in cards) < s.epsilon < sum(c["epsilon"] for c in cards)
    assert s.epsilon == min(s.epsilon_of("rdp"), s.epsilon_of("pld"))
    curve = ledger.cumulative(s.key)
    assert curve[0]["epsilon"] == pytest.approx(min(reference_epsilon(events[:1], 1e-5, k) for k in ("rdp", "pld")))
    assert curve[-1]["epsilon"] == pytest.approx(s.epsilon) and curve[-1]["basic"] == pytest.approx(
        sum(c["epsilon"] for c in cards))


def test_deleting_a_run_keeps_its_ledger_entry(tmp_path, fresh_ledger):
    store = RunStore(tmp_path)
    run_id = _train(store, epsilon=1.0, epochs=1).run_id
    before = Ledger().summary("digits")
    store.delete_run(run_id)
    after = Ledger().summary("digits")
    assert [e.run_id for e in after.runs] == [run_id]
    assert after.epsilon == before.epsilon > 0


def test_a_non_private_run_voids_its_images(tmp_path, fresh_ledger):
    store = RunStore(tmp_path)
    _train(store, epsilon=1.0, epochs=1)
    np_run = _train(store, epsilon=None, epochs=1).run_id
    s = Ledger().summary("digits")
    assert s.void and s.exposure.void_runs == [np_run] and math.isinf(s.epsilon) and s.n_void == 1437
    assert math.isinf(Ledger().cumulative(s.key)[-1]["epsilon"])
    Ledger().set_budget(s.key, 10)
    ids = Ledger().identify(load_dataset("digits").train)
    assert Ledger().verdict(ids, dataset="digits", data_dir=None, noise_multiplier=5.0, sample_rate=0.01, steps=10,
                            delta=1e-5).exceeds


def test_a_cancelled_run_records_the_steps_it_took(tmp_path, fresh_ledger):
    store = RunStore(tmp_path)
    cancel = threading.Event()

    def stop_after_two(ev):
        if ev.kind == "step" and ev.step >= 2:
            cancel.set()

    cfg = RunConfig(**{**BASE, "epsilon": 1.0, "epochs": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg, store, listener=stop_after_two, cancel=cancel)
    assert result.status == "cancelled"
    (e,) = Ledger().entries()
    assert e.status == "cancelled" and 2 <= e.steps == e.steps_taken == result.card["steps"] < e.planned_steps


def test_steps_are_reserved_before_they_are_taken(tmp_path, fresh_ledger, monkeypatch):
    seen = []
    original = Ledger.reserve

    def spy(self, run_id, steps):
        seen.append((steps, len(taken)))
        return original(self, run_id, steps)

    taken = []
    monkeypatch.setattr(Ledger, "reserve", spy)
    store = RunStore(tmp_path)
    cfg = RunConfig(**{**BASE, "epsilon": 1.0, "epochs": 5, "batch_size": 32})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg, store, listener=lambda ev: taken.append(1) if ev.kind == "step" else None)
    total = result.card["steps"]
    assert all(reserved > done for reserved, done in seen)  # each write covers the step about to be taken
    assert len(seen) <= 51 and seen[-1][0] == total  # in ~2 % chunks, not one write per step


def test_verdict_and_budget_per_image(tmp_path, fresh_ledger):
    ledger = Ledger()
    splits = load_dataset("digits")
    ids = ledger.identify(splits.train)
    spend = ledger.begin("r1", train=ids, dataset="digits", private=True, noise_multiplier=1.0, sample_rate=0.05,
                         planned_steps=100, delta=1e-5, accountant="rdp")
    spend.ensure(100)
    ledger.finish("r1", "done", 100, 2.5)
    now = ledger.summary("digits").epsilon
    v = ledger.verdict(ids, dataset="digits", data_dir=None, noise_multiplier=1.0, sample_rate=0.05, steps=100,
                       delta=1e-5)
    assert v.budget is None and not v.exceeds and v.after > now and v.n_known == 1437
    assert v.after == pytest.approx(min(compose([(1.0, 0.05, 100)] * 2, 1e-5, "rdp"),
                                        compose([(1.0, 0.05, 100)] * 2, 1e-5, "pld")))
    ledger.set_budget("digits", (now + v.after) / 2)
    v = ledger.verdict(ids, dataset="digits", data_dir=None, noise_multiplier=1.0, sample_rate=0.05, steps=100,
                       delta=1e-5)
    assert v.exceeds and "past the budget" in v.message and "Fix:" in v.message
    assert not ledger.verdict(ids, dataset="digits", data_dir=None, noise_multiplier=50.0, sample_rate=0.05, steps=1,
                              delta=1e-5).exceeds  # a nearly free run fits
    assert ledger.verdict(ids, dataset="digits", data_dir=None, noise_multiplier=None, sample_rate=0.05, steps=100,
                          delta=1e-5).exceeds  # non-private: ε = ∞
    # images the ledger has never seen (the test split) start from 0: a run on them alone fits
    test_ids = ledger.identify(splits.test)
    v = ledger.verdict(test_ids, dataset="digits", data_dir=None, noise_multiplier=1.0, sample_rate=0.05, steps=100,
                       delta=1e-5)
    assert v.n_known == 0 and not v.exceeds
    with pytest.raises(LedgerError, match="positive"):
        ledger.set_budget("digits", -1)
    with pytest.raises(LedgerError, match="no data set"):
        ledger.resolve("nothing-like-this")


def test_the_ledger_file_is_created_whole_and_never_silently_replaced(tmp_path):
    path = tmp_path / "sub" / "ledger.sqlite"
    first = Ledger(path).ledger_id
    assert Ledger(path).ledger_id == first and not list(path.parent.glob("*.tmp"))
    path.write_bytes(b"")
    with pytest.raises(LedgerCorrupt, match="empty"):
        Ledger(path)
    assert path.stat().st_size == 0
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerCorrupt):
        Ledger(path)


def test_cli_prints_each_data_set_and_a_json_last_line(spent, capsys):
    root, path, cards = spent
    assert cli.main(["ledger", "--ledger", str(path), "--entries"]) == 0
    out = capsys.readouterr().out
    assert "most-exposed image ε" in out and "RDP" in out and "PLD" in out and "histogram" in out
    assert "budget    : none" in out and all(c["run_id"] in out for c in cards)
    data = json.loads(out.strip().splitlines()[-1].removeprefix("ledger "))
    (row,) = data.values()
    s = Ledger(path).summary("digits")
    assert row["runs"] == 2 and row["epsilon_max_rdp"] == pytest.approx(s.epsilon_of("rdp"))
    assert row["histogram"][0] == [0.0, 360] and row["unit"] == "image"
    assert cli.main(["ledger", "--ledger", str(path), "--dataset", "digits", "--set-budget", "5"]) == 0
    out = capsys.readouterr().out
    assert "budget    : ε = 5 per image" in out and "remaining" in out
    assert cli.main(["ledger", "--ledger", str(path), "--dataset", "digits", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads(out.strip().splitlines()[-1].removeprefix("ledger ")).values()
    assert row["accountant"] == "rdp" and row["spent"] == pytest.approx(s.epsilon_of("rdp"))
    assert row["remaining"] == pytest.approx(5 - s.epsilon_of("rdp")) and row["budget_epsilon"] == 5
    assert cli.main(["ledger", "--ledger", str(path), "--dataset", "nope"]) == 2
    assert "no data set" in capsys.readouterr().out
    Ledger(path).set_budget("digits", None)


def test_a_voided_data_set_has_no_remaining_budget(tmp_path, fresh_ledger, capsys):
    store = RunStore(tmp_path)
    _train(store, epsilon=None, epochs=1)
    Ledger().set_budget("digits", 4)
    assert cli.main(["ledger", "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads(out.strip().splitlines()[-1].removeprefix("ledger ")).values()
    assert row["remaining"] is None and "remaining none (void)" in out


def test_backfill_records_runs_made_before_the_ledger(tmp_path, fresh_ledger, capsys, monkeypatch):
    store = RunStore(tmp_path)
    monkeypatch.setenv("DPCORE_LEDGER", str(tmp_path / "old.sqlite"))
    cards = [_train(store, epsilon=1.0, epochs=1).card, _train(store, epsilon=None, epochs=1).card]
    monkeypatch.setenv("DPCORE_LEDGER", str(fresh_ledger))  # as if the runs predate this ledger
    assert cli.main(["ledger", "--runs-dir", str(tmp_path), "--backfill"]) == 0
    assert "backfilled 2 run(s)" in capsys.readouterr().out
    s = Ledger().summary("digits")
    assert [e.run_id for e in s.runs] == [c["run_id"] for c in cards]
    dp = s.runs[0]
    assert (dp.noise_multiplier, dp.sample_rate, dp.steps) == (cards[0]["noise_multiplier"], cards[0]["sample_rate"],
                                                               cards[0]["steps"])
    assert dp.kind == "backfill" and s.void and s.exposure.void_runs == [cards[1]["run_id"]]
    assert cli.main(["ledger", "--runs-dir", str(tmp_path), "--backfill"]) == 0  # idempotent
    assert "backfilled 0 run(s)" in capsys.readouterr().out


def test_identity_is_the_images_content(tmp_path, fresh_ledger):
    """Exact copies and re-encodings are the same image; a changed image is another one."""
    from PIL import Image

    from dpcore.data import PathImageList

    from test_privacy_truth import textured

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(textured(rng)).save(p)
        paths.append(p)
    ledger = Ledger()
    ids = ledger.identify(PathImageList(paths, [0] * 6))
    spend = ledger.begin("r1", train=ids, dataset="folder", data_dir=str(tmp_path), private=True,
                         noise_multiplier=1.0, sample_rate=0.5, planned_steps=4, delta=1e-5, accountant="rdp")
    spend.ensure(4)
    Image.open(paths[0]).save(tmp_path / "copy.jpg", quality=90)
    Image.open(paths[1]).resize((200, 200)).save(tmp_path / "big.png")
    Image.fromarray(textured(rng)).save(tmp_path / "new.png")
    matches, known = ledger.lookup(ledger.identify(PathImageList(
        [tmp_path / "copy.jpg", tmp_path / "big.png", tmp_path / "new.png"], [0, 0, 0])))
    assert known == 2 and matches[2] == [] and matches[0] and matches[1]
