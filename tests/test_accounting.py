"""The accounting module must agree with dp-accounting called directly, and calibration must be tight."""
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from dpcore.privacy import accounting
from dpcore.errors import ConfigError

PLANS = [  # (sigma, q, T, delta)
    (1.1, 0.01, 10000, 1e-5),
    (0.8, 0.05, 500, 1e-6),
    (2.0, 0.2, 100, 1e-5),
    (4.0, 1 / 6, 60, 1e-4),
]


def _direct(kind, sigma, q, T, delta):
    acc = (rdp.RdpAccountant(orders=accounting.RDP_ORDERS) if kind == "rdp"
           else pld.PLDAccountant(value_discretization_interval=accounting.PLD_DISCRETIZATION))
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), T))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma,q,T,delta", PLANS)
@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting(kind, sigma, q, T, delta):
    assert accounting.epsilon(sigma, q, T, delta, kind) == pytest.approx(_direct(kind, sigma, q, T, delta), rel=1e-12)


@pytest.mark.parametrize("sigma,q,T,delta", PLANS[:2])
def test_library_default_orders_and_discretization_agree(sigma, q, T, delta):
    # RDP uses the library's default accountant; the coarser PLD grid must stay within 0.1% of
    # the library's default 1e-4 grid.
    default_rdp = rdp.RdpAccountant()
    default_rdp.compose(accounting.dp_sgd_event(sigma, q, T))
    assert accounting.epsilon(sigma, q, T, delta, "rdp") == default_rdp.get_epsilon(delta)
    fine = pld.PLDAccountant()
    fine.compose(accounting.dp_sgd_event(sigma, q, T))
    assert accounting.epsilon(sigma, q, T, delta, "pld") == pytest.approx(fine.get_epsilon(delta), rel=1e-3)


def test_pld_is_tighter_than_rdp():
    for sigma, q, T, delta in PLANS:
        assert accounting.epsilon(sigma, q, T, delta, "pld") <= accounting.epsilon(sigma, q, T, delta, "rdp")


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize("target,q,T", [(0.5, 0.2, 100), (2.0, 0.01, 10000), (8.0, 1 / 6, 90)])
def test_calibration_is_safe_and_tight(kind, target, q, T):
    sigma = accounting.calibrate_noise(target, 1e-5, q, T, kind)
    eps = _direct(kind, sigma, q, T, 1e-5)
    assert eps <= target
    assert eps >= 0.99 * target


def test_tracker_matches_fresh_accountant_at_every_checkpoint():
    tracker = accounting.EpsilonTracker(1.3, 0.05, 1e-5, "rdp")
    for T in [1, 2, 17, 100, 1000]:
        assert tracker(T) == pytest.approx(_direct("rdp", 1.3, 0.05, T, 1e-5), rel=1e-12)
    assert tracker(0) == 0.0


def test_curve_is_increasing_and_ends_at_plan():
    curve = accounting.epsilon_curve(1.0, 0.1, 300, 1e-5, "rdp")
    steps, eps = zip(*curve)
    assert steps[0] == 1 and steps[-1] == 300
    assert all(b >= a for a, b in zip(eps, eps[1:]))
    assert eps[-1] == pytest.approx(accounting.epsilon(1.0, 0.1, 300, 1e-5), rel=1e-12)


def test_plan_reports_epsilon_of_calibrated_sigma():
    p = accounting.plan(1.0, 1e-5, 0.1, 200, "rdp")
    assert p.epsilon == pytest.approx(_direct("rdp", p.noise_multiplier, 0.1, 200, 1e-5), rel=1e-12)
    assert p.epsilon <= 1.0


def test_no_noise_means_no_guarantee():
    assert math.isinf(accounting.epsilon(0.0, 0.1, 10, 1e-5))
    assert accounting.epsilon(1.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.parametrize("kwargs,field", [
    (dict(noise_multiplier=1, sample_rate=0, steps=10, delta=1e-5), "sample_rate"),
    (dict(noise_multiplier=1, sample_rate=0.1, steps=10, delta=1.5), "delta"),
    (dict(noise_multiplier=-1, sample_rate=0.1, steps=10, delta=1e-5), "noise_multiplier"),
    (dict(noise_multiplier=1, sample_rate=0.1, steps=10, delta=1e-5, accountant="gdp"), "accountant"),
])
def test_bad_inputs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        accounting.epsilon(**kwargs)
    assert err.value.field == field


def test_sampling_plan_matches_opacus_poisson_rate():
    sp = accounting.sampling_plan(1437, 256, 15)
    assert sp.steps_per_epoch == 6 and sp.sample_rate == 1 / 6 and sp.steps == 90


def test_epsilon_grid_cells_equal_the_accountant():
    grid = accounting.epsilon_grid(5000, 1.2, 1e-5, [100, 500], [1, 3])
    for row, epochs in zip(grid, [1, 3]):
        for value, b in zip(row, [100, 500]):
            sp = accounting.sampling_plan(5000, b, epochs)
            assert value == pytest.approx(_direct("rdp", 1.2, sp.sample_rate, sp.steps, 1e-5), rel=1e-12)
