"""`python -m dpcore ledger`: what every data set has spent, composed by the accountant, against its budget."""
from __future__ import annotations

import json
import math

from .ledger import DatasetSummary, Ledger, LedgerError, backfill


def add_commands(subparsers, add_runs_dir) -> dict:
    p = subparsers.add_parser(
        "ledger", help="privacy spent per data set: runs, composed ε (RDP, PLD), basic-composition bound, budget",
        description="Every run on a data set (identified by a content hash of its training split) is an entry: "
                    "its (σ, q, T, δ), or non-private. The total is the accountant's composition of all entries "
                    "(RDP and PLD, dp-accounting), beside basic composition (Σ ε, Σ δ). Deleted runs keep their "
                    "entries. Last line: `ledger {json}`.")
    add_runs_dir(p)
    p.add_argument("--dataset", default=None, help="a data set's key (prefix) or part of its name (default: all)")
    p.add_argument("--set-budget", type=float, default=None, metavar="EPS",
                   help="set the data set's total ε budget (needs --dataset); 0 removes it")
    p.add_argument("--budget-delta", type=float, default=None, help="δ at which the budget is stated")
    p.add_argument("--accountant", choices=("rdp", "pld"), default=None,
                   help="whose composed ε counts against the budget (default: the tighter of RDP and PLD)")
    p.add_argument("--entries", action="store_true", help="also list every run's entry")
    p.add_argument("--backfill", action="store_true",
                   help="first record the stored runs the ledger does not know yet (e.g. made before it existed), "
                        "from their cards")
    return {"ledger": _cmd_ledger}


def _f(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    return "∞" if math.isinf(v) else f"{v:.{digits}g}"


def _print_summary(s: DatasetSummary, entries: bool, accountant: str | None = None) -> None:
    print(f"== {s.name}  [{s.key[:12]}]")
    print(f"runs      : {s.runs} ({s.private_runs} private, {len(s.non_private_runs)} non-private)")
    if s.void:
        print(f"VOID      : non-private run(s) {', '.join(s.non_private_runs)} used these images without noise: "
              "no DP guarantee holds for this data set any more (ε = ∞)")
    print(f"composed  : ε = {_f(s.epsilon_rdp)} (RDP), {_f(s.epsilon_pld)} (PLD) at δ = {_f(s.delta, 3)}")
    print(f"basic     : ε ≤ {_f(s.basic_epsilon)}, δ ≤ {_f(s.basic_delta, 3)} (sum over runs)")
    if s.budget_epsilon is None:
        print("budget    : none set (python -m dpcore ledger --dataset KEY --set-budget EPS)")
    else:
        spent = s.epsilon_of(accountant)
        by = accountant.upper() if accountant else "tighter of RDP and PLD"
        print(f"budget    : ε = {s.budget_epsilon:g}; spent {_f(spent)} ({by}), "
              f"remaining {_f(s.budget_epsilon - spent)}")
    if entries:
        for e in s.entries:
            what = (f"σ={e.noise_multiplier:.4g} q={e.sample_rate:.4g} T={e.steps} δ={e.delta:g} ε={_f(e.epsilon)}"
                    if e.private and e.steps else f"non-private, {e.steps} steps" if not e.private else "no steps")
            print(f"  {e.run_id}  {e.status:<9} {e.label or '':<24} {what}")


def _cmd_ledger(args) -> int:
    if args.backfill:
        added = backfill(args.runs_dir)
        print(f"backfilled {len(added)} run(s) from their cards" + (f": {', '.join(added)}" if added else ""))
    ledger = Ledger(args.runs_dir)
    try:
        if args.set_budget is not None:
            if not args.dataset:
                raise LedgerError("--set-budget needs --dataset. Fix: name the data set (key prefix or name)")
            key = ledger.resolve(args.dataset)
            ledger.set_budget(key, args.set_budget or None, args.budget_delta)
        keys = [ledger.resolve(args.dataset)] if args.dataset else [d["key"] for d in ledger.datasets()]
    except LedgerError as exc:
        print(f"Error: {exc}")
        return 2
    if not keys:
        print(f"The ledger in {ledger.path} has no entries yet: every training run adds one.")
    summaries = [ledger.summary(k) for k in keys]
    for s in summaries:
        _print_summary(s, args.entries, args.accountant)
    out = {}
    for s in summaries:
        row = s.to_dict()
        row["accountant"] = args.accountant or "min(rdp, pld)"
        row["spent"] = s.epsilon_of(args.accountant)
        row["remaining"] = None if s.budget_epsilon is None else s.budget_epsilon - row["spent"]
        out[s.key] = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}
    print("ledger " + json.dumps(out, sort_keys=True))
    return 0
