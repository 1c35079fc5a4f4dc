"""Membership-inference audit (dpcore.audit): the ε lower bound on known rates, the attacks separating a
deliberately overfit non-private model from a DP ε=1 one, and the audit of a stored run (audit.json, CLI,
background thread)."""
from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

from dpcore import accounting, audit, audit_figures
from dpcore.cli import main
from dpcore.config import RunConfig
from dpcore.store import RunStore
from dpcore.trainer import train


# -- the ε lower bound ------------------------------------------------------------------------
def test_epsilon_from_rates_on_known_values():
    assert audit.epsilon_from_rates(0.5, 0.05)[()] == pytest.approx(math.log(10))
    assert audit.epsilon_from_rates(0.5, 0.05, delta=0.1)[()] == pytest.approx(math.log(8))
    # the complementary inequality: 1 − FPR ≤ e^ε (1 − TPR) + δ
    assert audit.epsilon_from_rates(0.99, 0.5)[()] == pytest.approx(math.log(0.5 / 0.01))
    assert audit.epsilon_from_rates(0.3, 0.3)[()] == 0.0  # chance: nothing proven
    assert audit.epsilon_from_rates(0.1, 0.2)[()] == 0.0  # worse than chance: the test 'score ≥ t' proves nothing
    assert audit.epsilon_from_rates(0.0, 0.0)[()] == 0.0


def test_clopper_pearson_limits():
    lo, hi = audit.clopper_pearson(0, 10, 0.05)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = audit.clopper_pearson(10, 10, 0.05)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    lo, hi = audit.clopper_pearson(50, 100, 0.05)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.2, abs=0.02)


def test_epsilon_lower_bound_is_below_the_point_estimate_and_tightens_with_samples():
    point = math.log(10)
    small = audit.epsilon_lower_bound(50, 5, 100, 100)[()]
    big = audit.epsilon_lower_bound(50_000, 5_000, 100_000, 100_000)[()]
    assert 0 < small < big < point
    assert big == pytest.approx(point, abs=0.05)
    assert audit.epsilon_lower_bound(0, 0, 100, 100)[()] == 0.0
    assert audit.epsilon_lower_bound(30, 30, 100, 100)[()] == 0.0


def test_empirical_epsilon_on_perfectly_separated_and_on_random_scores():
    labels = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    sep = audit.empirical_epsilon(np.r_[np.ones(500), np.zeros(500)], labels, 1e-5)
    # 250 held-out members all flagged, 250 non-members none: TPR ≥ 0.985, FPR ≤ 0.0146 at 97.5 % each
    assert sep["epsilon_lb"] == pytest.approx(math.log((0.025 ** (1 / 250) - 1e-5) / (1 - 0.025 ** (1 / 250))),
                                              rel=1e-6)
    rnd = audit.empirical_epsilon(np.random.default_rng(0).random(1000), labels, 1e-5)
    assert rnd["epsilon_lb"] < 0.3 and rnd["epsilon_point"] >= rnd["epsilon_lb_all_thresholds"] >= 0


def test_lira_scores_prefer_candidates_that_look_like_their_in_shadows():
    rng = np.random.default_rng(0)
    keep = audit.membership_matrix(50, 8, rng)
    assert (keep.sum(0) == 4).all()
    phi = np.where(keep, 3.0, 0.0) + rng.normal(0, 0.5, keep.shape)
    s_member = audit.lira_scores(np.full(50, 3.0), phi, keep)
    s_out = audit.lira_scores(np.zeros(50), phi, keep)
    for k in ("lira_online", "lira_offline"):
        assert (s_member[k] > s_out[k]).all()


# -- the attacks on a model that overfits and on a DP one ----------------------------------------
def _synthetic(n=400, d=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 2, generator=g)
    y = (x @ w / d ** 0.5 + 2.0 * torch.randn(n, 2, generator=g)).argmax(1)  # weak signal, lots of noise
    return x, y


def _linear(d):
    def make(seed):
        torch.manual_seed(seed)
        return torch.nn.Linear(d, 2)
    return make


