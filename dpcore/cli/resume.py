"""`python -m dpcore resume RUN_ID`: continue a killed, crashed or cancelled run from its last checkpoint; and
the signal handling that makes SIGTERM / SIGINT end a command-line run as cancelled, cleanly."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def cancel_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT (Ctrl-C) while inside: the trainer stops at its next batch and stores
    the run as cancelled (with its ledger entry's exact count) instead of dying mid-write."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield cancel
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: cancel.set())
    try:
        yield cancel
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_commands(subparsers, add_runs_dir) -> dict:
    p = subparsers.add_parser(
        "resume", help="continue a killed, crashed or cancelled run from its last checkpoint",
        description="Continues a stored run that was killed, crashed or cancelled, from the checkpoint it wrote "
                    "(every $DPCORE_CHECKPOINT_EVERY seconds, default 300): weights, optimizer, EMA, the public "
                    "random state and the step, with the same plan (σ, q, T) and FRESH secret noise and sampling. "
                    "The card's ε is that of the T steps that produced the model; the privacy ledger records the "
                    "remaining steps as a new entry (RUN_ID+resumeN), so steps taken after the checkpoint and "
                    "before the stop count twice. SIGTERM / Ctrl-C cancel it cleanly (resumable again).")
    add_runs_dir(p)
    p.add_argument("run_id", help="the run to continue (see `runs`)")
    p.add_argument("--quiet", action="store_true", help="print only warnings and the card")
    return {"resume": _cmd_resume}


def _cmd_resume(args) -> int:
    from dpcore.cli.train import train_and_print
    from dpcore.store.runs import RunStore

    store = RunStore(args.runs_dir)
    store.reap_orphans()  # a killed run still marked running is failed now (its process is gone)
    record = store.get_run(args.run_id)
    if record.status not in ("failed", "cancelled"):
        print(f"error: run {args.run_id} is {record.status}; only a failed or cancelled run can be resumed. Fix: "
              "wait for it to end (or cancel it), then resume it")
        return 2
    return train_and_print(record.config, store, quiet=args.quiet, run_id=args.run_id, resume=True)
