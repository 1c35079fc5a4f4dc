"""DP-SGD step time vs non-private step time, per physical and per logical step, per grad_sample_mode.

    python -m bench.step_ratio                 # the way users train (CPU: ~5-8 min on 2 cores): TRAINER_PLAN
    python -m bench.step_ratio --quick         # a fast smoke run
    python -m bench.step_ratio --device cuda   # the same at 224 px (CUDA_TRAINER_PLAN)
    python -m bench.step_ratio --write-table   # rank all modes (FULL_PLAN / CUDA_PLAN) into bench/grad_modes.json
    python -m bench.step_ratio --plan mobile --scope full,last-k --modes hooks,bk --write-table --merge
                                               # EfficientNet-Lite / MobileNets; keep the table's other entries
    python -m bench.step_ratio --plan resnet18@64@128@4 --modes bk   # MODEL@SIZE@PHYSICAL_BATCHES[@K]

A *physical step* = forward + backward + optimizer step on one fixed batch (random images, 10 classes,
SGD); for DP that includes per-example gradients (or norms), clipping, the Gaussian noise (sigma = 1)
and the scaling. A *logical step* (plan entries with K > 1, or ``--accumulate K``) = K physical batches
and ONE optimizer step, as DP-SGD with large logical batches trains (De et al. 2022) and as the trainer
does: the non-private run sums its gradients, the DP run clips each physical batch into Opacus' running
sum (skipped steps) and draws the noise once. Both are timed, side by side, with the same physical and
logical batch for DP and non-private. The default run (no --plan / --quick / --write-table) is
``TRAINER_PLAN``: resnet18, tf_efficientnet_lite0, vit_tiny and BEiT-base at the trainer's defaults
(``dpcore.config.RunConfig``: full fine-tuning, physical batch 128, logical batch 256 = K 2; BEiT-base at
physical batch 16) but small images (64 px for the CNNs, 32 px for the transformers: 224 px is ~15-25 s
per physical batch of 128 on this 2-core CPU), each with the mode the trainer picks (``--modes auto``:
``dpcore.privacy.grad_modes.choose_grad_sample_mode``; hooks then only checks gradients, untimed).

Models come from ``models.create_model`` (random init: the step time does not depend on the weights),
i.e. already Opacus-compatible (GroupNorm, ...). Backbones the registry does not know yet
(``EXTRA_TIMM``) are built with ``timm.create_model`` and ``models.make_opacus_compatible``; ``--bn
folded`` instead gives the pretrained form of tf_efficientnet_lite0 / mobilenetv2_100 / mobilenetv1_100
(``models.bn_fold``: each BatchNorm folded into the conv before it, which gets a bias; the norm becomes
its activation). Every (model, batch, mode) configuration is warmed up, then the configurations are
timed *interleaved* (round-robin: each one's physical step, then each one's logical step, per round)
so that machine noise hits them alike; the table shows medians, and the markdown copy each DP
configuration's spread ((max - min) / median of its step times). A mode is *eligible* only if its
clipped, summed gradient (noise 0) equals the hooks mode's on the same batch (relative L2 error < 1e-4
on CPU, 5e-3 on CUDA where cuDNN/cuBLAS use TF32 by default), or, where float32 hooks is itself that
far off, hooks' in float64 (dropout off in both: the check compares clipping, not mask draws). A mode
whose warm-up step is > 3x the hooks one is timed once only.

The last line printed is the headline ``step_ratio X.XX (...)``: DP / non-private time of one logical
step on the default path = resnet18 at 64 px, physical batch 128, K = 2 (logical batch 256), full
fine-tuning, with the mode ``dpcore.privacy.grad_modes`` picks for it on this device (the table's fastest
eligible mode, ``hooks`` without a table); the line names K and gives the physical-step ratio too.
A run without that path's row (e.g. ``--plan mobile``) ends with ``step_ratio nan``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from typing import Optional

import torch
from torch import nn

import models
from dpcore.privacy import grad_modes as gm

# resnet18 at the trainer's defaults (RunConfig: full fine-tuning, physical batch 128, logical batch 256 = 2 physical
# batches) but 64 px, not its 224 (one physical batch of 128 at 224 px: ~15-20 s on this 2-core CPU)
DEFAULT_PATH = {"model": "resnet18", "size": 64, "batch": 128, "accumulate": 2}

FULL_PLAN = [  # (model, image size, batch sizes)
    ("tiny_cnn", 32, [64, 256]),
    ("resnet18", 64, [64, 128]),
    ("vit_tiny_patch16_224", 32, [32, 64]),
]
QUICK_PLAN = [
    ("tiny_cnn", 32, [64]),
    ("resnet18", 64, [64]),
    ("vit_tiny_patch16_224", 32, [32]),
]
MOBILE_PLAN = [  # the EfficientNet-Lite / MobileNet family, at the trainer's physical batch (128)
    ("tf_efficientnet_lite0", 64, [128]),
    ("tf_efficientnet_lite0", 128, [128]),
    ("mobilenetv2_100", 64, [128]),
    ("mobilenetv2_100", 128, [128]),
    ("mobilenetv1_100", 64, [128]),
    ("mobilenetv1_100", 128, [128]),
]
# The default run (CPU): the way users train. Each backbone at the trainer's defaults (dpcore.config.RunConfig: full
# fine-tuning, physical batch 128, logical batch 256 = 2 physical batches, one noise draw per logical step) at a small
# image size, with the grad_sample_mode the trainer picks (--modes auto); BEiT-base (86 M parameters, ~4 img/s
# here) at physical batch 16, 2 per logical step. Per physical step AND per logical step, side by side.
TRAINER_PLAN = [  # (model, image size, physical batch sizes, physical batches per logical step)
    ("resnet18", 64, [128], 2),
    ("tf_efficientnet_lite0", 64, [128], 2),
    ("vit_tiny_patch16_224", 32, [128], 2),
    ("beit_base_patch16_224.in22k_ft_in22k", 32, [16], 2),
]
PLANS = {"full": FULL_PLAN, "quick": QUICK_PLAN, "mobile": MOBILE_PLAN, "trainer": TRAINER_PLAN}
AUTO = "auto"  # --modes auto: per backbone the mode dpcore.privacy.grad_modes picks (what the trainer runs)
# timm backbones measured before (or without) a registry entry: name -> timm.create_model kwargs
EXTRA_TIMM = {"tf_efficientnet_lite0": {}, "mobilenetv2_100": {"pad_type": "same"},
              "mobilenetv1_100": {"pad_type": "same"}}
EXTRA_FAMILY = "efficientnet"  # timm's module for all three (timm.models.efficientnet)
CUDA_TRAINER_PLAN = [  # the default run on CUDA: the trainer's defaults at 224 px (issue 17: <= 1.25x there)
    ("resnet18", 224, [128], 2),
    ("tf_efficientnet_lite0", 224, [128], 2),
    ("vit_tiny_patch16_224", 224, [128], 2),
    ("beit_base_patch16_224.in22k_ft_in22k", 224, [32], 2),
]
CUDA_PLAN = [  # the mode-ranking grid on CUDA (--write-table without --plan)
    ("tiny_cnn", 32, [64, 256]),
    ("resnet18", 64, [64, 256]),
    ("vit_tiny_patch16_224", 32, [64, 256]),
    ("vit_tiny_patch16_224", 224, [64]),
]


def parse_plan(spec: str) -> list:
    """``--plan``: a preset name (full, quick, mobile, trainer) or ``MODEL@SIZE@B1/B2[@K],...`` (K: physical
    batches per logical step, default 1)."""
    if spec in PLANS:
        return PLANS[spec]
    plan = []
    for item in spec.split(","):
        name, size, batches, *k = item.split("@")
        plan.append((name, int(size), [int(b) for b in batches.split("/")], int(k[0]) if k else 1))
    return plan


def build_model(name: str, size: int, num_classes: int = 10, bn: str = "groupnorm") -> nn.Module:
    """A registered backbone via ``models.create_model`` (random init), or an ``EXTRA_TIMM`` one via timm."""
    if name in EXTRA_TIMM and (bn == "folded" or name not in models.list_models()):
        import timm

        m = timm.create_model(name, pretrained=False, num_classes=num_classes, **EXTRA_TIMM[name])
        if bn == "folded":  # the pretrained form: what models.create_model does to pretrained weights
            from models.bn_fold import fold_batchnorm

            fold_batchnorm(m, verify=False)
        return models.make_opacus_compatible(m)
    if bn != "groupnorm":
        raise ValueError(f"--bn {bn} is only for {', '.join(EXTRA_TIMM)}")
    return models.create_model(name, num_classes, pretrained="none", image_size=size).model


def family(name: str) -> str:
    try:
        return models.get_spec(name).family
    except Exception:
        if name in EXTRA_TIMM:
            return EXTRA_FAMILY
        raise


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "cpu": cpu_model(), "python": platform.python_version()}
    try:
        import opacus
        import timm

        env["opacus"], env["timm"] = opacus.__version__, timm.__version__
    except Exception:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Config:
    """One timed configuration: a model copy, its optimizer and a fixed batch."""

    def __init__(self, base: nn.Module, x, y, mode: Optional[str], device, scope: str, autocast: bool,
                 trainable_blocks: int = 1):
        self.mode = mode  # None = non-private
        self.device = device
        self.autocast = autocast
        m = copy.deepcopy(base).to(device)
        models.set_trainable(m, scope, trainable_blocks)
        m.train()
        self.x, self.y = x.to(device), y.to(device)
        if mode is None:
            self.module = m
            self.optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
            self.criterion = nn.CrossEntropyLoss()
        else:
            self.module, self.optimizer, self.criterion = gm.make_private(
                m, self.x, self.y, mode, noise_multiplier=1.0, clip_norm=1.0)
        self.times: list[float] = []  # physical steps
        self.times_logical: list[float] = []  # logical steps of `accumulate` physical batches

    def step(self, accumulate: int = 1) -> float:
        """One logical step of `accumulate` physical batches and ONE optimizer step, as DP-SGD with a large logical
        batch trains (De et al. 2022): the non-private run sums its gradients over the physical batches; the DP run
        clips each physical batch into Opacus' running sum (skipped steps, as dpcore.training.trainer does) and draws the noise
        once, at the last one. accumulate = 1 is the single physical step."""
        sync(self.device)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(accumulate):
            if self.mode is not None and i:
                self.optimizer.zero_grad(set_to_none=True)  # after a skipped step: per-example state only
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                out = self.module(self.x)
            loss = self.criterion(out.float(), self.y)
            loss.backward()
            if self.mode is not None:
                self.optimizer.signal_skip_step(do_skip=i < accumulate - 1)
                self.optimizer.step()
        if self.mode is None:
            self.optimizer.step()
        sync(self.device)
        return time.perf_counter() - t0


def breakdown(name: str, size: int, batch: int, mode: str, device, scope: str, repeats: int,
              bn: str = "groupnorm", trainable_blocks: int = 1) -> dict:
    """Median seconds of the phases of one DP step: forward, backward (incl. per-sample grad hooks),
    clip_and_accumulate (per-sample norms + clipped sum), add_noise, scale_grad + SGD update;
    plus the non-private forward/backward/step for comparison, and which parameters got
    per-sample gradients (frozen ones must not)."""
    torch.manual_seed(0)
    base = build_model(name, size, bn=bn)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    res = {k: [] for k in ("np_forward", "np_backward", "np_step", "forward", "backward", "clip_and_accumulate",
                           "add_noise", "scale_and_update")}
    npc = Config(base, x, y, None, device, scope, False, trainable_blocks)
    dpc = Config(base, x, y, mode, device, scope, False, trainable_blocks)
    opt = dpc.optimizer

    def timed(f):
        sync(device)
        t = time.perf_counter()
        out = f()
        sync(device)
        return out, time.perf_counter() - t

    sampled = []
    for i in range(repeats + 1):
        npc.optimizer.zero_grad(set_to_none=True)
        out, t1 = timed(lambda: npc.module(npc.x))
        _, t2 = timed(lambda: npc.criterion(out, npc.y).backward())
        _, t3 = timed(npc.optimizer.step)
        opt.zero_grad(set_to_none=True)
        out, t4 = timed(lambda: dpc.module(dpc.x))
        _, t5 = timed(lambda: dpc.criterion(out, dpc.y).backward())
        names = {id(p): n for n, p in dpc.module.named_parameters()}
        sampled = [names[id(p)] for p in dpc.module.parameters() if getattr(p, "grad_sample", None) is not None
                   or getattr(p, "_norm_sample", None) is not None]
        _, t6 = timed(opt.accumulate if gm.uses_wrapped_criterion(mode) else opt.clip_and_accumulate)
        _, t7 = timed(opt.add_noise)

        def rest():
            opt.scale_grad()
            opt.original_optimizer.step()
        _, t8 = timed(rest)
        if i:  # first round = warm-up
            for k, t in zip(res, (t1, t2, t3, t4, t5, t6, t7, t8)):
                res[k].append(t)
    out = {k: statistics.median(v) for k, v in res.items()}
    trainable = [n for n, p in dpc.module.named_parameters() if p.requires_grad]
    out["params_with_per_sample_grad"] = len(sampled)
    out["trainable_params"] = len(trainable)
    out["frozen_with_per_sample_grad"] = sorted(set(sampled) - set(trainable))
    return out


def _dropout_off(model: nn.Module) -> nn.Module:
    """Every Dropout (and timm DropPath) at p = 0 (``gm.clipped_summed_grad`` puts its copy in train mode, so eval mode would not
    last; timm's attention reads ``attn_drop.p`` for its fused kernel), the rest untouched: two modes' passes would
    otherwise draw other masks (VGG's classifier, timm's drop_rate), and the check compares clipping, not mask
    draws."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif hasattr(m, "drop_prob") and type(m).__name__ == "DropPath":  # timm's stochastic depth
            m.drop_prob = 0.0
    return model


def check_modes(base: nn.Module, size: int, modes, device) -> dict:
    """{mode: relative error vs hooks (float) or the error message (str)} on an 8-image batch, dropout off.

    Where a mode disagrees with float32 hooks, both are compared with hooks in float64 (Opacus' per-example
    gradients of a float64 copy): on vgg11 float32 hooks itself is 0.35 % off float64 (its 25k-long 7×7
    conv sums), and a mode that matches float64 to the tolerance is eligible. ``"__hooks_vs_float64__"``
    then records hooks' own error."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (8,), generator=g).to(device)
    m = _dropout_off(copy.deepcopy(base).to(device))
    ref = gm.clipped_summed_grad(m, x, y, "hooks")
    tol = gm.rel_tol(device)
    out, ref64 = {}, None
    for mode in modes:
        try:
            if mode == "hooks":
                out[mode] = 0.0
                continue
            got = gm.clipped_summed_grad(m, x, y, mode)
            out[mode] = gm.grad_rel_error(got, ref)
            if tol <= out[mode] < 0.05:  # hooks' own float32 error, or wrong (a wrong norm gives O(1)): ask float64
                if ref64 is None:
                    ref64 = gm.clipped_summed_grad(copy.deepcopy(m).double(), x.double(), y, "hooks")
                    out["__hooks_vs_float64__"] = gm.grad_rel_error(ref, ref64)
                out[mode] = gm.grad_rel_error(got, ref64)
        except Exception as e:  # a mode that cannot handle the model
            out[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return out


def _stats(times: list[float], images: int, base_s: Optional[float] = None) -> dict:
    t = statistics.median(times)
    out = {"s": t, "ips": images / t, "spread": (max(times) - min(times)) / t, "n": len(times)}
    if base_s is not None:
        out["ratio"] = t / base_s
    return out


def run_model(name: str, size: int, batches, modes, device, repeats: int, scopes,
              autocast: bool, log, bn: str = "groupnorm", trainable_blocks: int = 1,
              accumulate: int = 1) -> list[dict]:
    """Rows of one model: per (scope, physical batch) the median physical-step times of non-private and each
    eligible mode and, with ``accumulate`` K > 1, their logical-step times (K physical batches, one optimizer
    step), all timed interleaved in the same rounds."""
    scopes = [scopes] if isinstance(scopes, str) else list(scopes)
    K = int(accumulate)
    torch.manual_seed(0)
    base = build_model(name, size, bn=bn)
    checks = check_modes(base, size, modes, device)
    tol = gm.rel_tol(device)
    ok = [m for m in modes if isinstance(checks[m], float) and checks[m] < tol]
    for m in modes:
        log(f"  {name}@{size}: {m}: " + (f"rel.err {checks[m]:.1e}" if isinstance(checks[m], float) else checks[m]))
    if "__hooks_vs_float64__" in checks:
        log(f"  {name}@{size}: float32 hooks vs float64 hooks: rel.err {checks['__hooks_vs_float64__']:.1e} "
            "(the other modes' errors above are vs float64 where they differed from float32 hooks)")
    rows = []
    for scope, b in [(sc, b) for sc in scopes for b in batches]:
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, 3, size, size, generator=g)
        y = torch.randint(0, 10, (b,), generator=g)
        configs = {"non-private": Config(base, x, y, None, device, scope, autocast, trainable_blocks)}
        for m in ok:
            try:
                configs[m] = Config(base, x, y, m, device, scope, autocast, trainable_blocks)
                configs[m].step()  # warm-up (and: does it run at this batch size?)
                if K > 1:
                    configs[m].step(K)
            except Exception as e:
                log(f"  {name}@{size} b{b} {m}: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                configs.pop(m, None)
        configs["non-private"].step()
        if K > 1:
            configs["non-private"].step(K)
        warm = {k: c.step() for k, c in configs.items()}  # 2nd warm-up: a timing of its own
        slow = {k for k in configs if k not in ("non-private", "hooks") and "hooks" in warm
                and warm[k] > 3 * warm["hooks"]}
        for k in slow:  # far slower than hooks: one timed step is enough to rank it
            configs[k].times.append(warm[k])
            if K > 1:
                configs[k].times_logical.append(configs[k].step(K))
        for _ in range(repeats):  # interleaved: every configuration's physical, then logical step, each round
            for k, c in configs.items():
                if k not in slow:
                    c.times.append(c.step())
            for k, c in configs.items():
                if k not in slow and K > 1:
                    c.times_logical.append(c.step(K))
        npc = configs["non-private"]
        base_t = statistics.median(npc.times)
        row = {"model": name, "size": size, "batch": b, "scope": scope, "bn": bn, "accumulate": K,
               "nonprivate_s": base_t, "nonprivate_ips": b / base_t, "modes": {},
               "nonprivate_spread": (max(npc.times) - min(npc.times)) / base_t}
        if K > 1:
            lnp = _stats(npc.times_logical, K * b)
            row["logical"] = {"accumulate": K, "batch": K * b, "nonprivate_s": lnp["s"],
                              "nonprivate_ips": lnp["ips"], "nonprivate_spread": lnp["spread"], "modes": {}}
        for m in modes:
            if m in configs:
                row["modes"][m] = {**_stats(configs[m].times, b, base_t), "eligible": True}
                if K > 1:
                    row["logical"]["modes"][m] = _stats(configs[m].times_logical, K * b, row["logical"]["nonprivate_s"])
            else:
                row["modes"][m] = {"eligible": False, "why": checks[m] if not isinstance(checks[m], float)
                                   else ("wrong gradient" if checks[m] >= tol else "failed at this batch")}
        rows.append(row)
        log(format_row(row, modes))
        del configs
    return rows


def format_header(modes) -> str:
    return (f"{'model':<22}{'px':>4}{'batch':>6}{'K':>3}{'scope':>7}{'non-priv img/s':>16}  "
            + "".join(f"{m + ' physical (x)':>24}{m + ' logical (x)':>24}" for m in modes))


def format_row(row: dict, modes) -> str:
    """Per mode: images/s and DP / non-private of the physical step, then of the logical step (K physical
    batches, one optimizer step; '–' for K = 1, 'not timed' for a mode --modes auto did not pick)."""
    cells = []
    logical = row.get("logical")
    for m in modes:
        r = row["modes"].get(m)
        if r is None:
            cells += ["not timed", "not timed"]
            continue
        cells.append(f"{r['ips']:9.1f} ({r['ratio']:4.2f}x)" if r.get("eligible") else "n/a")
        lr = (logical or {}).get("modes", {}).get(m)
        cells.append(f"{lr['ips']:9.1f} ({lr['ratio']:4.2f}x)" if lr else ("n/a" if logical else "–"))
    return (f"{row['model'][:21]:<22}{row['size']:>4}{row['batch']:>6}{row.get('accumulate', 1):>3}"
            f"{row.get('scope', 'full'):>7}{row['nonprivate_ips']:>16.1f}  "
            + "".join(f"{c:>24}" for c in cells))


def markdown_table(rows, modes) -> str:
    """The side-by-side table for bench/RESULTS.md: ratios, each with its DP configuration's step-time spread
    ((max - min) / median) in brackets."""
    head = "| model | px | physical batch | K (logical batch) | non-private img/s, physical / logical |"
    for m in modes:
        head += f" {m}: physical step ÷ non-private | {m}: logical step ÷ non-private |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lg = r.get("logical")
        cells = [r["model"], str(r["size"]), str(r["batch"]),
                 f"{r.get('accumulate', 1)} ({lg['batch']})" if lg else "1",
                 f"{r['nonprivate_ips']:.1f} / {lg['nonprivate_ips']:.1f}" if lg else f"{r['nonprivate_ips']:.1f} / –"]
        for m in modes:
            p = r["modes"].get(m)
            q = (lg or {}).get("modes", {}).get(m)
            cells.append(f"{p['ratio']:.2f}× ({p['spread']:.0%})" if p and p.get("eligible") else "n/a")
            cells.append(f"**{q['ratio']:.2f}×** ({q['spread']:.0%})" if q else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_modes(rows, modes) -> dict:
    """Per model: eligible modes ranked by the summed DP step time over its batch sizes."""
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        tot = {}
        for m in modes:
            if all(r["modes"].get(m, {}).get("eligible") for r in mine):
                tot[m] = sum(r["modes"][m]["ratio"] for r in mine) / len(mine)
        ranked = sorted(tot, key=tot.get)
        out[name] = {"mode": ranked[0] if ranked else gm.DEFAULT_MODE, "ranked": ranked,
                     "mean_ratio": {m: round(tot[m], 3) for m in ranked},
                     "measured_at": sorted({(r["size"], r["batch"]) for r in mine})}
        scopes = sorted({r.get("scope", "full") for r in mine})
        if scopes != ["full"]:  # the mean is over these scopes too
            out[name]["scopes"] = scopes
        bns = sorted({r.get("bn", "groupnorm") for r in mine})
        if bns != ["groupnorm"]:
            out[name]["bn"] = bns
    return out


def write_table(rows, modes, env, argv, merge: bool = False) -> None:
    """(Re)write this device's entry of bench/grad_modes.json. ``merge``: keep the entry's other models
    and families, replace only the measured ones (each then records its own command and date)."""
    table = gm.load_table()
    table.setdefault("devices", {})
    kind = gm.device_kind(env["device"])
    command = "python -m bench.step_ratio " + " ".join(argv)
    today = datetime.date.today().isoformat()
    per_model = best_modes(rows, modes)
    families = {}
    for name, entry in per_model.items():
        families.setdefault(family(name), entry)  # the first measured model of a family stands for it
    old = table["devices"].get(kind) or {}
    if merge and old:
        for entry in list(per_model.values()) + list(families.values()):
            entry.update(command=command, date=today)
        per_model = {**(old.get("models") or {}), **per_model}
        families = {**(old.get("families") or {}), **families}
        env = old.get("environment") or env
        command, today = old.get("command", command), old.get("date", today)
    table["devices"][kind] = {"models": per_model, "families": families,
                              "environment": env, "date": today, "command": command}
    table["about"] = ("fastest grad_sample_mode whose clipped summed gradient equals hooks' (noise 0); "
                      "written by python -m bench.step_ratio --write-table, read by dpcore.privacy.grad_modes")
    path = gm.table_path()
    path.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.step_ratio", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one batch size per model, 3 repeats")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (default 5, quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--scope", default="full",
                    help="what is trained (frozen rest): one of %s, or several comma-separated" % ", ".join(models.SCOPES))
    ap.add_argument("--trainable-blocks", type=int, default=1, help="scope last-k: how many blocks (default 1)")
    ap.add_argument("--plan", default=None,
                    help="trainer | full | quick | mobile | MODEL@SIZE@B1/B2[@K],... (default: trainer, on CUDA its "
                         "224 px form; with --write-table: full, on CUDA the CUDA grid)")
    ap.add_argument("--bn", default="groupnorm", choices=("groupnorm", "folded"),
                    help="EXTRA_TIMM models: BatchNorm -> GroupNorm (random init, default) or folded into the "
                         "convs (as pretrained weights)")
    ap.add_argument("--modes", default=None,
                    help="comma-separated grad_sample_modes, or auto (each backbone's pick by dpcore.privacy.grad_modes; "
                         "hooks then only checks the gradients). Default: auto for the default plan, else all")
    ap.add_argument("--models", default=None, help="comma-separated subset of the plan's models")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (CUDA only)")
    ap.add_argument("--write-table", action="store_true", help="write bench/grad_modes.json for this device")
    ap.add_argument("--merge", action="store_true",
                    help="with --write-table: keep the device's other table entries, replace the measured ones")
    ap.add_argument("--breakdown", default=None, metavar="MODEL@SIZE@BATCH@MODE",
                    help="time the phases of one DP step instead, e.g. resnet18@64@64@hooks")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--accumulate", type=int, default=None, metavar="K",
                    help="also time logical steps of K physical batches and one optimizer step (DP: the noise drawn "
                         "once per logical step; logical batch = K x the physical batch), beside the physical step; "
                         "default: the plan's K (trainer plan 2, others 1)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    if args.bf16 and device.type != "cuda":
        print("--bf16 is for CUDA only", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 5)
    if args.plan:
        plan = parse_plan(args.plan)
    elif args.quick:
        plan = QUICK_PLAN
    elif args.write_table:  # the mode-ranking grids
        plan = CUDA_PLAN if device.type == "cuda" else FULL_PLAN
    else:
        plan = CUDA_TRAINER_PLAN if device.type == "cuda" else TRAINER_PLAN
    default_run = not (args.plan or args.quick or args.write_table)
    mode_spec = args.modes or (AUTO if default_run else ",".join(gm.MODES))
    auto = mode_spec == AUTO
    if args.accumulate is not None and args.accumulate < 1:
        print("--accumulate must be >= 1", file=sys.stderr)
        return 2
    plan = [(p[0], p[1], p[2], args.accumulate or (p[3] if len(p) > 3 else 1)) for p in plan]
    scopes = [s for s in args.scope.split(",") if s]
    bad = [s for s in scopes if s not in models.SCOPES]
    if bad or not scopes:
        print(f"unknown scope(s) {bad}; use {', '.join(models.SCOPES)}", file=sys.stderr)
        return 2
    if args.models:
        keep = args.models.split(",")
        plan = [p for p in plan if p[0] in keep]
    if auto:  # per backbone the trainer's mode; hooks (the reference of check_modes) is not timed
        plan_modes = {p[0]: [gm.choose_grad_sample_mode(p[0], device.type)] for p in plan}
        modes = list(dict.fromkeys(m for ms in plan_modes.values() for m in ms))
    else:
        modes = [m for m in mode_spec.split(",") if m]
        bad_modes = [m for m in modes if m not in gm.MODES]
        if bad_modes:
            print(f"unknown mode(s) {bad_modes}; use {', '.join(gm.MODES)} or {AUTO}", file=sys.stderr)
            return 2
        if "hooks" not in modes:
            modes.insert(0, "hooks")  # the correctness reference
        plan_modes = {p[0]: modes for p in plan}
    env = environment(device)
    if args.breakdown:
        name, size, batch, mode = args.breakdown.split("@")
        b = breakdown(name, int(size), int(batch), mode, device, scopes[0], repeats, args.bn, args.trainable_blocks)
        print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
        print(f"breakdown {args.breakdown} scope={args.scope} (median of {repeats}):")
        for k, v in b.items():
            print(f"  {k:<28} {v*1000:9.1f} ms" if isinstance(v, float) else f"  {k:<28} {v}")
        return 0
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    ks = sorted({p[3] for p in plan})
    print(f"command: python -m bench.step_ratio {' '.join(argv)}   (repeats={repeats}, scope={args.scope}, "
          f"random 10-class data, SGD, sigma=1, C=1, modes={mode_spec}, physical batches per logical step K="
          f"{'/'.join(map(str, ks))})")

    def log(s):
        print(s, flush=True)

    t_start = time.time()
    rows = []
    log(format_header(modes))
    for name, size, batches, k in plan:
        rows += run_model(name, size, batches, plan_modes[name], device, repeats, scopes, args.bf16, log, args.bn,
                          args.trainable_blocks, k)
    print()
    print("DP / non-private step-time ratio (median of %d interleaved steps; n/a = mode not eligible). physical: "
          "one physical batch and one optimizer step (noise per batch); logical: K physical batches, ONE optimizer "
          "step, noise once (both non-private and DP at the same physical and logical batch):" % repeats)
    print(format_header(modes))
    for r in rows:
        print(format_row(r, modes))
    print()
    print(markdown_table(rows, modes))
    spreads = [r["nonprivate_spread"] for r in rows] + [v["spread"] for r in rows for v in r["modes"].values()
                                                        if v.get("eligible")]
    spreads += [v["spread"] for r in rows if r.get("logical") for v in
                [{"spread": r["logical"]["nonprivate_spread"]}, *r["logical"]["modes"].values()]]
    if spreads:
        print(f"noise: median (max-min)/median of a configuration's step times = {statistics.median(spreads):.0%}, "
              f"worst {max(spreads):.0%}; run took {time.time() - t_start:.0f} s")
    ranked = best_modes(rows, modes)
    for name, e in ranked.items():
        print(f"fastest eligible mode for {name}: {e['mode']}  (mean DP/non-private ratio {e['mean_ratio']})")
    if args.write_table:
        write_table(rows, modes, env, argv, merge=args.merge)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "argv": argv}, f, indent=1)

    print_headline(rows, device)
    return 0


def headline_row(rows, device) -> tuple[Optional[dict], str]:
    """The default path's row (resnet18, 64 px, full; physical batch 128, else the one measured) and its mode."""
    d = DEFAULT_PATH
    chosen = gm.choose_grad_sample_mode(d["model"], device.type)
    mine = [r for r in rows if r["model"] == d["model"] and r["size"] == d["size"] and r["scope"] == "full"
            and r["modes"].get(chosen, {}).get("eligible")]
    mine.sort(key=lambda r: (r["batch"] != d["batch"], r.get("accumulate", 1) != d["accumulate"]))
    return (mine[0] if mine else None), chosen


def print_headline(rows, device) -> None:
    """Last line: ``step_ratio X`` of the default path, per logical step where one was timed (the way users
    train), saying which K; else per physical step."""
    d = DEFAULT_PATH
    row, chosen = headline_row(rows, device)
    if row is None:
        print(f"default path ({d['model']} {d['size']} px, full, mode {chosen}) not measured")
        print("step_ratio nan")
        return
    p = row["modes"][chosen]
    lg = (row.get("logical") or {}).get("modes", {}).get(chosen)
    print(f"default path: {d['model']} at {d['size']} px, physical batch {row['batch']}, full fine-tuning, "
          f"grad_sample_mode={chosen} (dpcore.privacy.grad_modes.choose_grad_sample_mode), {device.type}")
    if lg:
        K = row["accumulate"]
        print(f"step_ratio {lg['ratio']:.2f}  (per logical step: K={K} physical batches of {row['batch']}, logical "
              f"batch {K * row['batch']}, noise once; per physical step {p['ratio']:.2f})")
    else:
        print(f"step_ratio {p['ratio']:.2f}  (per physical step: K=1, batch {row['batch']})")


if __name__ == "__main__":
    sys.exit(main())
