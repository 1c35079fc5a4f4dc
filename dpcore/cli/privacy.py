"""Privacy commands of `python -m dpcore`: `audit` (membership-inference audit of a run's recipe).

Structure: each command is one `_add_<name>(subparsers, add_runs_dir)` function that declares its parser
and one `_cmd_<name>(args) -> int` handler; `_COMMANDS` lists them and `add_commands` (called by
dpcore.cli.main) registers them all. To add a command, write both functions and add one line to `_COMMANDS`.
"""
from __future__ import annotations

import sys
import warnings


# -- audit ----------------------------------------------------------------------------------------
def _add_audit(subparsers, add_runs_dir) -> None:
    p = subparsers.add_parser(
        "audit", help="membership-inference audit of a run's mechanism (loss attack + LiRA, one-run ε bound)",
        description="Replays the run's mechanism with the trainer's own loop (its config and, if private, its "
                    "(σ, q, T)): a target on the candidates (train ∪ test) each included with probability 1/2 and S "
                    "shadow models on random halves; runs the loss-threshold and LiRA attacks and prints AUC and "
                    "TPR at 1% / 0.1% FPR (descriptive) and the one-run ε lower bound (Steinke et al. 2023; 95% "
                    "jointly, Bonferroni over 3 attacks × 6 guess counts) next to the claimed ε. The audit is "
                    "recorded in the privacy ledger as a non-private use of the candidate images (their per-image "
                    "ε becomes void). Stored as RUN_DIR/audit.json.")
    add_runs_dir(p)
    p.add_argument("--run", required=True, help="run id (see `runs --ids`)")
    p.add_argument("--shadows", type=int, default=8, help="shadow models S (default %(default)s; 8-16 usual)")
    p.add_argument("--seed", type=int, default=0, help="membership draws and model inits (default %(default)s)")
    p.add_argument("--pool-size", type=int, default=None,
                   help="at most this many candidates (random subset of train ∪ test; default: all, and never more "
                        "than 1/(2δ), which the one-run bound needs)")
    p.add_argument("--scope", default=None, choices=("head",),
                   help="head: audit the head-only proxy on cached features (default: the run's own scope)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print the whole audit as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _cmd_audit(args) -> int:
    import json

    from dpcore.analysis.audit import AuditSettings, audit_run, format_table
    from dpcore.store.runs import RunStore

    store = RunStore(args.runs_dir)
    settings = AuditSettings(shadows=args.shadows, seed=args.seed, pool_size=args.pool_size, device=args.device)

    def progress(done: int, total: int, message: str) -> None:
        if not args.quiet:
            print(f"[{done}/{total}] {message}", file=sys.stderr, flush=True)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        audit = audit_run(store, args.run, settings, scope=args.scope, progress=progress, log=log)
    if args.json:
        print(json.dumps(audit, indent=2, default=str))
    else:
        print(format_table(audit))
        print(f"audit: {store.run_dir(args.run) / 'audit.json'}")
    print(f"attack_auc {audit['summary']['attack_auc']:.2f}")
    return 0


# -- registry -------------------------------------------------------------------------------------
# name -> (declare the parser, handler)
_COMMANDS = {
    "audit": (_add_audit, _cmd_audit),
}


def add_commands(subparsers, add_runs_dir) -> dict:
    """Called by dpcore.cli.main.build_parser: declare every command here and return {name: handler}."""
    handlers = {}
    for name, (declare, handler) in _COMMANDS.items():
        declare(subparsers, add_runs_dir)
        handlers[name] = handler
    return handlers
