"""An experiment's arms as the rows the Experiments page shows (dpcore.analysis.experiment_arms)."""
from __future__ import annotations

from types import SimpleNamespace as NS

from dpcore.analysis import experiments as ex
from dpcore.analysis.experiment_arms import arm_rows


def test_arm_rows_name_changes_references_and_reported_weights():
    exp = NS(arms=[NS(label="non-private", overrides={"epsilon": None}, reference={}, report=None),
                   NS(label="ε=8 EMA", overrides={"epsilon": 8.0, "ema_decay": 0.999},
                      reference={"accuracy": 0.81, "source": "De et al."}, report="ema"),
                   NS(label="base", overrides={}, reference={}, report="raw")])
    assert arm_rows(exp) == [
        {"arm": "non-private", "changes from the base": "epsilon=non-private", "reported elsewhere": "—",
         "reports": "the run's own"},
        {"arm": "ε=8 EMA", "changes from the base": "epsilon=8.0, ema_decay=0.999",
         "reported elsewhere": "accuracy 0.81", "reports": "EMA weights"},
        {"arm": "base", "changes from the base": "—", "reported elsewhere": "—",
         "reports": "raw (last-iterate) weights"}]


def test_arm_rows_of_a_shipped_experiment():
    exp = dict(ex.list_experiments())["dp-vs-nonprivate"]
    rows = arm_rows(exp)
    assert len(rows) == len(exp.arms) and rows[0] == {"arm": "DP · ε=0.5", "changes from the base": "epsilon=0.5",
                                                      "reported elsewhere": "—", "reports": "the run's own"}
