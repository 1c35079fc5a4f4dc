"""How much faster is one DP-SGD run on N processes (torchrun, `dpcore.privacy.distributed`) than on one?

    python -m bench.distributed [--processes 2] [--backbone resnet18] [--image-size 32] [--epochs 2] [--pairs 2]

The same run (digits, bundled; random init; same seed, ε, batch) is launched in turn as one process with all
the cores (torch's threads), as one process with one thread (small models: torch's thread pool can cost more
than it gives on 2 cores), and as N processes under torchrun (each with cores/N threads), `--pairs` rounds.
The time compared is the training loop's: from the first to the last step event of each stored run (the
set-up — imports, data, ledger — is left out, as it does not depend on N). Both runs must report the same
(σ, q, T, ε). Last line: `distributed_speedup X`: the faster one-process median step time ÷ the N-process one.
On a GPU machine pass `--device cuda`: one GPU against N GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpcore.store.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]


def _run(args, processes: int, threads: int, runs: Path, ledger: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DPCORE_LEDGER=str(ledger), OMP_NUM_THREADS=str(threads))
    train = ["-m", "dpcore", "train", "--runs-dir", str(runs), "--dataset", "digits", "--backbone", args.backbone,
             "--pretrained", "none", "--image-size", str(args.image_size), "--epochs", str(args.epochs),
             "--batch-size", str(args.batch_size), "--max-physical-batch-size", str(args.physical_batch),
             "--epsilon", "2", "--device", args.device, "--seed", "0", "--quiet"]
    cmd = [sys.executable, *train] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *train]
    before = {r.run_id for r in RunStore(runs).list_runs()} if runs.exists() else set()
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.time() - t0
    store = RunStore(runs)
    new = [r for r in store.list_runs() if r.run_id not in before]
    if out.returncode != 0 or len(new) != 1 or new[0].status != "done":
        raise SystemExit(f"the {processes}-process run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    steps = store.events(new[0].run_id, "step")
    loop = steps[-1].elapsed - steps[0].elapsed
    p = store.card(new[0].run_id)["privacy"]
    return {"processes": processes, "threads": threads, "wall_s": wall, "steps": len(steps), "step_s": loop / max(len(steps) - 1, 1),
            "mechanism": [p["noise_multiplier"], p["sample_rate"], p["steps"], p["epsilon"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--physical-batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--json", help="also write the measurements here")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    configs = [(1, cores), (1, 1), (args.processes, max(1, cores // args.processes))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs, ledger = Path(tmp) / "runs", Path(tmp) / "ledger.sqlite"
        for i in range(args.pairs):  # rotate the order, so that machine load hits every configuration alike
            for n, threads in configs[i % 3:] + configs[:i % 3]:
                row = _run(args, n, threads, runs, ledger)
                rows.append(row)
                print(f"{n} process(es) × {threads} thread(s): {row['steps']} steps, {row['step_s']:.3f} s/step "
                      f"(loop), wall {row['wall_s']:.1f} s; σ, q, T, ε = {row['mechanism']}", flush=True)
    if any(r["mechanism"] != rows[0]["mechanism"] for r in rows):
        raise SystemExit("the runs did not train the same mechanism (σ, q, T, ε)")
    med = {c: statistics.median(r["step_s"] for r in rows if (r["processes"], r["threads"]) == c) for c in configs}
    s1, sn = min(med[configs[0]], med[configs[1]]), med[configs[2]]
    print(f"{args.backbone} {args.image_size} px, batch {args.batch_size} (physical {args.physical_batch}), "
          f"{args.device}, {cores} cores, medians of {args.pairs}: "
          + ", ".join(f"{n} process(es) × {t} thread(s) {v:.3f} s/step" for (n, t), v in med.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"distributed_speedup {s1 / sn:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
