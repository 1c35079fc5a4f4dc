"""Temperature scaling on held-out test images: T recovers a known temperature, ECE tells calibrated from
over-confident, the halves are disjoint/stratified/deterministic, runs are calibrated at the end of training and
by the CLI, predict_proba applies T, and the Predictions page shows the engine's numbers."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from apptest_support import fresh_caches, open_page, texts  # noqa: F401 - fresh_caches is autouse
from dpcore.training import calibration as cal
from dpcore.figures.calibration import reliability_figure
from dpcore.cli.main import main as cli
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.errors import DPCoreError
from dpcore.analysis.predict import load_run
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

TINY = {"dataset": "digits", "backbone": "tiny_cnn", "image_size": 16, "epochs": 1, "batch_size": 64,
        "max_physical_batch_size": 64, "epsilon": 2.0, "device": "cpu"}


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _synthetic(n=20000, k=5, seed=0):
    """Logits z and labels drawn from softmax(z): softmax(z) is calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, k))
    p = _softmax(z)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return z, p, labels


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs_calibrated")
    result = train(RunConfig(**TINY), RunStore(root))
    assert result.status == "done"
    return root, result.run_id


def test_fit_recovers_a_known_temperature():
    z, _, labels = _synthetic()
    over = _softmax(3 * z)  # a model three times too sure
    assert cal.fit_temperature(over, labels) == pytest.approx(3.0, rel=0.05)
    under = _softmax(z / 2)
    assert cal.fit_temperature(under, labels) == pytest.approx(0.5, rel=0.05)


def test_ece_small_when_calibrated_large_when_over_confident():
    z, p, labels = _synthetic()
    assert cal.expected_calibration_error(p, labels) < 0.02
    over = _softmax(4 * z)
    assert cal.expected_calibration_error(over, labels) > 0.15
    fixed = cal.apply_temperature(over, cal.fit_temperature(over, labels))
    assert cal.expected_calibration_error(fixed, labels) < 0.02
    assert cal.nll(fixed, labels) < cal.nll(over, labels) and cal.brier(fixed, labels) < cal.brier(over, labels)


def test_reliability_bins_count_every_image_and_match_ece():
    _, p, labels = _synthetic(n=3000)
    bins = cal.reliability_bins(p, labels, n_bins=10)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 3000
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / 3000
    assert cal.expected_calibration_error(p, labels, n_bins=10) == pytest.approx(ece)
    one = cal.reliability_bins(np.array([[1.0, 0.0]]), np.array([0]), n_bins=10)
    assert one[-1]["count"] == 1  # confidence exactly 1 lands in the last bin


def test_apply_temperature_keeps_the_predicted_class_and_is_exact_on_logits():
    z, p, _ = _synthetic(n=500)
    for t in (0.2, 1.0, 2.5, 17.0):
        q = cal.apply_temperature(p, t)
        assert np.array_equal(q.argmax(axis=1), p.argmax(axis=1))
        np.testing.assert_allclose(q, _softmax(z / t), atol=1e-9)
    with pytest.raises(DPCoreError, match="positive"):
        cal.apply_temperature(p, 0.0)


def test_halves_are_disjoint_stratified_and_fixed_by_the_seed():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=401)
    index = rng.permutation(1000)[:401]
    fit, ev = cal.split_halves(labels, index, seed=7)
    assert not set(fit) & set(ev) and len(fit) + len(ev) == 401
    for c in range(4):
        n_fit, n_ev = (labels[fit] == c).sum(), (labels[ev] == c).sum()
        assert n_fit - n_ev in (0, 1)  # each class split in two, the odd image to the fit half
    again = cal.split_halves(labels, index, seed=7)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], ev)
    other = cal.split_halves(labels, index, seed=8)
    assert not np.array_equal(other[0], fit)
    # the same images in another row order: the same images in each half
    perm = rng.permutation(401)
    f2, _ = cal.split_halves(labels[perm], index[perm], seed=7)
    assert set(index[perm][f2]) == set(index[fit])


def test_refuses_a_test_split_too_small_or_missing_a_class():
    _, p, labels = _synthetic(n=30, k=3)
    rec = cal.calibrate(p, labels, np.arange(30), seed=0)
    assert rec["method"] == "none" and "fewer than the 20" in rec["reason"]
    _, p, labels = _synthetic(n=400, k=3)
    labels = np.where(labels == 2, 0, labels)  # class 2 never occurs in the test split
    rec = cal.calibrate(p, labels, np.arange(400), seed=0, class_names=["a", "b", "c"])
    assert rec["method"] == "none" and "c have no image in the fit half" in rec["reason"]
    assert cal.temperature_of({"calibration": rec}) == 1.0


def test_calibrate_reports_only_on_the_evaluation_half():
    z, _, labels = _synthetic(n=2000)
    over = _softmax(3 * z)
    rec = cal.calibrate(over, labels, np.arange(2000), seed=3)
    fit, ev = cal.split_halves(labels, np.arange(2000), seed=3)
    assert rec["temperature"] == pytest.approx(cal.fit_temperature(over[fit], labels[fit]))
    assert rec["ece_before"] == pytest.approx(cal.expected_calibration_error(over[ev], labels[ev]))
    assert rec["ece_after"] == pytest.approx(
        cal.expected_calibration_error(cal.apply_temperature(over[ev], rec["temperature"]), labels[ev]))
    assert rec["n_fit"] + rec["n_eval"] == 2000 and sorted(rec["fit_test_index"]) == fit.tolist()


