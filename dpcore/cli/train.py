"""`python -m dpcore train | sweep | pretrain`: the trainer from a terminal, with progress and the card."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

from dpcore.config import AUGMENTS, DEVICES, LR_SCHEDULES, OPTIMIZERS, SCOPES, RunConfig
from dpcore.privacy import accounting
from dpcore.store.events import Event
from dpcore.training.sweep import DEFAULT_EPSILONS, parse_epsilons

_DEFAULTS = RunConfig()


def add_commands(subparsers, add_runs_dir) -> dict:
    t = subparsers.add_parser("train", help="train one run (DP-SGD, or --non-private) and store it")
    add_runs_dir(t)
    _add_train_flags(t, sweep=False)
    t.add_argument("--config", default=None, help="JSON run config; explicit flags are ignored when given")
    t.add_argument("--quiet", action="store_true", help="print only the model card")

    sw = subparsers.add_parser("sweep", help="one stored run per target ε (head-only on cached features by default)")
    add_runs_dir(sw)
    _add_train_flags(sw, sweep=True)
    sw.add_argument("--quiet", action="store_true", help="print only the frontier table")

    pre = subparsers.add_parser("pretrain", help="train a backbone WITHOUT DP on data you declare public; save it "
                         "without its head for --pretrained")
    add_runs_dir(pre)
    _add_pretrain_flags(pre)

    return {"train": _cmd_train, "sweep": _cmd_sweep, "pretrain": _cmd_pretrain}


def _add_train_flags(t: argparse.ArgumentParser, sweep: bool) -> None:
    """The run flags `train` and `sweep` share (a sweep takes --epsilons instead of --epsilon)."""
    d = _DEFAULTS
    t.add_argument("--dataset", default=d.dataset, help="digits | folder | ham10000 | pneumoniamnist | dermamnist | cifar10")
    t.add_argument("--data-dir", default=None, help="data folder (folder, ham10000) or npz file (MedMNIST)")
    t.add_argument("--backbone", default=d.backbone, help="see `python -m dpcore backbones`")
    t.add_argument("--pretrained", default=d.pretrained, help="none | hub | bundled | default | PATH.safetensors (default: hub cache, then bundled, then $DPCORE_WEIGHTS_DIR)")
    t.add_argument("--scope", default="head" if sweep else d.scope, choices=SCOPES,
                   help="which parameters are fine-tuned (head: frozen backbone, cached features)")
    if sweep:
        t.add_argument("--epsilons", default=",".join(f"{e:g}" for e in DEFAULT_EPSILONS),
                       help="comma-separated target ε values, one run each (default %(default)s)")
        t.add_argument("--non-private", action="store_true", help="also train the non-private baseline")
    else:
        priv = t.add_mutually_exclusive_group()
        priv.add_argument("--epsilon", type=float, default=d.epsilon, help=f"target ε (default {d.epsilon})")
        priv.add_argument("--non-private", action="store_true", help="no clipping, no noise, no guarantee (baseline)")
    t.add_argument("--delta", type=float, default=d.delta)
    t.add_argument("--accountant", default=d.accountant, choices=accounting.ACCOUNTANTS)
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="logical (expected) batch size")
    t.add_argument("--max-physical-batch-size", type=int, default=d.max_physical_batch_size,
                   help="memory bound; larger logical batches are accumulated (virtual steps)")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    t.add_argument("--momentum", type=float, default=d.momentum)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--clip-norm", type=float, default=d.clip_norm, help="per-example gradient clip norm C")
    t.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--device", default=d.device, choices=DEVICES)
    t.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="held-out fraction where the data set has no official test split")
    t.add_argument("--split", default=d.split, choices=("official", "grouped"),
                   help="official (the data set's own split) | grouped (train ∪ test re-split by patient/lesion, "
                        "seeded by --seed: no patient on both sides)")
    t.add_argument("--privacy-unit", default=d.privacy_unit, choices=("image", "patient"),
                   help="image (add/remove one image) | patient (add/remove one patient with all of their images: "
                        "patients are Poisson-sampled, each patient's mean gradient clipped; --batch-size then "
                        "counts patients). HAM10000's unit is the lesion")
    t.add_argument("--medmnist-size", type=int, default=d.medmnist_size)
    t.add_argument("--skip-unreadable", action="store_true", help="leave out unreadable images (recorded)")
    t.add_argument("--evals-per-epoch", type=int, default=d.evals_per_epoch)
    t.add_argument("--cache-dir", default=None, help="download cache (MedMNIST, CIFAR-10)")
    t.add_argument("--trainable-blocks", type=int, default=d.trainable_blocks,
                   help="with --scope last-k: the head plus this many last blocks of the backbone are trained")
    t.add_argument("--allow-over-budget", action="store_true",
                   help="launch even if the privacy ledger says an image would exceed a data set's budget "
                        "(the override is recorded in the ledger)")
    if not sweep:
        t.add_argument("--insecure-reproducible-noise", action="store_true",
                       help="DEBUGGING ONLY: derive the DP noise and sampling from --seed so the run can be "
                            "replayed; such a run has NO privacy guarantee (its card says so first, the ledger "
                            "counts it as non-private)")
    _add_recipe_flags(t)


def _add_recipe_flags(t: argparse.ArgumentParser) -> None:
    """The DP training recipe of De et al. 2022 (train, sweep and pretrain)."""
    d = _DEFAULTS
    t.add_argument("--augmult", type=int, default=d.augmult,
                   help="augmentation multiplicity K: K augmented views per example, their gradients averaged "
                        "before clipping (same ε; each step ~K times the work)")
    t.add_argument("--augment", default=d.augment, choices=AUGMENTS,
                   help="augmentation policy (auto: from the data set, none when --augmult is 1)")
    t.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="keep an exponential moving average of the weights (e.g. 0.999); the EMA weights are "
                        "evaluated and saved (post-processing: no privacy cost)")
    t.add_argument("--weight-standardization", action="store_true",
                   help="standardise every conv weight per output filter (for conv nets trained from scratch)")
    t.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SCHEDULES,
                   help="constant or cosine decay over the run's steps")
    t.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction,
                   help="linear lr warm-up over this fraction of the steps (0 to 0.5)")


def _add_pretrain_flags(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    p.add_argument("--dataset", required=True, help="the public data set to pretrain on")
    p.add_argument("--data-dir", default=None, help="data folder (folder, ham10000) or npz file (MedMNIST)")
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument("--pretrained", default=d.pretrained, help="start from none | hub | bundled | default | PATH.safetensors")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", required=True, help="weights file to write (.safetensors; a sidecar .json beside it)")
    p.add_argument("--public", default=None, help="why these data may be treated as public (recorded)")
    p.add_argument("--force-public", action="store_true",
                   help="pretrain even on images the privacy ledger knows from private runs (it then records "
                        "them as used without DP: their guarantee is void)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-physical-batch-size", type=int, default=d.max_physical_batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=DEVICES)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--medmnist-size", type=int, default=d.medmnist_size)
    p.add_argument("--skip-unreadable", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    _add_recipe_flags(p)


def _cmd_pretrain(args) -> int:
    from dpcore.training.pretrain import pretrain

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    named = {"dataset", "data_dir", "backbone", "image_size", "epochs", "allow_over_budget",
             "insecure_reproducible_noise"}
    options = {k: v for k, v in vars(args).items() if k in fields and k not in named}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pretrain(args.dataset, args.out, data_dir=args.data_dir, backbone=args.backbone,
                          image_size=args.image_size, epochs=args.epochs, public=args.public,
                          force_public=args.force_public,
                          listener=WarningPrinter() if args.quiet else ProgressPrinter(), **options)
    f = result.facts
    tm = f["test_metrics"]
    acc = f"{tm['accuracy']:.4f}" if tm.get("accuracy") is not None else "n/a"
    print(f"pretrained {f['backbone']} on {f['dataset']} ({f['n_train']} images, {f['epochs']} epochs, non-private; "
          f"test accuracy {acc})")
    print(f"weights (no classifier head): {result.path}")
    print(f"facts: {result.sidecar}")
    print(f"use: python -m dpcore train --backbone {f['backbone']} --pretrained {result.path} ...")
    return 0


def config_from_args(args: argparse.Namespace) -> RunConfig:
    if getattr(args, "config", None):
        return RunConfig.from_file(args.config)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if hasattr(args, "epsilons"):  # a sweep: the base config; each point sets its own ε
        values["epsilon"] = parse_epsilons(args.epsilons)[0]
    else:
        values["epsilon"] = None if args.non_private else args.epsilon
    return RunConfig(**values)


class ProgressPrinter:
    """Prints step, loss and ε lines (thinned to about 200 per run) and every evaluation."""

    def __init__(self, out=None):
        self.out = out
        self.every = 1

    def __call__(self, ev: Event) -> None:
        if ev.kind == "plan":
            d = ev.data
            self.every = max(1, d["total_steps"] // 200)
            line = (f"plan: {d['n_train']} train / {d['n_test']} test images, {d['steps_per_epoch']} steps/epoch, "
                    f"{d['total_steps']} steps on {d['device']}"
                    + (f" × {d['processes']} processes" if d.get("processes", 1) > 1 else ""))
            if "noise_multiplier" in d:
                line += (f"; σ={d['noise_multiplier']:.4f}, q={d['sample_rate']:.5f}, C={d['clip_norm']:g}, "
                         f"planned ε={d['epsilon']:.4f} (target {d['target_epsilon']:g}, δ={d['delta']:g}, "
                         f"{d['accountant'].upper()})")
            if d.get("privacy_unit", "image") != "image":
                line += f"; privacy unit: one {d['privacy_unit']} ({d.get('n_units')} of them, q over them)"
            self._print(line)
            u = d.get("unit_comparison")
            if u:
                self._print(f"per {u['unit']}: image-level DP: {u['image']['sentence']}")
                self._print(f"per {u['unit']}: {u['unit']}-level DP: {u['patient']['sentence']}"
                            + ("  <- this run" if u["chosen"] == "patient" else ""))
        elif ev.kind == "log":
            self._print(ev.message)
        elif ev.kind == "step" and (ev.step % self.every == 0 or ev.step == ev.total_steps):
            eps = f"  ε {ev.epsilon:.4f}" if ev.epsilon is not None else ""
            loss = f"{ev.loss:.4f}" if ev.loss is not None else "  -   "
            self._print(f"step {ev.step:>5}/{ev.total_steps}  epoch {ev.epoch:5.2f}  loss {loss}{eps}  "
                        f"elapsed {ev.elapsed:6.1f}s  eta {ev.eta:6.1f}s")
        elif ev.kind == "eval":
            m = ev.metrics
            auc = f"{m['roc_auc']:.4f}" if m.get("roc_auc") is not None else "n/a"
            self._print(f"eval @ step {ev.step}: test accuracy {m['accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}"
                        f"  ROC-AUC {auc}  loss {m['loss']:.4f}")
        elif ev.kind in ("cancelled", "failed"):
            self._print(f"{ev.kind}: {ev.message or ''}")

    def _print(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)


class WarningPrinter(ProgressPrinter):
    """--quiet: only what must never be hidden — warnings about the guarantee or the ledger, and failures."""

    def __call__(self, ev: Event) -> None:
        msg = ev.message or ""
        if (ev.kind == "log" and (msg.startswith("WARNING") or msg.startswith("NO DP"))) or ev.kind == "failed":
            self._print(msg if ev.kind == "log" else f"failed: {msg}")


def format_card(card: dict) -> str:
    d, m, p = card["dataset"], card["model"], card["privacy"]
    tm = card.get("test_metrics") or {}
    lines = [
        f"== model card: run {card['run_id']} ({card['status']}, {card['date']}) ==",
        f"data      : {d['name']}" + (f" ({d['data_dir']})" if d.get("data_dir") else "")
        + f", {d['n_train']} train / {d['n_test']} test, classes {d['class_names']}",
        f"split     : {d['split'].get('method', d['split'])}",
        f"model     : {m['backbone']} (weights: {m['weights'].get('source')}"
        + (f" {m['weights'].get('name')}" if m['weights'].get('name') else "") + f"), scope {m['scope']}, "
        f"{m['trainable_params']['trainable']:,} of {m['trainable_params']['total']:,} parameters trained",
    ]
    if p["private"]:
        lines.append(f"privacy   : ε = {p['epsilon']:.4f} (target {p['target_epsilon']:g}), δ = {p['delta']:g}, "
                     f"{p['accountant'].upper()}; σ = {p['noise_multiplier']:.4f}, q = {p['sample_rate']:.5f}, "
                     f"T = {p['steps']} steps, C = {p['clip_norm']:g}")
    else:
        lines.append("privacy   : none (non-private baseline)")
    lines.append(f"guarantee : {card['guarantee']}")
    facts = card.get("privacy_facts") or {}
    if facts:
        lines.append(f"unit      : {facts['unit']}; adjacency: {facts['adjacency']}")
    lin = card.get("lineage") or {}
    if lin.get("sentence"):
        lines.append(f"lineage   : {lin['sentence']}")
    grp = (card.get("privacy") or {}).get("group")
    if grp and grp.get("sentence"):
        lines.append(f"groups    : {grp['sentence']}")
    if tm:
        auc = f"{tm['roc_auc']:.4f}" if tm.get("roc_auc") is not None else "n/a"
        lines.append(f"test      : accuracy {tm['accuracy']:.4f}, balanced accuracy {tm['balanced_accuracy']:.4f}, "
                     f"ROC-AUC {auc}")
        lines.append("recall    : " + ", ".join(f"{k} {v:.3f}" for k, v in tm["per_class_recall"].items()))
    tr = card["training"]
    recipe = [f"augmult K={tr['augmult']} ({(tr.get('recipe') or {}).get('augment_policy', {}).get('name', tr['augment'])})"
              if tr.get("augmult", 1) > 1 else None,
              f"EMA {tr['ema_decay']:g} (reported and saved: {m.get('evaluated_weights')} weights)"
              if tr.get("ema_decay") is not None else None,
              "weight standardisation" if m.get("weight_standardization") else None,
              f"lr {tr['lr_schedule']}" + (f", warm-up {tr['warmup_fraction']:g}" if tr.get("warmup_fraction") else "")
              if tr.get("lr_schedule", "constant") != "constant" or tr.get("warmup_fraction") else None,
              f"last {m['trainable_blocks']} block(s) + head" if m.get("trainable_blocks") else None]
    if any(recipe):
        lines.append("recipe    : " + "; ".join(r for r in recipe if r))
    if card.get("metrics_ema") and card.get("metrics_raw"):
        lines.append(f"raw / EMA : accuracy {card['metrics_raw']['accuracy']:.4f} / {card['metrics_ema']['accuracy']:.4f}")
    spread = card["training"].get("distributed")
    lines.append(f"training  : {card['training']['duration_s']:.1f} s on {card['training']['device']}"
                 + (f" × {spread['processes']} processes ({spread['backend']}); the guarantee is the same as in "
                    "one process" if spread else ""))
    for w in card.get("warnings", []):
        lines.append(f"warning   : {w}")
    return "\n".join(lines)


def _cmd_train(args) -> int:
    from dpcore.store.runs import RunStore

    config = config_from_args(args)
    from dpcore.privacy.distributed import from_env

    world = from_env()
    if world is None:
        return train_and_print(config, RunStore(args.runs_dir), quiet=args.quiet)
    return _train_rank(config, RunStore(args.runs_dir), world, quiet=args.quiet)


def _train_rank(config: RunConfig, store, world, *, quiet: bool) -> int:
    """One process of a torchrun launch: rank 0 prints and records the run as a single-process run would; the
    others train their shard quietly (their failures go to stderr, which torchrun shows)."""
    from dpcore.training.trainer import resolve_device

    world.init(resolve_device(config.device))
    try:
        if world.is_main:
            return train_and_print(config, store, quiet=quiet, world=world)
        from dpcore.cli.resume import cancel_on_signals
        from dpcore.training.trainer import train

        with cancel_on_signals() as cancel, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train(config, store, cancel=cancel, world=world)
        return 0 if result.status == "done" else 130
    finally:
        world.close()


def train_and_print(config: RunConfig, store, *, quiet: bool, **train_kwargs) -> int:
    """`train` with progress (or only warnings) printed and the card at the end: `train` and `resume`.

    SIGTERM / Ctrl-C: the run stops at its next batch and is stored as cancelled (resumable), not killed mid-write.
    """
    from dpcore.cli.resume import cancel_on_signals
    from dpcore.training.trainer import train

    printer = WarningPrinter() if quiet else ProgressPrinter()
    with cancel_on_signals() as cancel, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trainer reports warnings as events and in the card
        result = train(config, store, listener=printer, cancel=cancel, **train_kwargs)
    print(format_card(result.card))
    print(f"card: {store.run_dir(result.run_id) / 'card.json'}")
    return 0 if result.status == "done" else 130


def _cmd_sweep(args) -> int:
    from dpcore.store.runs import RunStore
    from dpcore.training.sweep import format_header, format_point, run_sweep, sweep_configs

    base = config_from_args(args)
    configs = sweep_configs(base, parse_epsilons(args.epsilons), non_private=args.non_private)
    store = RunStore(args.runs_dir)
    print(f"sweep: {len(configs)} runs of {base.dataset} / {base.backbone}, scope {base.scope}", flush=True)
    printer = None if args.quiet else _LogPrinter()
    print(format_header(), flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        points = run_sweep(configs, store, listener=printer, on_point=lambda p: print(format_point(p), flush=True))
    return 0 if all(p.status == "done" for p in points) else 1


class _LogPrinter:
    """During a sweep only the log lines (features cache, σ calibration) are printed; points come as rows."""

    def __call__(self, ev: Event) -> None:
        if ev.kind in ("log", "failed"):
            print(f"  [{ev.run_id}] {ev.message}", file=sys.stderr, flush=True)
