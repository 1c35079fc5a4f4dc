"""Training in a worker process, supervised by the job manager's thread.

Why: in the app's own process the trainer shared the GIL with Streamlit re-rendering the watched page every
second, so watching a run slowed it 3-14x (issue 15). Here each run is `python -m dpcore.training.worker` in a child
process: it trains with the ordinary `dpcore.training.trainer.train` (which records everything in the run store and the
privacy ledger as usual) and prints its events as JSON lines on stdout; the parent only forwards them to the
job's listener. Cancel is a signal (SIGTERM, then SIGKILL after a grace period); a child that dies without
finishing (kill -9, out of memory, a segfault) has its run marked failed with the reason, and the app goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from dpcore.config import RunConfig
from dpcore.errors import DPCoreError
from dpcore.store.events import Event
from dpcore.store.runs import RunStore

ROOT = Path(__file__).resolve().parents[2]
EVENT_PREFIX = "@@dpcore-event "
GRACE_S = 20.0  # after SIGTERM: time to stop at the next batch and store the run as cancelled
TERMINAL = ("finished", "failed", "cancelled")


class WorkerFailed(DPCoreError):
    """The run failed (the trainer's own error) or its process died; the run store says so too."""


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def death_reason(returncode: int, stderr_tail: str = "") -> str:
    """Plain words for a worker that ended without recording an outcome."""
    if returncode < 0:
        name = _signal_name(returncode)
        why = {"SIGKILL": "killed (out of memory, or by a user)", "SIGSEGV": "crashed (segmentation fault)",
               "SIGABRT": "aborted", "SIGBUS": "crashed (bus error)"}.get(name, "stopped by a signal")
        text = f"the training process was {why}: {name}"
    else:
        text = f"the training process exited with code {returncode} without recording an outcome"
    tail = stderr_tail.strip().splitlines()[-3:]
    return text + (" — last output: " + " | ".join(tail) if tail else "")


def train_in_worker(config: RunConfig, store: RunStore, listener=None, cancel: threading.Event | None = None,
                    run_id: str | None = None, processes: int = 1, **kwargs):
    """`dpcore.training.trainer.train` in a child process: same arguments, same result (a TrainResult), same
    failure (raises when the run failed). Blocks until the child has ended.

    ``processes`` > 1: the child is torchrun on this machine, starting that many training processes (one per
    GPU; `dpcore.privacy.distributed`); cancelling sends it SIGTERM, which it passes on to every one of them."""
    from dpcore.training.trainer import TrainResult

    run_id = run_id or store.create_run(config)
    cancel = cancel or threading.Event()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "dpcore.training.worker", "--runs-dir", str(store.root), "--run-id", run_id,
           "--options", json.dumps(kwargs)]
    if processes > 1:  # every process reads the config from the store: stdin reaches only one of them
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(int(processes)),
               *cmd[1:], "--config-from-store"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=os.getcwd(), bufsize=1)  # relative data and runs paths as the app sees them
    proc.stdin.write(config.to_json())
    proc.stdin.close()
    stderr_tail: deque[str] = deque(maxlen=40)
    err_reader = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True,
                                  name=f"dpcore-worker-stderr-{run_id}")
    err_reader.start()
    stopper = threading.Thread(target=_stop_on_cancel, args=(proc, cancel), daemon=True,
                               name=f"dpcore-worker-cancel-{run_id}")
    stopper.start()
    last: Event | None = None
    for line in proc.stdout:
        if not line.startswith(EVENT_PREFIX):
            continue
        try:
            event = Event.from_dict(json.loads(line[len(EVENT_PREFIX):]))
        except (ValueError, TypeError):
            continue
        if event.kind in TERMINAL:
            last = event
        if listener is not None:
            listener(event)
    returncode = proc.wait()
    err_reader.join(timeout=5)
    if last is None:  # died before recording an outcome: the store must not say "running" forever
        killed_on_cancel = cancel.is_set() and returncode < 0
        status = "cancelled" if killed_on_cancel else "failed"
        reason = ("cancelled: the training process did not stop within "
                  f"{GRACE_S:.0f} s and was killed" if killed_on_cancel else death_reason(returncode,
                                                                                          "".join(stderr_tail)))
        _record_death(store, run_id, status, reason)
        if listener is not None:
            listener(Event("failed" if status == "failed" else "cancelled", run_id, message=reason))
        if status == "failed":
            raise WorkerFailed(reason)
        return TrainResult(run_id, "cancelled", {})
    if last.kind == "failed":
        raise WorkerFailed(last.message or "the run failed")
    card = (last.data or {}).get("card") or {}
    return TrainResult(run_id, "done" if last.kind == "finished" else "cancelled", card)


def _stop_on_cancel(proc: subprocess.Popen, cancel: threading.Event) -> None:
    while proc.poll() is None:
        if cancel.wait(0.2):
            break
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the child sets its cancel flag: the trainer stops at the next batch
    try:
        proc.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()


def _record_death(store: RunStore, run_id: str, status: str, reason: str) -> None:
    try:  # unless the child recorded its own outcome; replaces a reaper's generic reason; ends at the last event
        store.record_death(run_id, status, reason)
    except Exception as exc:  # noqa: BLE001 - a broken store must not take the app down; say so
        print(f"dpcore: run {run_id}: {reason}; recording it failed too ({type(exc).__name__}: {exc})",
              file=sys.stderr)


# -- the child ------------------------------------------------------------------------------------------
def _emit(event: Event) -> None:
    try:
        sys.stdout.write(EVENT_PREFIX + json.dumps(event.to_dict()) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # the parent is gone: the run store still gets every event
        pass


THREADS_ENV = "DPCORE_WORKER_THREADS"


def _leave_a_core() -> None:
    """Torch's threads: all cores but one, which stays with the app and the browser drawing the live page.
    On a 2-core machine two torch threads fighting a re-rendering page for the same cores were measured far
    slower than one (bench/watch_ratio.py); $DPCORE_WORKER_THREADS overrides it."""
    import torch

    wanted = os.environ.get(THREADS_ENV)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))  # torchrun: the cores are shared by its processes
    n = int(wanted) if wanted else max(1, ((os.cpu_count() or 1) - 1) // local)
    torch.set_num_threads(max(1, n))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpcore.training.worker", description="one training run (internal)")
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--config-from-store", action="store_true", help="read the run's config from the store "
                        "(torchrun: several processes), not from stdin")
    args = parser.parse_args(argv)
    store = RunStore(args.runs_dir)
    config = store.get_run(args.run_id).config if args.config_from_store else RunConfig.from_json(sys.stdin.read())
    _leave_a_core()
    cancel = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: cancel.set())
    from dpcore.privacy.distributed import from_env
    from dpcore.training.trainer import resolve_device, train

    world = from_env()
    try:
        if world is not None:
            world.init(resolve_device(config.device))
        train(config, store, listener=_emit if world is None or world.is_main else None, cancel=cancel,
              run_id=args.run_id, world=world, **json.loads(args.options))
    except BaseException:  # noqa: BLE001 - the trainer stored the failure and emitted "failed"
        import traceback

        traceback.print_exc(limit=4)
        return 1
    finally:
        if world is not None:
            world.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
