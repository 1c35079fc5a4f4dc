"""`python -m dpcore runs | card`: the stored runs as a table, one run's model card."""
from __future__ import annotations

import json
from datetime import datetime


def add_commands(subparsers, add_runs_dir) -> dict:
    r = subparsers.add_parser("runs", help="table of stored runs")
    add_runs_dir(r)
    r.add_argument("--ids", action="store_true", help="only the run ids, oldest first, one per line")

    card = subparsers.add_parser("card", help="print a stored run's model card")
    add_runs_dir(card)
    card.add_argument("run_id")
    card.add_argument("--json", action="store_true")
    return {"runs": _cmd_runs, "card": _cmd_card}


def _cmd_runs(args) -> int:
    from dpcore.store.runs import RunStore

    runs = RunStore(args.runs_dir).list_runs()
    if args.ids:
        for r in runs:
            print(r.run_id)
        return 0
    if not runs:
        print(f"no runs in {args.runs_dir}")
        return 0
    head = (f"{'run id':<23} {'status':<9} {'dataset':<14} {'backbone':<22} {'ε':>7} {'per':<7} {'δ':>7} {'acc':>6} "
            f"{'auc':>6} {'secs':>6}  created")
    print(head)
    for r in runs:
        p, m = r.privacy or {}, r.metrics or {}
        eps = f"{p['epsilon']:.3f}" if p.get("epsilon") is not None else ("-" if r.private else "nonDP")
        delta = f"{p['delta']:.0e}" if p.get("delta") else "-"
        unit = (p.get("unit") or "image") if p.get("epsilon") is not None else "-"
        acc = f"{m['accuracy']:.3f}" if m.get("accuracy") is not None else "-"
        auc = f"{m['roc_auc']:.3f}" if m.get("roc_auc") is not None else "-"
        secs = f"{r.duration:.0f}" if r.duration is not None else "-"
        created = datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M")
        print(f"{r.run_id:<23} {r.status:<9} {r.dataset:<14} {r.backbone[:22]:<22} {eps:>7} {unit:<7} {delta:>7} {acc:>6} "
              f"{auc:>6} {secs:>6}  {created}")
    return 0


def _cmd_card(args) -> int:
    from dpcore.cli.train import format_card
    from dpcore.store.runs import RunStore

    card = RunStore(args.runs_dir).card(args.run_id)
    print(json.dumps(card, indent=2) if args.json else format_card(card))
    return 0
