"""Membership-inference audit (dpcore.analysis.audit): the one-run p-value (Steinke et al. 2023) against the theorem,
the validity of the whole bound procedure (grid + Bonferroni) on mechanisms of known ε, the attacks
separating a deliberately overfit non-private model from a DP ε=1 one, and the audit of a stored run
(the run's own recipe replayed, the ledger entry, audit.json, CLI, background thread)."""
from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from scipy import optimize, special, stats

from dpcore.privacy import accounting
from dpcore.analysis import audit
from dpcore.figures import audit as audit_figures
from dpcore.training import trainer as trainer_module
from dpcore.cli.main import main
from dpcore.config import RunConfig
from dpcore.privacy.ledger import Ledger, LedgerError, RecordedUse
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train


# -- the one-run p-value and bound ----------------------------------------------------------------
def _theorem_p_value(m, r, v, eps, delta):
    """The theorem's right-hand side, written out term by term (i over all of 1..m, f(u) = 1 for u ≤ 0)."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(u):
        return 1.0 if u <= 0 else float(stats.binom.sf(u - 1, r, q))

    return min(1.0, f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, m + 1)))


@pytest.mark.parametrize("m,r,v,eps", [(100, 100, 70, 0.5), (1000, 50, 50, 2.0), (30, 10, 3, 0.0), (500, 500, 0, 1.0)])
def test_p_value_for_pure_dp_is_the_binomial_tail(m, r, v, eps):
    q = 1 / (1 + math.exp(-eps))
    expected = 1.0 if v == 0 else stats.binom.sf(v - 1, r, q)
    assert audit.one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("m,r,v,eps,delta", [(40, 40, 30, 0.8, 1e-3), (40, 12, 9, 0.3, 1e-2), (200, 60, 45, 1.5, 1e-3),
                                             (25, 25, 25, 3.0, 0.02), (25, 5, 1, 0.1, 0.02)])
def test_p_value_with_delta_is_the_theorem_term_by_term(m, r, v, eps, delta):
    assert audit.one_run_p_value(m, r, v, eps, delta) == pytest.approx(_theorem_p_value(m, r, v, eps, delta), rel=1e-9)


def test_p_value_is_monotone_when_2_m_delta_is_at_most_1():
    m, r, delta = 1000, 200, 4e-4  # 2mδ = 0.8
    eps = np.linspace(0, 6, 61)
    for v in (100, 130, 170, 200):
        p = [audit.one_run_p_value(m, r, v, e, delta) for e in eps]
        assert np.all(np.diff(p) >= -1e-12), v  # nondecreasing in ε
    for e in (0.5, 2.0):
        p = [audit.one_run_p_value(m, r, v, e, delta) for v in range(r + 1)]
        assert np.all(np.diff(p) <= 1e-12), e  # nonincreasing in v


def test_the_bound_inverts_the_p_value():
    m, r, v, delta, beta = 1000, 400, 330, 1e-5, 0.05 / 18
    eps = audit.one_run_epsilon(m, r, v, delta, beta)
    assert eps > 0
    assert audit.one_run_p_value(m, r, v, eps, delta) <= beta < audit.one_run_p_value(m, r, v, eps + 1e-4, delta)
    assert audit.one_run_epsilon(m, r, 0, delta, beta) == 0.0
    assert audit.one_run_epsilon(m, r, r // 2, delta, beta) == 0.0  # chance accuracy proves nothing
    vs = np.arange(r + 1)
    bounds = audit.one_run_epsilons(m, r, vs, delta, beta)
    assert np.all(np.diff(bounds) >= 0) and bounds[r] > bounds[330] > 0


@pytest.mark.parametrize("eps_true,delta", [(0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (1.0, 2e-4)])
def test_single_bound_has_exact_coverage_on_randomized_response(eps_true, delta):
    """Exact, no Monte Carlo: an attacker whose r guesses are each right with probability e^ε/(1+e^ε) (plus δ:
    a guess that is right for sure with probability δ — an (ε, δ)-DP randomized response) has V ~ Binomial;
    the bound exceeds ε_true with probability Σ P[V = v] over the v whose bound does, which must be ≤ β."""
    m = r = 300
    beta = 0.05
    q = (1 - delta) * special.expit(eps_true) + delta
    bounds = audit.one_run_epsilons(m, r, np.arange(r + 1), delta, beta)
    exceed = stats.binom.pmf(np.flatnonzero(bounds > eps_true), r, q).sum()
    assert exceed <= beta
    if delta == 0:
        assert exceed > beta / 3  # and it is a sharp test, not a vacuous one


def test_guess_grid_bonferroni_and_the_m_delta_limit():
    assert audit.guess_counts(1000) == [(10, 0), (50, 0), (100, 0), (50, 50), (150, 150), (500, 500)]
    assert all(kp + km <= 21 for kp, km in audit.guess_counts(21))
    assert audit.bonferroni_beta(3, 6) == pytest.approx(0.05 / 18)
    with pytest.raises(Exception, match=r"2·m·δ ≤ 1.*--pool-size"):
        audit.one_run_epsilon(60_000, 100, 80, 1e-5, 0.01)


def test_correct_guesses_count_top_in_and_bottom_out():
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.5, 0.05])
    member = np.array([True, False, False, True, True, False])
    v = audit.correct_guesses(scores, member, [(2, 0), (2, 2), (0, 1), (3, 3)], np.random.default_rng(0))
    assert v[:, 0].tolist() == [1, 3, 1, 4]  # e.g. (2, 2): 0.9 in ✓, 0.8 in ✗, 0.05 and 0.1 out ✓✓


# -- validity of the whole procedure on mechanisms of known ε ----------------------------------------
def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact ε at δ of a Gaussian mechanism of sensitivity μ and unit noise:
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    def gap(e):
        return stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2) - delta
    return optimize.brentq(gap, 0, 80)


def _randomized_response(eps, reps, m, rng):
    member = rng.random((reps, m)) < 0.5  # each canary in independently with probability 1/2
    right = rng.random((reps, m)) < special.expit(eps)
    bit = np.where(right, member, ~member).astype(float)  # ε-DP in each canary, exactly
    return {"bit": bit, "noisier": bit + rng.normal(0, 0.7, bit.shape), "unrelated": rng.random(bit.shape)}, member


def _gaussian(mu, reps, m, rng):
    member = rng.random((reps, m)) < 0.5
    out = mu * member + rng.normal(size=member.shape)  # a Gaussian mechanism per canary
    return {"output": out, "noisier": out + rng.normal(size=out.shape), "distance": -np.abs(out - mu / 2)}, member


@pytest.mark.parametrize("kind,param,delta", [("rr", 1.0, 0.0), ("rr", 2.0, 0.0), ("rr", 4.0, 0.0),
                                              ("gauss", 1.0, 1e-5), ("gauss", 2.0, 1e-5)])
def test_the_bound_procedure_is_valid_on_mechanisms_of_known_epsilon(kind, param, delta):
    """Many repetitions of the whole procedure (3 attacks × the guess grid, Bonferroni) on simulated canaries:
    the reported maximum exceeds the true ε in at most 5 % of them (up to Monte-Carlo error), and it is
    informative (well above 0)."""
    reps, m = 500, 1000
    rng = np.random.default_rng([len(kind), int(param * 10)])
    if kind == "rr":
        scores, member = _randomized_response(param, reps, m, rng)
        eps_true = param
    else:
        scores, member = _gaussian(param, reps, m, rng)
        eps_true = _gaussian_epsilon(param, delta)
    best = audit.epsilon_bounds(scores, member, delta, seed=1)["best"]
    exceed = int((best > eps_true).sum())
    # fail only if a rate of 5 % could hardly give this many (one-sided, 99.9 %)
    assert exceed <= stats.binom.ppf(0.999, reps, 0.05), (exceed, eps_true)
    assert best.mean() > (0.6 * eps_true if kind == "rr" else 1.0), (best.mean(), eps_true)


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
    """A linear head on synthetic features, trained by the trainer's own loop (fit_arrays): non-private (it
    memorises its members) and DP at ε = 1 for the same q and T. No images, so the hold needs no ledger."""
    x, y = _synthetic()
    q, steps = 0.25, 100
    sigma = accounting.calibrate_noise(1.0, 1e-5, q, steps, "rdp")
    base = dict(dataset="digits", backbone="tiny_cnn", scope="head", device="cpu", lr=0.01, batch_size=100, epochs=1)
    runs = {"nonprivate": (RunConfig(epsilon=None, **base), (None, q, steps)),
            "dp": (RunConfig(epsilon=1.0, **base), (sigma, q, steps))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: audit.audit_arrays(x, y, _linear(x.shape[1]), cfg, audit.AuditSettings(shadows=8, seed=0),
                                      spending=RecordedUse(f"synthetic-{k}"), mechanism=mech, physical_batch=4096,
                                      head_only=True)
                for k, (cfg, mech) in runs.items()}


def test_audit_separates_an_overfit_model_from_a_dp_one(synthetic_audits):
    over, dp = synthetic_audits["nonprivate"], synthetic_audits["dp"]
    assert over["target"]["train_accuracy_proxy"] > 0.95  # it memorised its members
    assert over["n_members"] + over["n_nonmembers"] == 400 and 150 < over["n_members"] < 250  # Bernoulli(1/2)
    assert all(info["steps"] == 100 and info["sample_rate"] == 0.25 for info in over["models"])
    assert max(a["auc"] for a in over["attacks"].values()) > 0.7
    assert over["attacks"]["lira_online"]["auc"] > 0.7
    assert over["bound"]["epsilon_lb"] > 0.5  # a valid 95 % bound that proves a real leak
    claimed = dp["target"]["epsilon"]
    assert claimed == pytest.approx(1.0, rel=0.02)
    assert all(info["noise_multiplier"] == dp["models"][0]["noise_multiplier"] for info in dp["models"])
    assert dp["bound"]["epsilon_lb"] <= claimed
    for name, a in dp["attacks"].items():
        assert abs(a["auc"] - 0.5) < 0.15, name  # ε = 1 allows up to ≈ 0.73; typical is 0.5 ± 0.05
        assert a["descriptive"] and a["epsilon_lb"] <= claimed, name
        curve = a["curve"]
        assert curve["fpr"][0] == 0 and curve["fpr"][-1] == 1 and len(curve["fpr"]) == len(curve["tpr"])
    bound = dp["bound"]
    assert bound["beta"] == pytest.approx(0.05 / 18) and bound["n_tests"] == 18 and "Bonferroni" in bound["correction"]
    assert len(bound["attacks"]["loss"]["grid"]) == len(audit.GUESS_GRID)


def test_roc_figure_is_log_log_with_the_dp_limit(synthetic_audits):
    dp = synthetic_audits["dp"]
    fig = audit_figures.roc_figure({**dp, "claimed_epsilon": dp["target"]["epsilon"], "delta": 1e-5})
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    names = [t.name for t in fig.data]
    assert any("DP limit" in n for n in names) and sum("AUC" in n for n in names) == 3
    limit = audit_figures.dp_tpr_limit(np.array([0.01, 0.5]), 1.0)
    assert limit[0] == pytest.approx(math.e * 0.01) and limit[1] == pytest.approx(1 - 0.5 / math.e)
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0  # below the plot, not over the curves
    bars = audit_figures.epsilon_figure({**dp, "claimed_epsilon": 1.0})
    assert len(bars.data[0].x) == 3 and "95% joint" in bars.layout.title.text
    assert bars.data[1].x == (1.0,) and "Claimed" in bars.data[1].y[0]


def test_epsilon_figure_writes_every_bound_and_its_share_of_the_claim():
    """At a bound of 0.023 under a claim of 8 the bar is a sliver: the value and its share are written."""
    audit = {"claimed_epsilon": 8.0, "attacks": {"loss": {"epsilon_lb": 0.0}, "lira_online": {"epsilon_lb": 0.023},
                                                 "lira_offline": {"epsilon_lb": 0.0}}}
    fig = audit_figures.epsilon_figure(audit)
    text = list(fig.data[0].text)
    assert text[0] == "ε ≥ 0: no leakage shown (0% of the claim)"
    assert text[1] == "ε ≥ 0.023 (0.3% of the claim)"
    assert fig.data[1].text == ("ε = 8",)
    assert "not private" in audit_figures.epsilon_figure({**audit, "claimed_epsilon": None}).layout.annotations[0].text


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
    text = capsys.readouterr().out
    out = text.strip().splitlines()
    assert re.fullmatch(r"attack_auc \d\.\d\d", out[-1])
    assert any(line.startswith("LiRA online") for line in out)
    assert "Bonferroni over 3 attacks × 6 guess counts" in text and "descriptive" in text and "privacy ledger" in text
    saved = json.loads((store.run_dir(run_id) / "audit.json").read_text())
    assert saved["config"]["shadows"] == 4 and saved["config"]["pool_size"] == 300 and saved["config"]["seed"] == 0
    assert saved["claimed_epsilon"] == pytest.approx(card["epsilon"])
    assert saved["audited_epsilon"] == pytest.approx(card["epsilon"])  # the same (σ, q, T): the same ε
    mech = saved["recipe"]["mechanism"]
    assert (mech["noise_multiplier"], mech["sample_rate"], mech["steps"]) == (
        card["noise_multiplier"], card["sample_rate"], card["steps"])
    assert all(m["steps"] == card["steps"] for m in saved["models"]) and saved["target"]["steps"] == card["steps"]
    assert len(saved["timings"]["per_model_s"]) == 5 and saved["timings"]["total_s"] > 0
    assert set(saved["attacks"]) == set(audit.ATTACKS)
    assert saved["summary"]["epsilon_lb"] <= card["epsilon"] and saved["summary"]["consistent"]
    assert saved["summary"]["confidence"] == 0.95 and saved["summary"]["beta"] == pytest.approx(0.05 / 18)
    assert "no differential-privacy guarantee" in saved["ledger"]["statement"] and saved["ledger"]["non_private_use"]
    assert f"{saved['summary']['attack_auc']:.2f}" == out[-1].split()[1]


def test_the_audit_is_a_ledger_entry_voiding_its_candidates(stored_run, fresh_ledger):
    store, run_id, card = stored_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = audit.audit_run(store, run_id, audit.AuditSettings(shadows=2, seed=2, pool_size=150), save=False)
    ledger = Ledger()
    assert ledger.path == fresh_ledger
    entry = ledger.entry(result["ledger"]["entry"])
    assert entry is not None and entry.kind == "audit" and entry.voids and not entry.guaranteed
    assert entry.run_id.startswith(f"audit-{run_id}-") and entry.n_train <= 150  # identical images merge
    ids = ledger.run_image_ids(entry.run_id)
    exposure = ledger.exposure_of(ids, 1e-5)
    assert len(ids) > 0 and np.isinf(exposure.epsilon).all() and entry.run_id in exposure.void_runs


def test_no_training_without_a_ledger_entry(stored_run, monkeypatch):
    store, run_id, _ = stored_run

    def refuse(self, *args, **kwargs):
        raise LedgerError("the ledger is read-only. Fix: make it writable")

    def never(*args, **kwargs):
        raise AssertionError("trained although the ledger refused the audit")

    monkeypatch.setattr(Ledger, "record_use", refuse)
    monkeypatch.setattr(trainer_module, "fit_arrays", never)
    with pytest.raises(LedgerError, match="read-only"):
        audit.audit_run(store, run_id, audit.AuditSettings(shadows=2, pool_size=100), save=False)


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


def test_the_audit_replays_the_runs_own_recipe(tmp_path, monkeypatch):
    """A full fine-tuning with augmult 2, EMA, a cosine schedule and weight standardisation: every model of
    the audit is trained by fit_arrays with exactly the run's config and (σ, q, T), on a WS model; the head
    proxy keeps the mechanism and records what it cannot replay."""
    from models.factory import WSConv2d

    store = RunStore(tmp_path / "runs")
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", scope="full", epsilon=4.0, epochs=1, batch_size=256,
                    device="cpu", image_size=16, augmult=2, ema_decay=0.9, lr_schedule="cosine",
                    warmup_fraction=0.1, weight_standardization=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train(cfg, store)
    card = run.card
    mechanism = (card["noise_multiplier"], card["sample_rate"], card["steps"])
    calls = []
    real = trainer_module.fit_arrays

    def spy(config, model, x, y, **kwargs):
        calls.append({"config": config, "mechanism": kwargs["mechanism"], "spending": kwargs["spending"],
                      "ws": any(isinstance(m, WSConv2d) for m in model.modules()), "head_only": kwargs["head_only"]})
        return real(config, model, x, y, **kwargs)

    monkeypatch.setattr(trainer_module, "fit_arrays", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = audit.audit_run(store, run.run_id, audit.AuditSettings(shadows=2, pool_size=80), save=False)
    assert len(calls) == 3
    for call in calls:
        assert call["config"] == store.get_run(run.run_id).config == cfg
        assert call["mechanism"] == mechanism and call["ws"] and not call["head_only"]
        assert call["spending"].run_id == full["ledger"]["entry"]
    recipe = full["recipe"]
    assert RunConfig.from_dict(recipe["config"]) == cfg and recipe["proxy"] is None
    assert (recipe["augmult"], recipe["ema_decay"], recipe["lr_schedule"], recipe["weight_standardization"]) == (
        2, 0.9, "cosine", True)
    assert full["audited_epsilon"] == pytest.approx(card["epsilon"])
    assert all(m["steps"] == card["steps"] for m in full["models"])

    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proxy = audit.audit_run(store, run.run_id, audit.AuditSettings(shadows=2, pool_size=80), scope="head",
                                save=False)
    assert len(calls) == 3 and all(c["mechanism"] == mechanism and c["head_only"] for c in calls)
    used = calls[0]["config"]
    assert (used.scope, used.augmult, used.ema_decay, used.lr_schedule) == ("head", 1, 0.9, "cosine")
    assert proxy["recipe"]["proxy"]["from"]["augmult"] == 2 and proxy["config"]["proxy"]
    assert proxy["audited_epsilon"] == pytest.approx(card["epsilon"])
