"""`python -m dpcore frontier`: the smallest ε that reaches a target metric, from the stored runs of one group."""
from __future__ import annotations

import json

from dpcore.errors import DPCoreError
from dpcore.analysis.frontier import METRICS, fmt_value, parse_target, smallest_epsilon

LEDGER_NOTE = ("Choosing ε by looking at these results costs privacy too: each run of the sweep spent its own budget "
               "on the same training images, and the privacy-budget ledger already counts every one of them "
               "(`python -m dpcore ledger`).")


def add_commands(subparsers, add_runs_dir) -> dict:
    p = subparsers.add_parser(
        "frontier", help="the smallest ε whose runs reach a target accuracy or ROC-AUC (from stored runs)",
        description="Reads the finished runs of one data set / backbone / scope / weights (default: the group of "
                    "the most recently finished run), lists the frontier and answers: the smallest measured ε that "
                    "reaches the target, interpolated in log ε between the two runs around it; conservative when "
                    "the measured metric does not rise with ε. Last line: `frontier {json}`.")
    add_runs_dir(p)
    p.add_argument("--target", required=True, help="METRIC=VALUE, e.g. accuracy=0.9, accuracy=90%%, roc_auc=0.95 "
                                                   f"(metrics: {', '.join(METRICS)})")
    p.add_argument("--dataset", default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--scope", default=None, help="full | head | last-k ... (default: any)")
    p.add_argument("--pretrained", default=None, help="weight source of the runs (default: any)")
    return {"frontier": _cmd_frontier}


def _cmd_frontier(args) -> int:
    from dpcore.analysis import run_review
    from dpcore.store.runs import RunStore

    metric, target = parse_target(args.target)
    store = RunStore(args.runs_dir)
    dataset, backbone, scope, pretrained = args.dataset, args.backbone, args.scope, args.pretrained
    if dataset is None or backbone is None:
        default = run_review.default_frontier_group(store)
        if default is None:
            raise DPCoreError(f"no finished run in {store.root}. Fix: train a sweep first "
                              "(`python -m dpcore sweep --non-private ...`)")
        if dataset is None and backbone is None:
            dataset, backbone = default[0], default[1]
            scope = default[2] if scope is None else scope
            pretrained = default[3] if pretrained is None else pretrained
        else:
            raise DPCoreError("pass both --dataset and --backbone (or neither: the latest finished run's group)")
    dp, plain = run_review.frontier_points(store, dataset, backbone, scope, pretrained)
    print(f"frontier of {dataset} / {backbone} / scope {scope or 'any'} / weights {pretrained or 'any'}: "
          f"{len(dp)} DP run(s), {len(plain)} non-private")
    rows = [(p, f"ε = {p['epsilon']:.3g} per {p.get('unit') or 'image'}") for p in sorted(dp, key=lambda p: p["epsilon"])]
    for p, eps in rows + [(p, "non-private") for p in plain]:
        print(f"  {p['run_id']}  {eps:<22} {METRICS[metric]} {fmt_value(metric, p.get(metric))}")
    answer = smallest_epsilon(dp, metric, target, plain)
    print(answer.sentence)
    print(LEDGER_NOTE)
    print("frontier " + json.dumps({"metric": metric, "target": target, "kind": answer.kind,
                                    "epsilon": answer.epsilon, "measured_epsilon": answer.measured_epsilon,
                                    "unit": answer.unit, "monotone": answer.monotone, "runs": answer.used}))
    return 0
