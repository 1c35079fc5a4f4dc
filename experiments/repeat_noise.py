"""Retrain an experiment's private arms N more times: each run draws fresh secret noise and sampling (the seed
fixes only init, augmentation and splits), so the spread across runs is the spread of the DP mechanism itself.

    python -m experiments.repeat_noise image-vs-patient-dp --repeats 2 --runs-dir R

Prints, per arm, the experiment's own run plus the repeats: mean ± sd of accuracy, balanced accuracy and
ROC-AUC; the repeats are ordinary stored runs (not tagged as the experiment's, so its table is unchanged).
"""
from __future__ import annotations

import argparse
import json
import statistics
import warnings

from dpcore.analysis import experiments as ex
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

METRICS = ("accuracy", "balanced_accuracy", "roc_auc")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args(argv)
    exp = ex.load_experiment(args.name)
    store = RunStore(args.runs_dir)
    comp = ex.comparison(exp, store)
    out = {}
    for arm, row in zip(exp.arms, comp.rows):
        if not arm.private or row["status"] != "done":
            continue
        cfg = exp.config(arm, args.data_root, args.runs_dir)
        values = {m: [row[m]] for m in METRICS}
        for _ in range(args.repeats):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                card = train(cfg, store).card
            for m in METRICS:
                values[m].append(card["test_metrics"].get(m))
        out[arm.label] = {m: {"mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                              "n": len(v), "values": v} for m, v in values.items()}
        print(f"{arm.label:<36} " + "  ".join(f"{m} {out[arm.label][m]['mean']:.4f} ± {out[arm.label][m]['sd']:.4f}"
                                              for m in METRICS), flush=True)
    print("repeats " + json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
