"""`python -m dpcore reindex`: rebuild (or check) a runs folder's index from its run folders."""
from __future__ import annotations

import json

from dpcore.store.runs import RunStore, StoreCorruptError, StoreError, reindex

_SOURCES = {"card": "from its card (finished)", "old index": "from the old index",
            "folder": "incomplete: no card, marked failed"}


def add_commands(subparsers, add_runs_dir) -> dict:
    p = subparsers.add_parser(
        "reindex", help="rebuild the runs index (index.sqlite) from the run folders, e.g. after a crash damaged it",
        description="Rebuilds RUNS_DIR/index.sqlite from the run folders: each holds config.json, and card.json "
                    "once the run finished (done or cancelled; a folder without a card is recorded as failed). "
                    "Whatever the old index still holds (run rows, step events) is kept; events it lost are gone "
                    "(cards, weights and metrics are in the folders). The old file is moved aside as "
                    "index.damaged-TIME.sqlite (index.old-TIME.sqlite if it was sound), never deleted. Stop the app "
                    "and any training first. Last line: `reindex {json}`.")
    add_runs_dir(p)
    p.add_argument("--check", action="store_true",
                   help="only check the index (SQLite's quick_check of every table, and that it opens); change nothing")
    return {"reindex": _cmd_reindex}


def _cmd_check(runs_dir: str) -> int:
    try:
        store = RunStore(runs_dir, readonly=True)
        result = store.check()
        n = len(store.list_runs())
    except StoreCorruptError as exc:
        print(f"index damaged: {exc}")
        print("reindex " + json.dumps({"check": "damaged", "runs_dir": runs_dir}))
        return 1
    if result != ["ok"]:
        print(f"index damaged: SQLite's check says {'; '.join(result[:5])}. Fix: python -m dpcore reindex "
              f"--runs-dir {runs_dir}")
        print("reindex " + json.dumps({"check": "damaged", "runs_dir": runs_dir, "problems": result[:20]}))
        return 1
    print(f"index sound: {store.db_path} lists {n} run(s)")
    print("reindex " + json.dumps({"check": "ok", "runs_dir": runs_dir, "runs": n}))
    return 0


def _cmd_reindex(args) -> int:
    if args.check:
        return _cmd_check(args.runs_dir)
    try:
        report = reindex(args.runs_dir)
    except StoreError as exc:
        print(f"Error: {exc}")
        return 2
    print(f"reindex: rebuilt {report.root / 'index.sqlite'} from {len(report.runs)} run folder(s)")
    if report.old_index is not None:
        print(f"old index: {report.old_state}; moved to {report.old_index} (not deleted)")
    else:
        print("old index: none was there")
    for run_id, status, source in report.runs:
        print(f"  {run_id}  {status:<9} {_SOURCES.get(source, source)}")
    lost = report.events_lost
    if report.events_kept:
        print(f"events: kept for {len(report.events_kept)} run(s) from the old index")
    if lost:
        print(f"events: LOST for {len(lost)} run(s) (the old index could not give them): their step-by-step "
              "loss and ε curves are gone; their cards, weights, test predictions and metrics are intact")
    for folder, why in report.skipped:
        print(f"skipped : {folder}: {why}")
    if report.dropped:
        print(f"dropped : {len(report.dropped)} run(s) of the old index have no folder any more: "
              + ", ".join(report.dropped[:10]))
    print("reindex " + json.dumps({
        "runs_dir": str(report.root), "old_state": report.old_state,
        "old_index": str(report.old_index) if report.old_index else None,
        "runs": {rid: {"status": status, "source": source} for rid, status, source in report.runs},
        "events_kept": report.events_kept, "events_lost": lost,
        "skipped": dict(report.skipped), "dropped": report.dropped}, sort_keys=True))
    return 0