def test_finished_run_is_calibrated_and_card_says_where(finished):
    root, run_id = finished
    store = RunStore(root)
    card = store.card(run_id)
    c = card["calibration"]
    assert c["method"] == "temperature" and c["temperature"] > 0
    assert "never training images" in c["fit_on"] and c["n_fit"] + c["n_eval"] == card["dataset"]["n_test"]
    assert cal.PUBLIC_FACT in card["privacy_facts"]["treated_as_public"]
    stored = json.loads((store.run_dir(run_id) / cal.CALIBRATION_FILE).read_text())
    assert stored["temperature"] == c["temperature"] and "fit_test_index" not in c
    # recomputed from the stored test predictions: the same numbers (nothing but test predictions went in)
    z = np.load(store.run_dir(run_id) / "test_predictions.npz")
    again = cal.calibrate(z["probs"], z["labels"], z["test_index"], seed=card["config"]["seed"])
    for key in ("temperature", "ece_before", "ece_after", "nll_before", "nll_after", "brier_before", "brier_after"):
        assert again[key] == pytest.approx(c[key])
    fig = reliability_figure(c)
    assert len(fig.data) == 5  # diagonal, two curves, two count bars


def _as_stored_before_calibration(finished, tmp_path):
    """A copy of the finished run whose card predates calibration: no calibration field, no public-fact line."""
    root, run_id = finished
    runs = tmp_path / "runs"
    shutil.copytree(root, runs)
    store = RunStore(runs)
    card = store.card(run_id)
    expected = card.pop("calibration")
    card["privacy_facts"]["treated_as_public"].remove(cal.PUBLIC_FACT)
    store.write_json(run_id, "card.json", card)
    return runs, store, run_id, expected


def test_calibrate_run_and_cli_calibrate_an_older_run(finished, tmp_path, capsys):
    runs, store, run_id, expected = _as_stored_before_calibration(finished, tmp_path)
    assert load_run(store, run_id).temperature == 1.0
    assert cli(["temperature", "--runs-dir", str(runs), run_id]) == 0
    out = capsys.readouterr().out
    assert f"T = {expected['temperature']:.4f}" in out and f"{expected['ece_before']:.4f} → " in out
    card = store.card(run_id)
    assert card["calibration"]["temperature"] == pytest.approx(expected["temperature"])
    assert card["privacy_facts"]["treated_as_public"].count(cal.PUBLIC_FACT) == 1
    assert json.loads(out.strip().splitlines()[-1].removeprefix("calibration "))["method"] == "temperature"
    cal.calibrate_run(store, run_id)  # again: the fact is listed once
    assert store.card(run_id)["privacy_facts"]["treated_as_public"].count(cal.PUBLIC_FACT) == 1


def test_a_calibration_failure_does_not_fail_the_run(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ValueError("boom")

    monkeypatch.setattr(cal, "calibrate", broken)
    result = train(RunConfig(**TINY), RunStore(tmp_path))
    assert result.status == "done"
    c = RunStore(tmp_path).card(result.run_id)["calibration"]
    assert c["method"] == "none" and "boom" in c["reason"]


def test_predict_proba_calibrated_differs_by_exactly_the_temperature(finished):
    root, run_id = finished
    store = RunStore(root)
    loaded = load_run(store, run_id)
    t = store.card(run_id)["calibration"]["temperature"]
    assert loaded.temperature == t != 1.0
    z = np.load(store.run_dir(run_id) / "test_predictions.npz")
    splits = load_dataset("digits", seed=0)
    images = [splits.test.image(int(i)) for i in z["test_index"][:12]]
    raw = loaded.predict_proba(images, calibrated=False)
    np.testing.assert_allclose(raw, z["probs"][:12], atol=1e-5)  # the model's own, as stored
    calibrated = loaded.predict_proba(images)
    assert np.array_equal(calibrated.argmax(axis=1), raw.argmax(axis=1))
    # log p_cal = log p_raw / T + a per-image constant
    d = np.log(calibrated) - np.log(raw) / t
    np.testing.assert_allclose(d - d[:, :1], 0, atol=1e-4)
    np.testing.assert_allclose(calibrated, cal.apply_temperature(raw, t), atol=1e-5)


def test_predictions_page_shows_the_engines_calibration(finished, monkeypatch):
    root, run_id = finished
    c = RunStore(root).card(run_id)["calibration"]
    at = open_page("pages/predictions.py", root, monkeypatch)
    shown = {m.label: m.value for m in at.metric}
    assert shown["Temperature T"] == f"{c['temperature']:.3f}"
    assert shown["ECE, evaluation half"] == f"{100 * c['ece_before']:.1f} % → {100 * c['ece_after']:.1f} %"
    assert shown["NLL, evaluation half"] == f"{c['nll_before']:.3f} → {c['nll_after']:.3f}"
    assert "accuracy and the confusion matrix are unchanged" in texts(at).lower()
    assert any(el.proto.spec and "perfect calibration" in el.proto.spec for el in at.get("plotly_chart"))


def test_predictions_page_calibrates_an_older_run_on_request(finished, tmp_path, monkeypatch):
    runs, store, run_id, expected = _as_stored_before_calibration(finished, tmp_path)
    at = open_page("pages/predictions.py", runs, monkeypatch)
    assert f"python -m dpcore temperature {run_id}" in texts(at)
    at.button(key="pr_calibrate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    shown = {m.label: m.value for m in at.metric}
    assert shown["Temperature T"] == f"{expected['temperature']:.3f}"
