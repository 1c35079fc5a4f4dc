"""`python -m dpcore experiment ...`: list, run and tabulate the named experiments (experiments/*.toml)."""
from __future__ import annotations

import json
import sys
import warnings

from dpcore.analysis import experiments as ex
from dpcore.store.events import Event


def add_commands(subparsers, add_runs_dir) -> dict:
    p = subparsers.add_parser(
        "experiment", help="run a named experiment (experiments/NAME.toml) and print its comparison table",
        description="Named, versioned experiments: every arm trains as a stored run tagged with the experiment. "
                    "Arms that already have a finished run of this version are skipped (--rerun trains them again).")
    add_runs_dir(p)
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="the experiments, their versions and what this machine lacks")
    p.add_argument("--table", action="store_true", help="only print the comparison table from stored runs")
    p.add_argument("--data-root", default=None,
                   help="folder that relative data paths resolve against (default: $DPCORE_SHARED_DATA or "
                        "../shared/data)")
    p.add_argument("--only", default=None, help="comma-separated arm labels (an arm's file label takes all its ε)")
    p.add_argument("--dry-run", action="store_true", help="print the arms' run configs and what is missing; train nothing")
    p.add_argument("--rerun", action="store_true", help="train arms again even when a finished run exists")
    p.add_argument("--experiments-dir", default=None, help="folder of experiment files (default: experiments/)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    p.add_argument("--allow-over-budget", action="store_true",
                   help="train arms even if they take an image past a data set's privacy budget (recorded)")
    return {"experiment": _cmd_experiment}


class _ArmPrinter:
    """Progress of each arm: its plan, evaluations and end (steps are left to the app)."""

    def __init__(self, labels: dict[str, str]):
        self.labels = labels

    def __call__(self, ev: Event) -> None:
        label = self.labels.get(ev.run_id, ev.run_id)
        if ev.kind == "plan":
            d = ev.data
            sigma = f", σ={d['noise_multiplier']:.4f}" if "noise_multiplier" in d else ""
            print(f"[{label}] plan: {d.get('n_train')} train images, {d.get('total_steps')} steps{sigma}", flush=True)
        elif ev.kind == "eval" and ev.metrics:
            m = ev.metrics
            auc = f"{m['roc_auc']:.4f}" if m.get("roc_auc") is not None else "n/a"
            print(f"[{label}] eval @ step {ev.step}/{ev.total_steps}: accuracy {m['accuracy']:.4f}, ROC-AUC {auc}",
                  flush=True)
        elif ev.kind in ("failed", "cancelled") or (ev.kind == "log" and ev.run_id.startswith("pretrain-")):
            print(f"[{label}] {ev.kind if ev.kind != 'log' else ''} {ev.message or ''}".replace("  ", " "), flush=True)


def _list(args) -> int:
    items = ex.list_experiments(args.experiments_dir)
    if not items:
        print(f"no experiments in {ex.experiments_dir(args.experiments_dir)}")
        return 0
    for name, exp in items:
        if isinstance(exp, ex.ExperimentError):
            print(f"{name:<34} INVALID  {exp}")
            continue
        missing = ex.check_needs(exp, args.data_root, args.runs_dir)
        state = "ready" if not missing else "missing: " + "; ".join(missing)
        print(f"{name:<34} v{exp.version:<3} {len(exp.arms):>3} arms  {state}")
    return 0


def _cmd_experiment(args) -> int:
    from dpcore.store.runs import RunStore

    if args.list:
        return _list(args)
    if not args.name:
        print("error: name an experiment (python -m dpcore experiment --list shows them)", file=sys.stderr)
        return 2
    exp = ex.load_experiment(args.name, args.experiments_dir)
    if args.dry_run:
        print(f"{exp.name} v{exp.version}: {exp.title}")
        if exp.pretrain is not None:
            print(f"pretrain: {exp.pretrain.backbone} on {exp.pretrain.dataset} ({exp.pretrain.data_dir}), "
                  f"{exp.pretrain.epochs} epochs, non-private -> {exp.weights_path(args.runs_dir)}")
        for arm, cfg in exp.configs(args.data_root, args.runs_dir, args.only):
            print(f"arm {arm.label!r}: {json.dumps(cfg.to_dict(), sort_keys=True)}")
        missing = ex.check_needs(exp, args.data_root, args.runs_dir, arms=exp.select(args.only))
        print("needs: " + ("all present" if not missing else "MISSING\n  - " + "\n  - ".join(missing)))
        return 0
    store = RunStore(args.runs_dir)
    if not args.table:
        labels: dict[str, str] = {}
        printer = None if args.quiet else _ArmPrinter(labels)

        def listener(ev: Event) -> None:
            if printer is not None:
                if ev.run_id not in labels and not ev.run_id.startswith("pretrain-"):
                    tag = ex.read_tags(store.root).get(ev.run_id)
                    labels[ev.run_id] = tag["arm"] if tag else ev.run_id
                printer(ev)

        def on_arm(label, point) -> None:
            acc = f"{point.accuracy:.4f}" if point.accuracy is not None else "-"
            eps = f"{point.epsilon:.4f}" if point.epsilon is not None else "nonDP"
            print(f"[{label}] {point.status}: ε spent {eps}, accuracy {acc}  ({point.run_id})", flush=True)

        print(f"experiment {exp.name} v{exp.version}: {len(exp.select(args.only))} arm(s)", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the trainer reports warnings as events and in the card
            comp = ex.run_experiment(exp, store, data_root=args.data_root, only=args.only, rerun=args.rerun,
                                     allow_over_budget=args.allow_over_budget,
                                     listener=listener, on_arm=on_arm)
    else:
        comp = ex.comparison(exp, store)
    print(f"== {exp.name} v{exp.version}: {exp.title} ==")
    print(ex.format_table(comp))
    print("headline " + json.dumps(comp.headline(), sort_keys=True, ensure_ascii=False))
    wanted = exp.select(args.only)
    return 0 if args.table or all(r["status"] == "done" for r in comp.rows if r["arm"] in {a.label for a in wanted}) else 1
