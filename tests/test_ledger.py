"""The privacy-budget ledger: real training runs are recorded with the (σ, q, T) they trained, totals equal
dp-accounting's own composition of the same events, deleted runs keep their entries, non-private runs void
the guarantee, the data set's identity is its training split's content, budgets warn, and the CLI."""
from __future__ import annotations

import math
import shutil
import threading
import warnings

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from PIL import Image

from dpcore import cli
from dpcore.accounting import PLD_DISCRETIZATION
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.ledger import Ledger, LedgerError, compose
from dpcore.store import RunStore
from dpcore.trainer import train

BASE = {"dataset": "digits", "backbone": "tiny_cnn", "scope": "head", "epochs": 2, "batch_size": 128,
        "device": "cpu", "image_size": 16}


def _train(store: RunStore, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(RunConfig(**{**BASE, **kw}), store)


@pytest.fixture(scope="module")
def spent(tmp_path_factory):
    """Two DP runs (ε 1 and 2, one under PLD) on digits' training split."""
    root = tmp_path_factory.mktemp("ledger_runs")
    store = RunStore(root)
    cards = [_train(store, epsilon=1.0).card, _train(store, epsilon=2.0, accountant="pld", epochs=3).card]
    return root, store, cards


def reference_epsilon(events, delta, kind):
    """dp-accounting composing the same mechanisms directly (compose(event, count) per run)."""
    acc = (rdp_privacy_accountant.RdpAccountant() if kind == "rdp"
           else pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION))
    for sigma, q, steps in events:
        acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_every_training_run_is_recorded_with_what_it_trained(spent):
    root, _, cards = spent
    ledger = Ledger(root)
    (ds,) = ledger.datasets()
    assert ds["n_train"] == 1437 and "digits" in ds["name"]
    entries = ledger.entries(ds["key"])
    assert [e.run_id for e in entries] == [c["run_id"] for c in cards]
    for e, c in zip(entries, cards):
        assert e.private and e.status == "done"
        assert (e.noise_multiplier, e.sample_rate, e.steps) == (c["noise_multiplier"], c["sample_rate"], c["steps"])
        assert e.epsilon == pytest.approx(c["epsilon"]) and e.delta == c["delta"]


def test_totals_equal_dp_accountings_composition_of_the_same_events(spent):
    root, _, cards = spent
    ledger = Ledger(root)
    s = ledger.summary(ledger.datasets()[0]["key"])
    events = [(c["noise_multiplier"], c["sample_rate"], c["steps"]) for c in cards]
    assert s.delta == 1e-5
    assert s.epsilon_rdp == pytest.approx(reference_epsilon(events, 1e-5, "rdp"), rel=1e-9)
    assert s.epsilon_pld == pytest.approx(reference_epsilon(events, 1e-5, "pld"), rel=1e-9)
    assert s.basic_epsilon == pytest.approx(sum(c["epsilon"] for c in cards), rel=1e-12)
    assert s.basic_delta == pytest.approx(2e-5)
    # composing is tighter than adding, and never below the costliest single run
    assert max(c["epsilon"] for c in cards) < s.epsilon < s.basic_epsilon
    assert s.epsilon == min(s.epsilon_rdp, s.epsilon_pld)
    curve = ledger.cumulative(s.key)
    assert curve[0]["epsilon"] == pytest.approx(reference_epsilon(events[:1], 1e-5, "rdp"), rel=1e-9)
    assert curve[-1]["epsilon"] == pytest.approx(s.epsilon_rdp) and curve[-1]["basic"] == pytest.approx(s.basic_epsilon)


def test_deleting_a_run_keeps_its_ledger_entry(tmp_path):
    store = RunStore(tmp_path)
    run_id = _train(store, epsilon=1.0, epochs=1).run_id
    before = Ledger(tmp_path).summaries()[0]
    store.delete_run(run_id)
    after = Ledger(tmp_path).summaries()[0]
    assert [e.run_id for e in after.entries] == [run_id]
    assert after.epsilon == before.epsilon > 0


def test_a_non_private_run_voids_the_guarantee(tmp_path):
    store = RunStore(tmp_path)
    _train(store, epsilon=1.0, epochs=1)
    np_run = _train(store, epsilon=None, epochs=1).run_id
    s = Ledger(tmp_path).summaries()[0]
    assert s.void and s.non_private_runs == [np_run] and math.isinf(s.epsilon)
    assert s.epsilon_rdp is not None and math.isfinite(s.epsilon_rdp)  # the private runs' own total is still shown
    assert math.isinf(Ledger(tmp_path).cumulative(s.key)[-1]["epsilon"])
    Ledger(tmp_path).set_budget(s.key, 10)
    assert Ledger(tmp_path).would_exceed(s.key, 1.0, 0.01, 10, 1e-5).exceeds


def test_a_cancelled_run_records_the_steps_it_took(tmp_path):
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
    (e,) = Ledger(tmp_path).entries()
    assert e.status == "cancelled" and 2 <= e.steps == result.card["steps"] < result.card["privacy"]["planned_steps"]


def make_folder(root, shift: int = 0):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(4):
                arr = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    if shift:
        arr = np.full((12, 12, 3), shift, np.uint8)
        Image.fromarray(arr).save(root / "train" / "a" / "0.png")


