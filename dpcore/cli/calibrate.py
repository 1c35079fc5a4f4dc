"""`python -m dpcore temperature RUN_ID`: calibrate a stored run's probabilities (temperature scaling).

Named `temperature` because `calibrate` already calibrates the noise σ for a target ε.
"""
from __future__ import annotations

import json


def add_commands(subparsers, add_runs_dir) -> dict:
    p = subparsers.add_parser(
        "temperature", help="fit a run's softmax temperature on half of its test split (probability calibration)",
        description="Temperature scaling from the run's stored test predictions: T is fitted (minimum NLL) on a "
                    "stratified half of the held-out test split chosen by the run's seed, and ECE, NLL and Brier "
                    "score are reported before and after on the other half. Training images are not used, so the "
                    "DP guarantee is unchanged; the predicted class (accuracy, confusion matrix) never changes. "
                    "Writes RUN/calibration.json and the card's `calibration` field; `predict` and the app then "
                    "return calibrated probabilities. Finished runs are calibrated at the end of training; this "
                    "command is for runs stored earlier. Last line: `calibration {json}`.")
    add_runs_dir(p)
    p.add_argument("run_id", help="run id (see `runs --ids`)")
    return {"temperature": _cmd_temperature}


def _cmd_temperature(args) -> int:
    from dpcore.training.calibration import calibrate_run, card_section
    from dpcore.store.runs import RunStore

    rec = calibrate_run(RunStore(args.runs_dir), args.run_id)
    if rec["method"] != "temperature":
        print(f"not calibrated: {rec['reason']}")
    else:
        print(f"temperature T = {rec['temperature']:.4f} (fitted on {rec['fit_on']})"
              + ("  [at the search bound]" if rec.get("at_bound") else ""))
        print(f"on the other half ({rec['n_eval']} test images), before → after:")
        for name in ("ece", "nll", "brier"):
            print(f"  {name.upper():<6} {rec[name + '_before']:.4f} → {rec[name + '_after']:.4f}")
        print("accuracy and the confusion matrix are unchanged (the predicted class never changes)")
    short = {k: v for k, v in card_section(rec).items() if not k.startswith("bins_")}
    print("calibration " + json.dumps(short, sort_keys=True, ensure_ascii=False))
    return 0
