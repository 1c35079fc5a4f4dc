"""Multi-process DP-SGD (`dpcore.privacy.distributed`, torchrun, gloo on this CPU): the same mechanism as one process.

The mechanism checks run in `tests/distributed_checks.py` under torchrun; the end-to-end tests launch
`torchrun ... -m dpcore train` exactly as a user does and read what rank 0 stored.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from dpcore.privacy import distributed
from dpcore.config import RunConfig
from dpcore.errors import ConfigError
from dpcore.privacy.ledger import Ledger
from dpcore.store.runs import RunStore, StoreError
from dpcore.training.trainer import BatchedTensorDataset, train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--dataset", "digits", "--backbone", "tiny_cnn", "--pretrained", "none", "--image-size", "16",
          "--batch-size", "256", "--device", "cpu", "--seed", "3"]
LAUNCH_TIMEOUT = 300  # a loaded 2-core machine: two processes importing torch, opacus and timm


def torchrun(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out


# -- pieces, in one process ------------------------------------------------------------------------------
def test_from_env_reads_torchrun_and_nothing_else():
    assert distributed.from_env({}) is None
    assert distributed.from_env({"WORLD_SIZE": "1"}) is None
    w = distributed.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", distributed.VERIFY_ENV: "1"})
    assert (w.rank, w.size, w.local_rank, w.verify, w.is_main) == (3, 4, 1, True, False)
    with pytest.raises(ConfigError, match="RANK"):
        distributed.from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.from_env({"WORLD_SIZE": "two"})


def test_shards_are_disjoint_and_cover_every_row():
    data = BatchedTensorDataset(torch.arange(11).unsqueeze(1), torch.arange(11))
    rows = [distributed.shard(data, distributed.World(rank=r, size=3, local_rank=r)).tensors[1].tolist()
            for r in range(3)]
    assert sorted(sum(rows, [])) == list(range(11))
    assert [len(r) for r in rows] == [4, 4, 3]


def test_what_a_multi_process_run_refuses_is_said_before_it_starts():
    with pytest.raises(ConfigError, match="patient-level"):
        distributed.refuse(RunConfig(dataset="ham10000", privacy_unit="patient"), resume=False, kind="train")
    with pytest.raises(ConfigError, match="resume"):
        distributed.refuse(RunConfig(), resume=True, kind="train")


def test_under_torchrun_only_train_runs(tmp_path, monkeypatch, capsys):
    from dpcore.cli import main as cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["sweep", "--dataset", "digits", "--epsilons", "1,2", "--runs-dir", str(tmp_path)]) == 2
    assert "only `train` runs under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "index.sqlite").exists()


# -- the mechanism, on 2 processes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_checks")
    log = finish(torchrun(str(ROOT / "tests" / "distributed_checks.py"), str(out)))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1) if (out / f"rank{r}.json").exists()]
    assert len(ranks) == 2, log[-3000:]
    return ranks


def test_each_example_is_sampled_at_rate_q_across_the_processes(checks):
    n, q, steps = 200, 0.1, 400
    counts = [torch.tensor(r["sampling"]["counts"]) for r in checks]
    assert not ((counts[0] > 0) & (counts[1] > 0)).any(), "an example was sampled by both processes"
    total = counts[0] + counts[1]
    assert (total > 0).all(), "some example was never in any logical batch"
    mean = float(total.sum()) / (n * steps)
    sd = (q * (1 - q) / (n * steps)) ** 0.5
    assert abs(mean - q) < 5 * sd, (mean, q)
    # Each example's count is Binomial(400, 0.1): mean 40, sd 6; 10 or 80 are > 5 sd away.
    assert 10 < float(total.min()) and float(total.max()) < 80
    for r in checks:  # every process takes every logical step, empty local batches included
        assert r["sampling"]["batches"] == steps
        assert r["sampling"]["loader_rate"] == q


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_noise_is_drawn_once_per_step_with_std_sigma_c_over_the_global_batch(checks, mode):
    a, b = (r["noise"][mode] for r in checks)
    assert (a["draws"], b["draws"]) == (1, 0), "only rank 0 draws noise (after the ledger counted the step)"
    assert a["checksum"] == b["checksum"], "the ranks applied different updates"
    expected = a["expected_std"]  # σC / (n·q): not √2 larger (noise drawn twice) nor per-rank normalised
    assert abs(a["std"] / expected - 1) < 0.03, (a["std"], expected)
    assert abs(a["mean"]) < 5 * expected / 100  # 20,000 entries: the mean's sd is expected / 141


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_without_noise_two_processes_make_the_one_process_update(checks, mode):
    for r in checks:
        e = r["exact"][mode]
        assert e["moved"] > 1e-3  # the steps did something
        assert e["max_diff"] < 1e-6 * max(1.0, e["moved"] * 100)
    assert checks[0]["exact"]["bk"]["verified_steps"] == checks[1]["exact"]["bk"]["verified_steps"] == 8


# -- whole runs, launched as a user does -----------------------------------------------------------------
def _only_run(runs: Path):
    records = RunStore(runs).list_runs()
    assert len(records) == 1, [r.run_id for r in records]
    return records[0]


def test_a_two_process_run_has_the_one_process_guarantee_and_one_ledger_entry(tmp_path, fresh_ledger):
    runs = tmp_path / "runs"
    out = finish(torchrun("-m", "dpcore", "train", *DIGITS, "--epochs", "2", "--epsilon", "2", "--runs-dir",
                          str(runs), env={distributed.VERIFY_ENV: "1"}))
    rec = _only_run(runs)
    assert rec.status == "done", out[-3000:]
    card = RunStore(runs).card(rec.run_id)
    p = card["privacy"]
    spread = card["training"]["distributed"]
    assert spread["processes"] == 2 and spread["backend"] == "gloo"
    assert spread["replicas_verified_steps"] == p["steps"], "parameters identical on both ranks after every step"
    assert "× 2 processes" in out
    entries = Ledger(fresh_ledger).entries()
    assert [e.run_id for e in entries] == [rec.run_id]  # rank 0 alone writes the ledger
    assert entries[0].steps == p["steps"]

    one = train(RunConfig(dataset="digits", backbone="tiny_cnn", pretrained="none", image_size=16, batch_size=256,
                          device="cpu", seed=3, epochs=2, epsilon=2.0), RunStore(tmp_path / "one"))
    q = one.card["privacy"]
    for key in ("noise_multiplier", "sample_rate", "steps", "epsilon", "delta", "accountant", "expected_batch_size"):
        assert p[key] == q[key], key
    assert "distributed" not in one.card["training"]


def test_a_two_process_non_private_run_trains_on_the_whole_batch(tmp_path, fresh_ledger):
    runs = tmp_path / "runs"
    out = finish(torchrun("-m", "dpcore", "train", *DIGITS, "--epochs", "3", "--non-private", "--runs-dir",
                          str(runs), env={distributed.VERIFY_ENV: "1"}))
    rec = _only_run(runs)
    assert rec.status == "done", out[-3000:]
    card = RunStore(runs).card(rec.run_id)
    assert card["training"]["distributed"]["replicas_verified_steps"] == card["privacy"]["steps"] == 18
    losses = [e.loss for e in RunStore(runs).events(rec.run_id, "step")]
    assert all(v is not None for v in losses) and losses[-1] < losses[0]  # the summed loss of both shares
    assert card["test_accuracy"] > 0.5


def _pid_of_rank(mark: str, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("DPCORE_TEST_MARK") == mark and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return int(proc.name)
    return None


def _wait_for_steps(runs: Path, proc: subprocess.Popen, n: int) -> str:
    deadline = time.time() + LAUNCH_TIMEOUT
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:  # rank 0 may be creating the index right now: a half-made one reads as "not yet"
            records = RunStore(runs, readonly=True).list_runs() if (runs / "index.sqlite").exists() else []
            if records and len(RunStore(runs, readonly=True).events(records[0].run_id, "step")) >= n:
                return records[0].run_id
        except StoreError:
            pass
        time.sleep(0.3)
    raise AssertionError("the run did not start within the timeout")


def test_a_killed_process_ends_the_run_with_a_clear_message_and_no_hang(tmp_path, fresh_ledger):
    runs, mark = tmp_path / "runs", uuid.uuid4().hex
    proc = torchrun("-m", "dpcore", "train", *DIGITS, "--epochs", "400", "--epsilon", "2", "--runs-dir", str(runs),
                    env={"DPCORE_TEST_MARK": mark})
    try:
        run_id = _wait_for_steps(runs, proc, 3)
        pid = _pid_of_rank(mark, 1)
        assert pid is not None, "rank 1's process was not found"
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        out = finish(proc, timeout=120)
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert waited < 120
    rec = RunStore(runs).get_run(run_id)
    assert rec.status == "failed", out[-3000:]
    assert "another process of this run stopped, was killed or did not answer" in rec.error
    entry = [e for e in Ledger(fresh_ledger).entries() if e.run_id == run_id][0]
    assert entry.steps >= len(RunStore(runs).events(run_id, "step"))  # every step taken is counted


def test_sigterm_to_the_launcher_cancels_every_process_after_the_same_step(tmp_path, fresh_ledger):
    runs = tmp_path / "runs"
    proc = torchrun("-m", "dpcore", "train", *DIGITS, "--epochs", "400", "--epsilon", "2", "--runs-dir", str(runs))
    try:
        run_id = _wait_for_steps(runs, proc, 3)
        proc.send_signal(signal.SIGTERM)  # what the app's Cancel button does to the job's process
        out = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    rec = RunStore(runs).get_run(run_id)
    assert rec.status == "cancelled", out[-3000:]
    card = RunStore(runs).card(rec.run_id)
    entry = [e for e in Ledger(fresh_ledger).entries() if e.run_id == run_id][0]
    assert entry.steps == card["privacy"]["steps"] > 0


# -- the app's path: a queued job spread over processes ----------------------------------------------------
def test_the_job_queue_runs_a_job_over_two_processes_and_streams_rank_0s_events(tmp_path, fresh_ledger):
    from dpcore.training.jobs import JobManager

    manager = JobManager(RunStore(tmp_path / "runs"))
    job = manager.submit(RunConfig(dataset="digits", backbone="tiny_cnn", pretrained="none", image_size=16,
                                   batch_size=256, device="cpu", epochs=1, epsilon=2.0), processes=2)
    done = manager.wait(job.run_id, timeout=LAUNCH_TIMEOUT)
    assert done.status == "done", done.error
    card = RunStore(tmp_path / "runs").card(job.run_id)
    assert card["training"]["distributed"]["processes"] == 2
    kinds = [e.kind for e in job.events.snapshot()]
    assert kinds.count("plan") == 1 and kinds.count("finished") == 1  # rank 0's events only
    assert kinds.count("step") == card["privacy"]["steps"]


def test_a_patient_level_job_is_refused_before_it_is_queued(tmp_path):
    from dpcore.training.jobs import JobManager

    manager = JobManager(RunStore(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="patient-level"):
        manager.submit(RunConfig(dataset="ham10000", privacy_unit="patient"), processes=2)
    assert RunStore(tmp_path / "runs").list_runs() == []


def test_a_killed_launcher_stops_its_processes_and_the_run_is_stored(tmp_path, fresh_ledger):
    runs, mark = tmp_path / "runs", uuid.uuid4().hex
    proc = torchrun("-m", "dpcore", "train", *DIGITS, "--epochs", "400", "--epsilon", "2", "--runs-dir", str(runs),
                    env={"DPCORE_TEST_MARK": mark})
    try:
        run_id = _wait_for_steps(runs, proc, 3)
        ranks = [_pid_of_rank(mark, r) for r in (0, 1)]
        assert None not in ranks
        proc.kill()  # torchrun itself, not its ranks (each runs in a session of its own)
        proc.communicate(timeout=30)
        deadline = time.time() + 120
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ranks):
            time.sleep(0.5)
    finally:
        for pid in [p for p in (_pid_of_rank(mark, 0), _pid_of_rank(mark, 1)) if p]:
            os.kill(pid, signal.SIGKILL)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks), "the ranks trained on without their launcher"
    rec = RunStore(runs).get_run(run_id)
    assert rec.status == "cancelled", rec.error
    entry = [e for e in Ledger(fresh_ledger).entries() if e.run_id == run_id][0]
    assert entry.steps == RunStore(runs).card(run_id)["privacy"]["steps"] > 0

