"""`python -m dpcore fairness`: per-subgroup metrics of a stored run, optionally beside a second run."""
from __future__ import annotations

import json
import sys

from dpcore.analysis import fairness as fx


def add_commands(subparsers, add_runs_dir) -> dict:
    p = subparsers.add_parser(
        "fairness", help="per-subgroup accuracy, balanced accuracy, ROC-AUC and recall of a run (sex, age, ...)",
        description="Groups a run's test split by a metadata attribute (HAM10000: sex, age buckets <30/30–44/"
                    "45–59/60–74/75+, localization; a folder data set: the columns of its metadata.csv) and "
                    "prints the metrics per group with the largest gap (max − min over the groups with at least "
                    "--min-group examples; smaller and 'unknown' groups are listed but not in the gap). With "
                    "--against, a second run (e.g. the non-private twin of a DP run) side by side, with the gap "
                    "difference and a paired bootstrap interval. Results are stored in RUN/fairness.json. "
                    "Last line: `fairness {json}` with the largest gaps.")
    add_runs_dir(p)
    p.add_argument("--run", required=True, help="run id (see `runs --ids`); usually the DP run")
    p.add_argument("--against", default=None,
                   help="a second run to compare with (usually the non-private one); 'auto' picks a finished run "
                        "of the other privacy kind on the same data")
    p.add_argument("--attribute", default=None,
                   help="metadata attribute to group by (default: the first of sex, age, localization, ...); "
                        "'all' runs each available attribute")
    p.add_argument("--min-group", type=int, default=fx.DEFAULT_MIN_GROUP,
                   help="groups with fewer test examples are flagged and left out of the gap (default %(default)s)")
    p.add_argument("--positive-class", default=None,
                   help="class whose recall is reported per group (default: mel for HAM10000, when known)")
    p.add_argument("--no-cache", action="store_true", help="recompute the report even if fairness.json has it")
    p.add_argument("--device", default="cpu", help="where to predict when the run has no stored test predictions")
    return {"fairness": _cmd_fairness}


def _cmd_fairness(args) -> int:
    from dpcore.store.runs import RunStore

    store = RunStore(args.runs_dir)
    store.get_run(args.run)  # a clear error for an unknown id
    attrs = fx.run_attributes(store, args.run)
    if not attrs:
        print(f"error: run {args.run} has no per-example metadata to group by (data set "
              f"{store.get_run(args.run).dataset}). Fix: use ham10000, or a folder data set with a metadata.csv",
              file=sys.stderr)
        return 2
    if args.attribute in (None, ""):
        wanted = attrs[:1]
    elif args.attribute == "all":
        wanted = attrs
    else:
        wanted = [args.attribute]
    against = args.against
    if against == "auto":
        against = fx.default_partner(store, args.run)
        if against is None:
            print(f"error: no finished run of the other privacy kind on the same data as {args.run}. Fix: train "
                  "one, or pass --against RUN_ID", file=sys.stderr)
            return 2
    out = []
    for attribute in wanted:
        if against:
            comp = fx.compare(store, args.run, against, attribute, min_group=args.min_group,
                              positive=args.positive_class)
            print(f"== subgroup fairness by {attribute} (min group {args.min_group}) ==")
            print(fx.format_compare(comp))
            out.append(fx.headline(comp))
        else:
            rep = fx.run_fairness(store, args.run, attribute, min_group=args.min_group,
                                  positive=args.positive_class, use_cache=not args.no_cache, device=args.device)
            print(f"== subgroup fairness of {args.run} ({rep['run']['label']}) by {attribute} "
                  f"(min group {args.min_group}) ==")
            print(fx.format_report(rep))
            out.append(fx.headline(rep))
        print()
    print("fairness " + json.dumps(out[0] if len(out) == 1 else out, sort_keys=True, ensure_ascii=False))
    return 0
