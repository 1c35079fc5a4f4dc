"""The inverse question: the smallest ε that reaches a target metric, read from the measured frontier."""
import math

import pytest

from dpcore.errors import DPCoreError
from dpcore.analysis.frontier import parse_target, smallest_epsilon


def _pts(*pairs, metric="accuracy", unit="image"):
    return [{"epsilon": e, metric: m, "run_id": f"r{e:g}", "unit": unit} for e, m in pairs]


def test_a_measured_point_that_hits_the_target_exactly_is_the_answer():
    a = smallest_epsilon(_pts((0.5, 0.7), (1.0, 0.9), (4.0, 0.95)), "accuracy", 0.9)
    assert a.kind == "measured" and a.epsilon == a.measured_epsilon == 1.0 and a.used == ["r1"]
    assert "measured" in a.sentence and "per image" in a.sentence and "90.0 %" in a.sentence


def test_the_smallest_measured_epsilon_already_reaching_it_says_a_smaller_one_may_do():
    a = smallest_epsilon(_pts((1.0, 0.92), (4.0, 0.95)), "accuracy", 0.9)
    assert a.kind == "measured" and a.epsilon == 1.0 and "No smaller ε was measured" in a.sentence


def test_between_two_runs_the_answer_is_interpolated_in_log_epsilon_and_names_them():
    a = smallest_epsilon(_pts((1.0, 0.8), (4.0, 1.0)), "accuracy", 0.9)
    assert a.kind == "interpolated" and a.epsilon == pytest.approx(2.0)  # halfway in log ε between 1 and 4
    assert a.measured_epsilon == 4.0 and a.used == ["r1", "r4"] and a.below["run_id"] == "r1"
    assert "interpolation" in a.sentence and "r1" in a.sentence and "r4" in a.sentence
    b = smallest_epsilon(_pts((0.5, 0.6), (2.0, 0.8), (8.0, 0.9)), "accuracy", 0.75)
    expected = math.exp(math.log(0.5) + 0.75 * (math.log(2.0) - math.log(0.5)))
    assert b.epsilon == pytest.approx(expected) and b.used == ["r0.5", "r2"]


def test_an_unreachable_target_names_the_best_run_and_the_ceiling():
    ceiling = [{"epsilon": None, "accuracy": 0.93, "run_id": "np"}]
    a = smallest_epsilon(_pts((1.0, 0.7), (8.0, 0.85), (4.0, 0.86)), "accuracy", 0.9, ceiling)
    assert a.kind == "unreachable" and a.epsilon is None and a.best["run_id"] == "r4"
    assert "No DP run reaches" in a.sentence and "86.0 %" in a.sentence and "np" in a.sentence
    above = smallest_epsilon(_pts((1.0, 0.7)), "accuracy", 0.95, ceiling)
    assert "itself below the target" in above.sentence


def test_a_non_monotone_frontier_gives_the_conservative_answer():
    # 0.91 at ε=1 is noise: ε=2 falls below 0.9 again; from ε=4 on every run reaches it
    a = smallest_epsilon(_pts((0.5, 0.6), (1.0, 0.91), (2.0, 0.88), (4.0, 0.92), (8.0, 0.95)), "accuracy", 0.9)
    assert not a.monotone and a.kind == "interpolated" and a.measured_epsilon == 4.0
    assert a.used == ["r2", "r4"] and 2.0 < a.epsilon < 4.0
    assert "does not rise steadily" in a.sentence and "conservative" in a.sentence
    top = smallest_epsilon(_pts((1.0, 0.91), (8.0, 0.88)), "accuracy", 0.9)
    assert top.kind == "unstable" and top.epsilon is None and "does not rise steadily" in top.sentence


def test_a_single_point_and_no_point():
    one = _pts((2.0, 0.9), metric="roc_auc", unit="patient")
    a = smallest_epsilon(one, "roc_auc", 0.85)
    assert a.kind == "measured" and a.epsilon == 2.0 and "per patient" in a.sentence and "0.900" in a.sentence
    assert smallest_epsilon(one, "roc_auc", 0.95).kind == "unreachable"
    none = smallest_epsilon([{"epsilon": math.inf, "roc_auc": 0.9}], "roc_auc", 0.5)
    assert none.kind == "none" and none.epsilon is None


def test_mixed_privacy_units_are_refused():
    with pytest.raises(DPCoreError, match="privacy units"):
        smallest_epsilon(_pts((1.0, 0.9)) + _pts((2.0, 0.9), unit="patient"), "accuracy", 0.8)


def test_targets_parse_as_fractions_or_percent():
    assert parse_target("accuracy=0.9") == ("accuracy", 0.9)
    assert parse_target("accuracy=90%") == ("accuracy", pytest.approx(0.9))
    assert parse_target("auc=0.95") == ("roc_auc", 0.95) == parse_target("roc_auc=0.95")
    for bad in ("accuracy", "speed=0.9", "accuracy=ninety", "accuracy=90"):
        with pytest.raises(DPCoreError, match="Fix"):
            parse_target(bad)


def test_the_cli_answers_from_the_stored_runs(tmp_path, capsys):
    import json

    from dpcore.cli.main import main
    from dpcore.config import RunConfig
    from dpcore.store.runs import RunStore

    store = RunStore(tmp_path)
    for eps, acc in ((1.0, 0.8), (4.0, 1.0), (None, 0.99)):
        run_id = store.create_run(RunConfig(dataset="digits", backbone="tiny_cnn", scope="head", epsilon=eps))
        store.record_results(run_id, {"accuracy": acc}, {"private": eps is not None, "epsilon": eps, "unit": "image"})
        store.set_status(run_id, "running")
        store.set_status(run_id, "done")
    assert main(["frontier", "--runs-dir", str(tmp_path), "--target", "accuracy=90%"]) == 0
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1].removeprefix("frontier "))
    assert last["kind"] == "interpolated" and last["epsilon"] == pytest.approx(2.0) and last["measured_epsilon"] == 4.0
    assert "interpolation" in out and "costs privacy too" in out and "digits / tiny_cnn / scope head" in out
    assert main(["frontier", "--runs-dir", str(tmp_path), "--target", "speed=1"]) == 2
