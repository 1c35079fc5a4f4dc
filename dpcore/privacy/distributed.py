"""One DP-SGD run across several processes (``torchrun``): the pieces the trainer needs and nothing else.

The mechanism must stay the one the accountant is given, whatever the number of processes:

* **Sampling.** The training rows are cut into fixed, disjoint shards (rows ``rank, rank + W, ...``: public,
  from the user's split); each process Poisson-samples *its* shard with the same q from its own secret,
  OS-seeded generator. Each example is therefore in a logical batch with probability q, independently,
  as in one process. Every process takes exactly 1/q logical steps per epoch, an empty batch included
  (Opacus' own distributed sampler skips empty local batches, which would desynchronise the processes).
* **Noise.** Only rank 0 draws it (σ·C, once per logical step, on its own clipped sum), after the privacy
  ledger has counted the step; the other ranks add none. Every rank divides by the *global* expected batch
  size n·q and the clipped sums are then added across ranks (one all-reduce of one flat buffer): the update
  is (Σ clipped + N(0, σ²C²)) / (n·q) on every rank, exactly the single-process update.
* **Agreement.** The same all-reduce carries a stop flag (any rank's cancel request), so every rank stops
  after the same step; a rank that dies makes the collective fail on the others, which end the run with a
  `DistributedFailure` instead of waiting (sockets close at once; a stuck rank hits the timeout).

Rank 0 alone writes: the run store, the privacy ledger entry, the card, checkpoints and events.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from dpcore.errors import ConfigError, DPCoreError

TIMEOUT_ENV = "DPCORE_DIST_TIMEOUT"  # seconds a collective waits for a stuck peer (default 1800)
SETUP_TIMEOUT_ENV = "DPCORE_DIST_SETUP_TIMEOUT"  # rank 0 preparing data first (feature extraction): default 6 h
VERIFY_ENV = "DPCORE_DIST_VERIFY"  # "1": check after every step that all ranks hold identical parameters
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_SETUP_TIMEOUT_S = 6 * 3600.0


class DistributedFailure(DPCoreError):
    """Another process of this run stopped, was killed, or disagreed: the run is ended on every rank."""


@dataclass
class World:
    """This process's place in a multi-process run (from torchrun's environment)."""

    rank: int
    size: int
    local_rank: int
    backend: str = "gloo"
    verify: bool = False
    stop_agreed: bool = False  # set by the last all-reduce: some rank asked to stop
    verified_steps: int = 0
    steps: int = 0  # gradient sums taken (= logical steps), for messages
    _control: Any = None  # a gloo group with a long timeout, for objects and the setup barrier

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What the card records: how the run was spread (the mechanism does not depend on it)."""
        return {"processes": self.size, "backend": self.backend,
                "nodes": int(os.environ.get("GROUP_WORLD_SIZE") or os.environ.get("NNODES") or 0) or None,
                "sampling": "each process Poisson-samples its own shard of the training rows at rate q",
                "noise": "drawn once per logical step, on rank 0, after the ledger counted the step",
                "replicas_verified_steps": self.verified_steps if self.verify else None}

    # -- set-up --------------------------------------------------------------------------------------
    def init(self, device: torch.device | None = None) -> "World":
        """Join the process group; with `device` (the run's), over its backend (NCCL for CUDA, else gloo)."""
        if device is not None:
            self.backend = backend_for(device)
        _stop_with_the_launcher()
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=_seconds(TIMEOUT_ENV,
                                                                                              DEFAULT_TIMEOUT_S)))
        self._control = dist.new_group(backend="gloo", timeout=datetime.timedelta(
            seconds=_seconds(SETUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S)))
        return self

    def close(self) -> None:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank; CPU stays CPU."""
        if device.type != "cuda":
            return device
        if torch.cuda.device_count() <= self.local_rank:
            raise ConfigError("device", f"process {self.rank} needs GPU {self.local_rank} but this machine has "
                              f"{torch.cuda.device_count()}", "start no more processes per node than GPUs "
                              "(--nproc-per-node)")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 prepares the data first (downloads, decoded and cached features); the others then read its
        caches instead of racing it for the same files."""
        if not self.is_main:
            self._barrier("while rank 0 prepared the data")
        try:
            yield
        finally:
            if self.is_main:
                self._barrier("while the other processes prepared the data")

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        self._collective(lambda: dist.broadcast_object_list(box, src=0, group=self._control), "while sharing the run id")
        return box[0]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank before the first step (same seed or not)."""
        for t in [*module.parameters(), *module.buffers()]:
            self._collective(lambda t=t: dist.broadcast(t.data, src=0), "while sharing the initial weights")

    def _barrier(self, what: str) -> None:
        self._collective(lambda: dist.barrier(group=self._control), what)

    # -- every step -----------------------------------------------------------------------------------
    def sum_gradients(self, params: Iterable[torch.nn.Parameter], stop: bool, *,
                      extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Add every rank's ``p.grad`` (and ``extra``) in ONE all-reduce; agree on stopping. Returns the summed
        ``extra``. A parameter without a gradient on this rank contributes zeros."""
        params = [p for p in params if p.requires_grad]
        ref = params[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        parts = [g.reshape(-1).to(ref.dtype) for g in grads]
        if extra is not None:
            parts.append(extra.reshape(-1).to(device=ref.device, dtype=ref.dtype))
        parts.append(torch.tensor([1.0 if stop else 0.0], device=ref.device, dtype=ref.dtype))
        flat = torch.cat(parts)
        self.steps += 1
        self._collective(lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM), f"during step {self.steps}")
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        summed_extra = None
        if extra is not None:
            summed_extra = flat[offset:offset + extra.numel()].view_as(extra)
            offset += extra.numel()
        self.stop_agreed = bool(flat[offset] > 0)
        return summed_extra

    def verify_identical(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Every rank holds bit-identical parameters (elementwise max == min == own), else fail the run."""
        step = self.steps
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        hi, lo = flat.clone(), flat.clone()
        self._collective(lambda: dist.all_reduce(hi, op=dist.ReduceOp.MAX), f"while checking the replicas at step {step}")
        self._collective(lambda: dist.all_reduce(lo, op=dist.ReduceOp.MIN), f"while checking the replicas at step {step}")
        if not (torch.equal(hi, flat) and torch.equal(lo, flat)):
            raise DistributedFailure(f"the {self.size} processes hold different parameters after step {step} "
                                     f"(largest difference {float((hi - lo).abs().max()):.3g}): the run is ended. "
                                     "Fix: run every process from the same code and library versions")
        self.verified_steps += 1

    def _collective(self, fn: Callable[[], Any], what: str) -> None:
        try:
            fn()
        except DistributedFailure:
            raise
        except (RuntimeError, ValueError) as exc:  # gloo/nccl: a closed connection, a reset peer, a timeout
            raise DistributedFailure(
                f"process {self.rank} of {self.size}: another process of this run stopped, was killed or "
                f"did not answer {what} ({type(exc).__name__}: {_first_line(exc)}); the run is ended on "
                "every process. Fix: see that process's own output (out of memory, a killed job, a lost node), "
                "then start the run again") from exc


def _stop_with_the_launcher() -> None:
    """torchrun starts each rank in a session of its own: if torchrun itself is killed (SIGKILL, a lost terminal),
    the ranks would train on without it. On Linux each rank asks for SIGTERM when its parent dies, which the
    command line turns into a cancel: every rank stops after the same step and rank 0 stores the run."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def from_env(environ=None) -> World | None:
    """The torchrun world this process belongs to, or None in a plain single process."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE") or 1)
        rank = int(env.get("RANK") or 0)
        local = int(env.get("LOCAL_RANK") or 0)
    except ValueError as exc:
        raise ConfigError("WORLD_SIZE", f"torchrun's environment is not readable ({exc})",
                          "launch with torchrun (or unset WORLD_SIZE, RANK and LOCAL_RANK)") from exc
    if size <= 1:
        return None
    if not 0 <= rank < size:
        raise ConfigError("RANK", f"rank {rank} is outside a world of {size}", "launch with torchrun")
    return World(rank=rank, size=size, local_rank=local, verify=env.get(VERIFY_ENV) == "1")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def shard(dataset, world: World):
    """Rows ``rank, rank + W, ...`` of a tensor data set: disjoint shards whose union is every row."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        raise TypeError(f"cannot shard a {type(dataset).__name__}: a tensor data set is needed")
    return type(dataset)(*(t[world.rank::world.size] for t in tensors))


def distribute_optimizer(optimizer, world: World, wants_stop: Callable[[], bool]) -> None:
    """Make an Opacus DP optimizer (hooks or book-keeping) add noise on rank 0 only and sum the ranks'
    normalised, clipped gradients before each real update; every rank then applies the same update."""
    own_noise = optimizer.add_noise  # on rank 0: the ledger-guarded noise draw

    def add_noise_once() -> None:
        if world.is_main:
            own_noise()
        else:
            for p in optimizer.params:
                p.grad = p.summed_grad.view_as(p).clone()

    def step(closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if not optimizer.pre_step():  # a skipped (accumulating) physical batch: nothing crosses processes
            return None
        world.sum_gradients(optimizer.params, wants_stop())
        out = optimizer.original_optimizer.step()
        if world.verify:
            world.verify_identical(optimizer.params)
        return out

    optimizer.add_noise = add_noise_once
    optimizer.step = step


def refuse(config, *, resume: bool, kind: str) -> None:
    """What a multi-process run does not do (yet): say so before anything starts."""
    if config.privacy_unit == "patient":
        raise ConfigError("privacy_unit", "patient-level DP samples patients in one process; it is not spread "
                          "across processes", "train patient-level runs in one process (plain python -m dpcore "
                          "train), or use --privacy-unit image")
    if resume:
        raise ConfigError("resume", "a run is resumed in one process", "resume without torchrun")
    if kind != "train":
        raise ConfigError("kind", f"{kind} runs are not spread across processes", "run it in one process")


def _seconds(env: str, default: float) -> float:
    try:
        return float(os.environ.get(env) or default)
    except ValueError as exc:
        raise ConfigError(env, f"{os.environ.get(env)!r} is not a number of seconds", f"unset {env} or give "
                          "seconds") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    line = line.split(". This is typically")[0]  # gloo's advice to read the other worker's log: said below
    return line[:300]