def test_identity_is_the_training_splits_content(tmp_path):
    make_folder(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    ledger = Ledger(tmp_path / "runs")
    key1, name1 = ledger.identify(load_dataset("folder", str(tmp_path / "one")), "folder", str(tmp_path / "one"))
    key2, _ = ledger.identify(load_dataset("folder", str(tmp_path / "two")), "folder", str(tmp_path / "two"))
    assert key1 == key2 and "8 training images" in name1  # same images elsewhere: the same data set
    assert ledger.identify(load_dataset("folder", str(tmp_path / "one")), "folder", None)[0] == key1  # stable
    # the test split does not matter; one changed training image makes another data set
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "two" / "test" / "a" / "0.png")
    assert ledger.identify(load_dataset("folder", str(tmp_path / "two")), "folder", None)[0] == key1
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "two" / "train" / "a" / "0.png")
    assert ledger.identify(load_dataset("folder", str(tmp_path / "two")), "folder", None)[0] != key1
    # a different split of digits is another data set
    d0 = ledger.identify(load_dataset("digits", seed=0), "digits")[0]
    assert ledger.identify(load_dataset("digits", seed=1), "digits")[0] != d0


def test_budget_verdict_before_a_launch(tmp_path):
    ledger = Ledger(tmp_path)
    key, _ = ledger.identify(load_dataset("digits"), "digits")
    ledger.record("r1", key, {"private": True, "noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 100,
                              "delta": 1e-5, "accountant": "rdp", "epsilon": 2.5}, "done")
    now = ledger.summary(key).epsilon
    v = ledger.would_exceed(key, 1.0, 0.05, 100, 1e-5)
    assert v.budget is None and not v.exceeds and v.after > now
    assert v.after == pytest.approx(min(compose([(1.0, 0.05, 100)] * 2, 1e-5, "rdp"),
                                        compose([(1.0, 0.05, 100)] * 2, 1e-5, "pld")))
    ledger.set_budget(key, (now + v.after) / 2)
    v = ledger.would_exceed(key, 1.0, 0.05, 100, 1e-5)
    assert v.exceeds and "past its budget" in v.message and "Fix:" in v.message
    assert not ledger.would_exceed(key, 50.0, 0.05, 1, 1e-5).exceeds  # a nearly free run fits
    assert ledger.would_exceed(key, None, 0.05, 100, 1e-5).exceeds  # non-private: ε = ∞
    with pytest.raises(LedgerError, match="positive"):
        ledger.set_budget(key, -1)
    with pytest.raises(LedgerError, match="no data set"):
        ledger.resolve("nothing-like-this")


def test_cli_prints_each_data_set_and_a_json_last_line(spent, capsys):
    import json

    root, _, cards = spent
    assert cli.main(["ledger", "--runs-dir", str(root), "--entries"]) == 0
    out = capsys.readouterr().out
    assert "composed" in out and "(RDP)" in out and "(PLD)" in out and "basic" in out and "budget    : none" in out
    assert all(c["run_id"] in out for c in cards)
    data = json.loads(out.strip().splitlines()[-1].removeprefix("ledger "))
    (row,) = data.values()
    assert row["runs"] == 2 and row["epsilon_rdp"] == pytest.approx(Ledger(root).summaries()[0].epsilon_rdp)
    assert cli.main(["ledger", "--runs-dir", str(root), "--dataset", "digits", "--set-budget", "5"]) == 0
    out = capsys.readouterr().out
    assert "budget    : ε = 5" in out and "remaining" in out
    assert cli.main(["ledger", "--runs-dir", str(root), "--dataset", "digits", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads(out.strip().splitlines()[-1].removeprefix("ledger ")).values()
    s = Ledger(root).summaries()[0]
    assert "(RDP)" in out and row["accountant"] == "rdp" and row["spent"] == pytest.approx(s.epsilon_rdp)
    assert row["remaining"] == pytest.approx(5 - s.epsilon_rdp) and row["budget_epsilon"] == 5
    assert cli.main(["ledger", "--runs-dir", str(root), "--dataset", "nope"]) == 2
    assert "no data set" in capsys.readouterr().out
    Ledger(root).set_budget(Ledger(root).datasets()[0]["key"], None)


def test_backfill_records_runs_made_before_the_ledger(tmp_path, capsys):
    store = RunStore(tmp_path)
    cards = [_train(store, epsilon=1.0, epochs=1).card, _train(store, epsilon=None, epochs=1).card]
    (tmp_path / "ledger.sqlite").unlink()  # as if the runs predate the ledger
    assert cli.main(["ledger", "--runs-dir", str(tmp_path), "--backfill"]) == 0
    assert "backfilled 2 run(s)" in capsys.readouterr().out
    s = Ledger(tmp_path).summaries()[0]
    assert [e.run_id for e in s.entries] == [c["run_id"] for c in cards]
    dp = s.entries[0]
    assert (dp.noise_multiplier, dp.sample_rate, dp.steps) == (cards[0]["noise_multiplier"], cards[0]["sample_rate"],
                                                               cards[0]["steps"])
    assert s.void and s.non_private_runs == [cards[1]["run_id"]]
    assert cli.main(["ledger", "--runs-dir", str(tmp_path), "--backfill"]) == 0  # idempotent
    assert "backfilled 0 run(s)" in capsys.readouterr().out
