"""Run under torchrun (2 processes, gloo): the DP-SGD mechanism of a multi-process run, checked on each rank.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_checks.py OUT_DIR

Each rank writes OUT_DIR/rank<R>.json; ``tests/test_distributed.py`` asserts on them. The checks use the
trainer's own `privatize(..., world=...)`, i.e. the code a torchrun `python -m dpcore train` runs.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from dpcore.privacy import distributed
from dpcore.training.trainer import BatchedTensorDataset, privatize


def _sgd(model, lr=1.0):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def sampling(world, n=200, q=0.1, steps=400) -> dict:
    """Rows carry their own index: count how often each global row is drawn, and the batches per rank."""
    data = BatchedTensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.zeros(n, dtype=torch.long))
    model = nn.Linear(1, 2)
    _, _, _, loader, _ = privatize(model, _sgd(model), data, sample_rate=q, noise_multiplier=1.0, clip_norm=1.0,
                                   world=world)
    loader.batch_sampler.steps = steps
    counts, batches, empty = torch.zeros(n), 0, 0
    for x, _ in loader:
        counts[x[:, 0].long()] += 1
        batches += 1
        empty += int(len(x) == 0)
    return {"counts": counts.tolist(), "batches": batches, "empty": empty, "loader_rate": loader.sample_rate}


def noise(world, mode: str, sigma=1.5, clip=2.0, n=64, q=0.25) -> dict:
    """Zero inputs: every clipped gradient is 0, so one step moves the weights by -lr·noise/(n·q) exactly."""
    torch.manual_seed(0)
    model = nn.Linear(200, 100, bias=False)
    nn.init.zeros_(model.weight)
    data = BatchedTensorDataset(torch.zeros(n, 200), torch.zeros(n, dtype=torch.long))
    draws = []
    _, module, opt, loader, crit = privatize(
        model, _sgd(model), data, sample_rate=q, noise_multiplier=sigma, clip_norm=clip, grad_sample_mode=mode,
        before_noise=(lambda: draws.append(1)) if world.is_main else None, world=world)
    loader.batch_sampler.steps = 1
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        if len(y) == 0 and mode != "bk":
            for p in module.parameters():
                p.grad_sample = torch.zeros((0, *p.shape))
        else:
            crit(module(x), y).backward()
        opt.step()
    w = model.weight.detach().double().flatten()
    return {"std": float(w.std()), "mean": float(w.mean()), "expected_std": sigma * clip / int(n * q),
            "draws": len(draws), "checksum": float((w * torch.arange(len(w), dtype=torch.float64)).sum())}


def exact_update(world, mode: str, n=48) -> dict:
    """σ = 0 and q = 1 (every row in every batch): the 2-process update must be the 1-process one."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    results = {}
    for name, w in (("single", None), ("multi", world)):
        model = copy.deepcopy(base)
        _, module, opt, loader, crit = privatize(
            model, _sgd(model, lr=0.5), BatchedTensorDataset(x, y), sample_rate=1.0, noise_multiplier=0.0,
            clip_norm=0.1, grad_sample_mode=mode, world=w)
        loader.batch_sampler.steps = 3
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            crit(module(xb), yb).backward()
            opt.step()
        results[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    verified = world.verified_steps
    return {"max_diff": float((results["single"] - results["multi"]).abs().max()),
            "moved": float((results["single"] - torch.cat([p.detach().flatten() for p in base.parameters()])).abs().max()),
            "verified_steps": verified}


def main(out: str) -> None:
    world = distributed.from_env()
    assert world is not None, "run under torchrun with 2 processes"
    world.backend = "gloo"
    world.verify = True
    world.init()
    try:
        result = {"rank": world.rank, "size": world.size, "sampling": sampling(world),
                  "noise": {m: noise(world, m) for m in ("hooks", "bk")},
                  "exact": {m: exact_update(world, m) for m in ("hooks", "bk")}}
    finally:
        world.close()
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