@pytest.fixture(scope="module")
def synthetic_audits():
    x, y = _synthetic()
    q, steps = 0.25, 100
    sigma = accounting.calibrate_noise(1.0, 1e-5, q, steps, "rdp")
    recipes = {"nonprivate": audit.Recipe(private=False, sample_rate=q, steps=steps, physical_batch=4096),
               "dp": audit.Recipe(private=True, sample_rate=q, steps=steps, noise_multiplier=sigma, physical_batch=4096)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: (r, audit.audit_arrays(x, y, _linear(x.shape[1]), r, audit.AuditSettings(shadows=8, seed=0)))
                for k, r in recipes.items()}


def test_audit_separates_an_overfit_model_from_a_dp_one(synthetic_audits):
    _, over = synthetic_audits["nonprivate"]
    recipe, dp = synthetic_audits["dp"]
    assert over["target"]["train_accuracy_proxy"] == 1.0  # it memorised its half
    assert over["n_members"] == over["n_nonmembers"] == 200
    best_over = max(a["auc"] for a in over["attacks"].values())
    assert best_over > 0.7
    assert over["attacks"]["lira_online"]["auc"] > 0.7
    assert max(a["epsilon_lb"] for a in over["attacks"].values()) > 0.5  # proves a real leak
    claimed = recipe.epsilon()
    assert claimed == pytest.approx(1.0, rel=0.02)
    for name, a in dp["attacks"].items():
        assert abs(a["auc"] - 0.5) < 0.08, name
        assert a["epsilon_lb"] <= claimed, name
        assert a["tpr_at_0.01_fpr"] <= 0.1
        curve = a["curve"]
        assert curve["fpr"][0] == 0 and curve["fpr"][-1] == 1 and len(curve["fpr"]) == len(curve["tpr"])


def test_roc_figure_is_log_log_with_the_dp_limit(synthetic_audits):
    recipe, dp = synthetic_audits["dp"]
    fig = audit_figures.roc_figure({**dp, "claimed_epsilon": recipe.epsilon(), "delta": 1e-5})
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    names = [t.name for t in fig.data]
    assert any("DP limit" in n for n in names) and sum("AUC" in n for n in names) == 3
    limit = audit_figures.dp_tpr_limit(np.array([0.01, 0.5]), 1.0)
    assert limit[0] == pytest.approx(math.e * 0.01) and limit[1] == pytest.approx(1 - 0.5 / math.e)
    bars = audit_figures.epsilon_figure({**dp, "claimed_epsilon": 1.0})
    assert len(bars.data[0].y) == 3


# -- a stored run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", scope="head", epsilon=1.0, epochs=3, batch_size=128,
                    device="cpu", image_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg, store)
    return store, result.run_id, result.card


def test_cli_audit_of_a_stored_run_prints_the_table_and_stores_audit_json(stored_run, capsys):
    store, run_id, card = stored_run
    rc = main(["audit", "--run", run_id, "--runs-dir", str(store.root), "--shadows", "4", "--pool-size", "300",
               "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"attack_auc \d\.\d\d", out[-1])
    assert any(line.startswith("LiRA online") for line in out)
    saved = json.loads((store.run_dir(run_id) / "audit.json").read_text())
    assert saved["config"]["shadows"] == 4 and saved["config"]["pool_size"] == 300 and saved["config"]["seed"] == 0
    assert saved["claimed_epsilon"] == pytest.approx(card["epsilon"])
    assert saved["recipe"]["noise_multiplier"] == pytest.approx(card["noise_multiplier"])
    assert saved["recipe"]["steps"] == card["steps"] and saved["target"]["steps"] == card["steps"]
    assert len(saved["timings"]["per_model_s"]) == 5 and saved["timings"]["total_s"] > 0
    assert set(saved["attacks"]) == set(audit.ATTACKS)
    assert saved["summary"]["epsilon_lb"] <= card["epsilon"] and saved["summary"]["consistent"]
    assert f"{saved['summary']['attack_auc']:.2f}" == out[-1].split()[1]


def test_start_audit_runs_in_the_background_and_reports_progress(stored_run):
    store, run_id, _ = stored_run
    thread = audit.start_audit(store, run_id, audit.AuditSettings(shadows=2, seed=1, pool_size=200))
    with pytest.raises(Exception, match="already running"):
        audit.start_audit(store, run_id, audit.AuditSettings(shadows=2))
    thread.join(120)
    prog = audit.read_progress(store, run_id)
    assert prog["status"] == "done", prog
    assert prog["done"] == prog["total"] == 3
    assert audit.read_audit(store, run_id)["config"]["seed"] == 1
