"""DP-SGD training (Opacus) and its non-private twin on the same loop.

`train(config, ...)` is safe to call from a background thread: it reports progress only through
events, stops between physical batches when `cancel` is set, and records every outcome (done,
failed, cancelled) in the run store before returning or re-raising.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import TensorDataset

import models

from dpcore.privacy import accounting, grad_modes
from dpcore.training import augment, features
from dpcore.store.card import build_card
from dpcore.config import RunConfig
from dpcore.data import load_dataset, materialize
from dpcore.training.ema import EMA
from dpcore.errors import ConfigError
from dpcore.store.events import Event, Listener, fan_out
from dpcore.training.metrics import classification_metrics
from dpcore.store.model_io import save_model
from dpcore.training.preprocess import Normalizer, make_to_uint8
from dpcore.privacy.randomness import SecretRandomness
from dpcore.training.schedule import LRSchedule
from dpcore.store.runs import BufferedEventWriter, RunStore, atomic_write

# Opacus' hooks on the first layer fire once per step with this torch warning (the input images need
# no gradient); it is expected and says nothing about the run, so it is not shown to users.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
# Opacus warns that its secure_mode (torchcsprng) is off; this trainer never uses Opacus' generators for the
# noise or the sampling but its own OS-seeded ones (dpcore.privacy.randomness), so the warning does not apply.
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)


class _Rows:
    """A batch gathered with one index per tensor; its len (rows) is what Opacus checks for empty batches."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])


class BatchedTensorDataset(TensorDataset):
    """A TensorDataset that the DataLoader fetches a whole batch at a time (`__getitems__`), instead of
    indexing and re-stacking one row at a time: on small cached inputs that per-row work dominated."""

    def __getitems__(self, indices) -> _Rows:
        index = torch.as_tensor(indices, dtype=torch.long)
        return _Rows(tuple(t[index] for t in self.tensors))


def collate_rows(batch):
    return list(batch.tensors) if isinstance(batch, _Rows) else torch.utils.data.default_collate(batch)


TRAINER_MODES = ("hooks", "functorch", "bk")  # per-example clipping modes the loop supports
CHECKPOINT_ENV = "DPCORE_CHECKPOINT_EVERY"  # seconds between checkpoints (0: none)
DEFAULT_CHECKPOINT_EVERY = 300.0


class Cancelled(Exception):
    """Raised inside the loop when a cancel request is seen; the run is stored as cancelled."""


@dataclass
class TrainResult:
    run_id: str
    status: str
    card: dict[str, Any]


def resolve_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", "CUDA was requested but no CUDA GPU is visible to torch",
                              "use --device auto or cpu, or install a CUDA build of torch")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Logical steps per epoch; Opacus' Poisson loader then samples at rate q = 1/steps_per_epoch."""
    return accounting.sampling_plan(n_train, batch_size, 1).steps_per_epoch


def privatize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_set, *, batch_size: int | None = None,
              sample_rate: float | None = None, noise_multiplier: float, clip_norm: float,
              grad_sample_mode: str = "hooks", randomness: SecretRandomness | None = None,
              before_noise=None, n_units: int | None = None, world=None, wants_stop=None):
    """Opacus' DP-SGD pieces: per-example gradients, clipping to C, Gaussian noise σ·C, Poisson sampling.

    The loader samples each example independently with q (default 1/ceil(n/batch_size), the q the
    accountant is given), for exactly 1/q logical steps per epoch. Noise and sampling masks come from
    `randomness` (secret, OS-seeded: `dpcore.privacy.randomness`), never from torch's global generator,
    which the user's seed drives. `before_noise()` runs before every noise draw (the trainer counts the
    step in the privacy ledger there: if that fails, the step is not taken). The engine is kept for its
    record of (σ, q, steps) actually taken.

    ``n_units``: patient-level DP (``dpcore.privacy.units``): q is the rate over that many patients, the
    optimizer normalises by the expected number of patients, and no loader is made (the trainer samples
    patients itself, from ``randomness.sampling``); the returned loader is then None.

    ``world`` (``dpcore.privacy.distributed.World``): one process of a multi-process run. Its loader samples only its
    shard of `train_set`, the normalisation stays the expected size of the *global* logical batch n·q, only
    rank 0 draws noise (pass `before_noise` there only), and each real step sums the ranks' gradients and
    agrees on ``wants_stop()`` (any rank's) before the update.
    """
    n = len(train_set) if n_units is None else int(n_units)
    if world is not None:
        from dpcore.privacy import distributed

        if n_units is not None:
            raise ConfigError("privacy_unit", "patient-level sampling is not spread across processes",
                              "train patient-level runs in one process")
        train_set = distributed.shard(train_set, world)
    if sample_rate is None:
        if batch_size is None:
            raise TypeError("privatize needs batch_size or sample_rate")
        sample_rate = accounting.sampling_plan(n, batch_size, 1).sample_rate
    randomness = randomness or SecretRandomness(next(model.parameters()).device)
    engine = PrivacyEngine(accountant="rdp")
    loader = None
    if n_units is None:
        loader = DPDataLoader(train_set, sample_rate=sample_rate, generator=randomness.sampling,
                              collate_fn=collate_rows if isinstance(train_set, BatchedTensorDataset) else None)
        loader.batch_sampler.steps = max(1, round(1 / sample_rate))  # int(1/q) loses a step for some q (1/93)
    expected_batch_size = int(n * sample_rate)  # Opacus' own normalisation: the expected, not the actual, batch
    if grad_sample_mode == "bk":
        module, dp_optimizer, criterion = grad_modes.make_bookkeeping(
            model, optimizer, torch.nn.CrossEntropyLoss(), noise_multiplier=noise_multiplier, clip_norm=clip_norm,
            expected_batch_size=expected_batch_size)
    elif grad_modes.uses_wrapped_criterion(grad_sample_mode):
        raise ConfigError("grad_sample_mode", f"{grad_sample_mode!r} is not wired into the trainer",
                          "use hooks, functorch or bk")
    else:
        module = engine._prepare_model(model, batch_first=True, max_grad_norm=clip_norm, loss_reduction="mean",
                                       grad_sample_mode=grad_sample_mode)
        module.forbid_grad_accumulation()
        dp_optimizer = engine._prepare_optimizer(
            optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
            expected_batch_size=expected_batch_size, loss_reduction="mean", noise_generator=randomness.noise,
            distributed=False, clipping="flat", grad_sample_mode=grad_sample_mode)
        criterion = torch.nn.CrossEntropyLoss()
    accountant_hook = engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate)

    def after_noisy_step(opt) -> None:  # the accountant's record, then fresh OS entropy for the next step
        accountant_hook(opt)
        randomness.reseed()

    dp_optimizer.attach_step_hook(after_noisy_step)
    randomness.attach(dp_optimizer, loader)
    if before_noise is not None:
        _guard_noise(dp_optimizer, before_noise)
    if world is not None:
        distributed.distribute_optimizer(dp_optimizer, world, wants_stop or (lambda: False))
    return engine, module, dp_optimizer, loader, criterion


def _guard_noise(optimizer, before_noise) -> None:
    """Call `before_noise()` before each of the optimizer's noise draws; if it raises, no noise is drawn and
    the step is not taken (Opacus adds noise in `add_noise`, then scales, then steps)."""
    add_noise = optimizer.add_noise

    def guarded() -> None:
        before_noise()
        add_noise()

    optimizer.add_noise = guarded


def train(
    config: RunConfig,
    store: RunStore,
    listener: Listener | None = None,
    cancel: threading.Event | None = None,
    run_id: str | None = None,
    *,
    kind: str = "train",
    force_public: bool = False,
    resume: bool = False,
    checkpoint_every: float | None = None,
    world=None,
) -> TrainResult:
    """Train one run end to end and store it. Re-raises the error of a failed run after recording it.

    ``kind="pretrain"`` marks a non-private run on data declared public (`dpcore.training.pretrain`): it is
    refused when the ledger knows any of its images from a private run, unless ``force_public``.
    ``resume=True`` continues the stored run `run_id` from its checkpoint (`dpcore.training.checkpoint`; written every
    ``checkpoint_every`` seconds, default $DPCORE_CHECKPOINT_EVERY or 300, 0 = never) with fresh secret noise
    and sampling, under a new ledger entry for the remaining steps.

    ``world`` (``dpcore.privacy.distributed.World``, from torchrun): this process is one rank of a multi-process run.
    Rank 0 creates and records the run (store, ledger, card, events); the others train their shard and
    write nothing.
    """
    main = world is None or world.is_main
    if world is not None:
        from dpcore.privacy import distributed

        distributed.refuse(config, resume=resume, kind=kind)
    if main:
        run_id = run_id or store.create_run(config)
    if world is not None:
        run_id = world.broadcast_object(run_id)
    cancel = cancel or threading.Event()
    emit = fan_out(BufferedEventWriter(store), listener) if main else (lambda event: None)
    t0 = time.time()
    if main:
        store.set_status(run_id, "running")
    emit(Event("started", run_id, message=f"{config.dataset} / {config.backbone} / "
               + (f"ε={config.epsilon:g}" if config.private else "non-private")
               + (f" / {world.size} processes" if world is not None else "")))
    run = _Run(config, emit, cancel, t0, run_id=run_id, store=store, kind=kind, force_public=force_public,
               resume=resume, checkpoint_every=checkpoint_every, world=world)
    try:
        return run.execute()
    except KeyboardInterrupt:
        run.fail("cancelled", "interrupted (Ctrl-C) before the run finished")
        raise
    except BaseException as exc:
        run.fail("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=8))
        raise


def fit_arrays(config: RunConfig, model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, *,
               spending, normalize: torch.nn.Module | None = None, device: torch.device | str = "cpu",
               mechanism: tuple[float, float, int] | None = None, physical_batch: int | None = None,
               head_only: bool = False, cancel: threading.Event | None = None,
               created_weights: dict | None = None, units=None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `model` on in-memory (x, y) with exactly the run recipe of `config` — the same loop as `train`:
    DP-SGD or not, augmult, augmentation policy, EMA, lr schedule, weight standardisation, scope — and
    return the trained plain module (EMA weights when ema_decay is set, as a run saves) and what ran.

    For replaying a run's mechanism on other data (the membership audit): ``mechanism = (σ, q, T)``
    fixes the noise, the Poisson rate and the steps (else they are planned from the config as `train`
    does). ``spending`` is the ledger hold that counts the steps (`Ledger.begin`): no noisy step is taken
    without one. Nothing is stored. For a non-private config, ``mechanism = (None, q, T)`` replays the
    non-private loop at rate q for T steps: logical batches of ⌊q·n⌋ examples (≥ 1/q of them an epoch, so
    T is reached) instead of the config's batch size, which was planned for another n.

    ``units`` (a `dpcore.privacy.units.UnitPlan` over the rows of x): patient-level DP-SGD, q over its units
    (the config's privacy_unit must be "patient").
    """
    if (units is not None) != (config.privacy_unit == "patient"):
        raise ConfigError("privacy_unit", f"privacy_unit {config.privacy_unit!r} with{'out' if units is None else ''} "
                          "a unit plan", "pass units= exactly when the config's privacy_unit is patient")
    if mechanism is not None and mechanism[0] is None and not config.private:
        config = config.replace(batch_size=max(1, math.floor(len(train_y) * float(mechanism[1]))))
    run = _Run(config, lambda event: None, cancel or threading.Event(), time.time(), run_id="fit")
    run.device = torch.device(device)
    run.created = None
    run.created_weights = created_weights or {}
    run.K = config.augmult
    run.policy = augment.resolve_policy(config.augment, config.augmult, config.dataset, config.data_dir)
    run.physical_batch = physical_batch or config.max_physical_batch_size
    run.head_only = head_only
    run.model = model.to(run.device)
    run.normalize = (normalize or torch.nn.Identity()).to(run.device)
    run.train_set = BatchedTensorDataset(train_x, train_y)
    run.n_train, run.n_test = len(train_y), 0
    run.units = units
    run.spending = spending
    run._configure(mechanism)
    try:
        run._loop()
    except Cancelled:
        raise
    trained = run._final_model()
    trained.zero_grad(set_to_none=True)
    trained.eval()
    info = run._privacy_spent() if config.private else {"private": False, "steps": run.step}
    info.update(sample_rate=run.sample_rate, steps=run.step, expected_batch_size=run.n_sampled * run.sample_rate)
    return trained, info


class _Run:
    """The state of one run while it trains; split out of `train` so each phase reads on its own."""

    def __init__(self, config: RunConfig, emit: Listener, cancel: threading.Event, t0: float, *,
                 run_id: str, store: RunStore | None = None, kind: str = "train", force_public: bool = False,
                 resume: bool = False, checkpoint_every: float | None = None, world=None):
        self.config, self.store, self.run_id, self.emit, self.cancel, self.t0 = (
            config, store, run_id, emit, cancel, t0)
        self.world = world  # dpcore.privacy.distributed.World of a multi-process run, else None
        self.main = world is None or world.is_main  # rank 0 (or the only process) writes; the others train
        self.kind, self.force_public = kind, force_public
        self.resume = resume
        if checkpoint_every is None:
            checkpoint_every = float(os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT_EVERY)
        self.checkpoint_every = checkpoint_every
        self._last_checkpoint = time.time()
        self.step_offset = 0  # steps taken before this process (a resumed run): not in this Opacus engine's record
        self.resumed: dict[str, Any] | None = None
        self.step = 0
        self.noise_draws = 0  # noise additions actually made (counted after the ledger accepted each)
        self.last_metrics: dict[str, Any] | None = None
        self.last_probs: np.ndarray | None = None
        self.eval_history: list[dict[str, Any]] = []
        self.metrics_raw: dict[str, Any] | None = None  # last evaluation of the raw (last-iterate) weights
        self.metrics_ema: dict[str, Any] | None = None  # ... and of the EMA weights (when ema_decay is set)
        self.ema: EMA | None = None
        self.grad_sample_mode: str | None = None
        self.head_only = False
        self.spending = None  # the ledger's hold: counts steps before they are taken
        self.engine = None
        self.splits = None
        self.lineage = None
        self.verdict = None
        self.group = None
        self.units = None  # patient-level DP: the training images grouped by patient (dpcore.privacy.units)
        self.created_weights: dict = {}

    # -- setup -----------------------------------------------------------------------------
    def execute(self) -> TrainResult:
        cfg = self.config
        cfg.check_paths()
        # The user's seed fixes what may be public: initialisation, augmentation draws, splits. The DP noise
        # and the Poisson sampling never use these generators (dpcore.privacy.randomness).
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        if self.world is not None:
            self.device = self.world.device(self.device)
        with self.world.main_first() if self.world is not None else contextlib.nullcontext():
            self._prepare()
        self._configure()
        if self.world is not None:  # rank 0's starting weights everywhere, whatever each rank initialised
            self.world.broadcast_module(self._inner_model())
        if self.resume:
            self._restore()
        if self.main:
            self._open_ledger()  # before any step: a run that cannot record its spending takes none
        self.emit(Event("plan", self.run_id, total_steps=self.total_steps, elapsed=self.elapsed(),
                        data=self.plan_summary()))
        status = "done"
        try:
            self._loop()
        except Cancelled:
            status = "cancelled"
        return self._finish(status)

    def _prepare(self) -> None:
        """The data, the model and what is cached from them (by rank 0 first in a multi-process run)."""
        cfg = self.config
        splits = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction,
                              cache_dir=cfg.cache_dir, medmnist_size=cfg.medmnist_size, split=cfg.split)
        self.splits = splits
        self.n_classes = len(splits.class_names)
        created = models.create_model(cfg.backbone, self.n_classes, pretrained=cfg.pretrained,
                                      image_size=cfg.image_size, weight_standardization=cfg.weight_standardization)
        self.created = created
        self.created_weights = created.weights
        self.trainable = models.set_trainable(created.model, cfg.scope, cfg.trainable_blocks)
        # Augmentation multiplicity: each example becomes K augmented views (rows i·K .. i·K+K-1); the
        # physical batch bounds rows (memory), so it holds max_physical_batch_size // K examples.
        self.K = cfg.augmult
        self.policy = augment.resolve_policy(cfg.augment, cfg.augmult, cfg.dataset, cfg.data_dir)
        self.physical_batch = cfg.max_physical_batch_size
        self.features = None
        self.feature_stage = None  # "pooled" (head) | "prefix:<start>" (last-k on cached frozen blocks)
        split = self._last_k_split()
        if cfg.scope == "head":
            self._prepare_features()
        elif split is not None:
            self._prepare_prefix(*split)
        else:
            self._prepare_images()
        if cfg.privacy_unit == "patient":
            self._prepare_units()

    def _configure(self, mechanism: tuple[float, float, int] | None = None) -> None:
        """The sampling plan (q, T), the evaluation schedule, the optimizer, DP-SGD and the recipe."""
        cfg = self.config
        if mechanism is None:
            sampling = accounting.sampling_plan(self.n_sampled, cfg.batch_size, cfg.epochs)
            self.spe, self.total_steps, self.sample_rate = sampling.steps_per_epoch, sampling.steps, sampling.sample_rate
            sigma = None
        else:
            sigma = None if mechanism[0] is None else float(mechanism[0])  # None: non-private (or calibrate σ)
            self.sample_rate, self.total_steps = float(mechanism[1]), int(mechanism[2])
            self.spe = max(1, round(1 / self.sample_rate))
        self.epochs = math.ceil(self.total_steps / self.spe)
        self.eval_steps = (_eval_schedule(self.spe, self.epochs, cfg.evals_per_epoch)
                           if self.n_test and self.main else set())  # rank 0 alone evaluates
        self.optimizer = _make_optimizer(cfg, [p for p in self.model.parameters() if p.requires_grad])
        self.criterion = torch.nn.CrossEntropyLoss()
        if cfg.private:
            self._setup_private(sigma)
        self._setup_recipe()

    @property
    def n_sampled(self) -> int:
        """What Poisson sampling draws from: patients (patient-level DP) or images."""
        return self.units.n_units if self.units is not None else self.n_train

    def _prepare_units(self) -> None:
        """Patient-level DP: each training image's patient (or lesion); refused where the data name none."""
        from dpcore.data.groups import groups_of, train_groups
        from dpcore.privacy.units import refuse_without_groups, unit_plan

        cfg = self.config
        group = self.group = train_groups(self.splits, cfg.dataset)  # _open_ledger reuses it
        if group is None:
            raise refuse_without_groups(cfg.dataset)
        self.units = unit_plan(group, self.train_kept)
        P = self.units.n_units
        test_group = groups_of(self.splits.test, self.splits.test_metadata, cfg.dataset)
        shared = group.shared_with(test_group) if test_group is not None else set()
        if shared:
            msg = (f"{len(shared)} {group.unit}s of the test split also have training images ({cfg.split} split): the "
                   f"test metrics partly measure {group.unit}s the model has seen. Use --split grouped for a test "
                   f"split of unseen {group.unit}s")
            self.warnings.append(msg)
            self.log("warning: " + msg)
        if cfg.batch_size > P:
            raise ConfigError("batch_size", f"with --privacy-unit patient the logical batch counts {group.unit}s, and "
                              f"{cfg.batch_size} is more than the {P} {group.unit}s in the training split",
                              f"use --batch-size {max(1, P // 4)} or smaller")
        if cfg.delta > 1.0 / P:
            msg = (f"delta={cfg.delta:g} is larger than 1/P = {1.0 / P:.3g} for P={P} {group.unit}s: use "
                   f"delta ≤ {0.1 / P:.1g}")
            self.warnings.append(msg)
            self.log("warning: " + msg)
        self.log(f"patient-level DP: {self.n_train} training images of {P} {group.unit}s (1-{self.units.largest} "
                 f"images each; ids: {group.source}); {group.unit}s are Poisson-sampled and each one's mean "
                 f"gradient is clipped to C={cfg.clip_norm:g}")

    def _prepare_images(self) -> None:
        """Full / bias scope: decode every image once to uint8; the whole model runs in each step."""
        cfg, created, splits = self.config, self.created, self.splits
        to_uint8 = make_to_uint8(created.data_config)
        self.log(f"decoding and resizing {len(splits.train)} train + {len(splits.test)} test images "
                 f"to {tuple(created.data_config['input_size'][1:])}")
        train_m = materialize(splits.train, to_uint8, skip_unreadable=cfg.skip_unreadable)
        test_m = materialize(splits.test, to_uint8, skip_unreadable=cfg.skip_unreadable)
        self.skipped = {"train": train_m.skipped, "test": test_m.skipped}
        self.n_train, self.n_test = len(train_m.labels), len(test_m.labels)
        self._check_data()
        self.model = created.model.to(self.device)
        self.normalize = Normalizer.from_config(created.data_config).to(self.device)
        self.train_set = BatchedTensorDataset(train_m.images, train_m.labels)
        self.test_x, self.test_y = test_m.images, test_m.labels
        self.train_kept = train_m.kept  # indices into splits.train / .test (unreadable files may have been skipped)
        self.test_kept = test_m.kept

    def _last_k_split(self):
        """Last-k without augmentation: the frozen blocks are a fixed public function of each image, so their
        output can be cached like head features (``models.split``); None where that does not apply."""
        cfg = self.config
        if cfg.scope != "last-k" or self.K != 1 or self.policy.active or self.head_only:
            return None
        from models.split import last_k_split

        return last_k_split(self.created.model, cfg.trainable_blocks)

    def _feature_key(self, stage: str = "pooled") -> str:
        cfg, created = self.config, self.created
        return features.feature_key(
            dataset=cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction,
            medmnist_size=cfg.medmnist_size, skip_unreadable=cfg.skip_unreadable, splits=self.splits,
            backbone=cfg.backbone, weights=created.weights, backbone_hash=features.backbone_digest(created.model),
            data_config=created.data_config, stage=stage)

    def _prepare_prefix(self, prefix, suffix) -> None:
        """Last-k: the frozen blocks' activations of every image, computed once and cached; DP-SGD trains the
        last k blocks and the head (``suffix``, sharing the model's parameters) on them. Same mechanism as
        on images: only the frozen part is not recomputed at each step."""
        cfg, created, splits = self.config, self.created, self.splits
        stage = f"prefix:{suffix.start}"
        feats = features.load_or_extract(
            key=self._feature_key(stage), cache_dir=features.default_cache_dir(self.store.root), splits=splits,
            model=created.model, data_config=created.data_config, device=self.device,
            skip_unreadable=cfg.skip_unreadable, batch_size=max(cfg.max_physical_batch_size, 64), log=self.log,
            fn=prefix)
        self._use_features(feats, stage)
        created.model.to(self.device)
        self.model = suffix.to(self.device)
        self.log(f"frozen blocks 0..{suffix.start - 1}: {self.n_train} train + {self.n_test} test activations "
                 f"{tuple(feats.train_x.shape[1:])} ({'cache hit' if feats.hit else 'extracted'}: {feats.path}); "
                 f"training the last {cfg.trainable_blocks} blocks and the head on them")

    def _use_features(self, feats, stage: str) -> None:
        splits = self.splits
        self.features, self.feature_stage = feats, stage
        self.skipped = feats.skipped
        self.n_train, self.n_test = len(feats.train_y), len(feats.test_y)
        self._check_data()
        self.normalize = torch.nn.Identity()
        self.train_set = BatchedTensorDataset(feats.train_x, feats.train_y)
        self.test_x, self.test_y = feats.test_x, feats.test_y
        self.test_kept = feats.test_kept
        skipped_train = {src for src, *_ in feats.skipped.get("train", [])}
        self.train_kept = [i for i in range(len(splits.train)) if splits.train.source(i) not in skipped_train]
        if len(self.train_kept) != self.n_train:
            raise RuntimeError(f"cached features hold {self.n_train} training rows but {len(self.train_kept)} "
                               "images are readable: delete the feature cache and run again")

    @property
    def _head_features(self) -> bool:
        """Training a linear head on pooled features (tiny steps: one thread, hooks)."""
        return self.head_only or getattr(self, "feature_stage", None) == "pooled"

    def _prepare_features(self) -> None:
        """Head scope: the frozen backbone's features, computed once and cached; DP-SGD trains the head alone.

        The backbone is a fixed public function of each image, so each private example enters training
        only through the head's per-example gradient: the same DP-SGD, on far cheaper steps.
        """
        cfg, created, splits = self.config, self.created, self.splits
        feats = features.load_or_extract(
            key=self._feature_key(), cache_dir=features.default_cache_dir(self.store.root), splits=splits,
            model=created.model, data_config=created.data_config, device=self.device,
            skip_unreadable=cfg.skip_unreadable, batch_size=max(cfg.max_physical_batch_size, 64), log=self.log)
        self._use_features(feats, "pooled")
        created.model.to(self.device)
        self.model = created.model.get_classifier()  # the head is a sub-module: training it trains the model
        # Per-example gradients of a linear head are small, so bigger physical batches are safe and faster.
        n_out = sum(p.numel() for p in self.model.parameters())
        self.physical_batch = max(cfg.max_physical_batch_size, min(8192, int(32e6 // max(n_out, 1))))
        self.log(f"features: {self.n_train} train + {self.n_test} test × {feats.dim} "
                 f"({'cache hit' if feats.hit else 'extracted'}: {feats.path}); training the head only")

    def _check_data(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.config.check_against_data(self.n_train)
        self.warnings = [str(w.message) for w in caught]
        for w in self.warnings:
            self.log("warning: " + w)

    def _setup_private(self, sigma: float | None = None) -> None:
        cfg = self.config
        # The fastest per-example clipping mode measured correct for this backbone and device
        # (bench/grad_modes.json). Not allowed: "ew" (torch's ExpandedWeights refuses the gradient
        # accumulation of virtual steps) and "ghost" (a second backward pass; bk does the same in one).
        head = self._head_features
        self.grad_sample_mode = "hooks" if head else grad_modes.choose_grad_sample_mode(
            cfg.backbone, self.device, allowed=TRAINER_MODES)
        if self.grad_sample_mode == "bk":
            from dpcore.privacy.bookkeeping import UnsupportedModel, check_supported
            try:
                check_supported(self.model)
            except UnsupportedModel as exc:  # e.g. a layer type without a rule: Opacus' hooks handle it
                self.log(f"book-keeping cannot clip this model ({exc.problem}); using hooks")
                self.grad_sample_mode = "hooks"
        if sigma is None:
            self.log(f"calibrating σ for ε={cfg.epsilon:g}, δ={cfg.delta:g}, q={self.sample_rate:.5f}, "
                     f"T={self.total_steps} ({cfg.accountant.upper()})")
            self.privacy_plan = accounting.plan(cfg.epsilon, cfg.delta, self.sample_rate, self.total_steps,
                                                cfg.accountant)
        else:  # a given mechanism (the audit replaying a run): its ε from the accountant
            self.privacy_plan = accounting.PrivacyPlan(
                cfg.accountant, sigma, self.sample_rate, self.total_steps, cfg.delta,
                accounting.epsilon(sigma, self.sample_rate, self.total_steps, cfg.delta, cfg.accountant))
        # Secret: seeded from the OS, reseeded every noisy step, never written anywhere. Only the explicit
        # debug mode derives it from the user's seed, and such a run carries no guarantee.
        self.randomness = SecretRandomness(
            self.device, insecure_seed=cfg.seed if cfg.insecure_reproducible_noise else None)
        self._privatize(self.grad_sample_mode)
        if self.grad_sample_mode == "bk" and self.K > 1:
            if hasattr(self.model, "views_per_example"):  # book-keeping averages the K views before clipping
                self.model.views_per_example = self.K
            else:  # an older book-keeping module: Opacus' hooks, with the views averaged in _average_views
                self.log("book-keeping here cannot average augmented views before clipping; using hooks")
                if hasattr(self.model, "remove_hooks"):
                    self.model.remove_hooks()
                self.model = self._plain_model
                self.optimizer = _make_optimizer(cfg, [p for p in self.model.parameters() if p.requires_grad])
                self.grad_sample_mode = "hooks"
                self._privatize("hooks")
        if self.loader is not None and abs(self.loader.sample_rate - self.sample_rate) > 1e-12:
            raise RuntimeError(f"Opacus samples at q={self.loader.sample_rate}, the plan assumed {self.sample_rate}")
        self.eps_tracker = accounting.EpsilonTracker(self.privacy_plan.noise_multiplier, self.sample_rate,
                                                     cfg.delta, cfg.accountant)
        self.eps_steps = set(accounting.checkpoint_steps(self.total_steps, 40)) | set(self.eval_steps)

    def _privatize(self, mode: str) -> None:
        self._plain_model = self.model
        self.engine, self.model, self.optimizer, self.loader, self.criterion = privatize(
            self.model, self.optimizer, self.train_set, sample_rate=self.sample_rate,
            noise_multiplier=self.privacy_plan.noise_multiplier, clip_norm=self.config.clip_norm,
            grad_sample_mode=mode, randomness=self.randomness,
            before_noise=self._before_noise if self.main else None,  # rank 0 draws the noise and counts it
            n_units=self.units.n_units if self.units is not None else None,
            world=self.world, wants_stop=self.cancel.is_set)

    def _before_noise(self) -> None:
        """Fail closed: the ledger counts this step before its noise is drawn, or the step is not taken."""
        if self.spending is None:
            raise RuntimeError("no privacy-ledger entry for this run: refusing to take a noisy step")
        self.spending.ensure(self.step + 1 - self.step_offset)  # this entry's steps (a resume has its own)
        self.noise_draws += 1

    # -- the privacy ledger, before the first step ----------------------------------------
    def _open_ledger(self) -> None:
        """Identify the images, state the lineage guarantee, check the budget, write the entry.

        Everything here happens before the first step; any failure (unwritable, corrupt or locked
        ledger, unreadable image, a budget that would be exceeded) ends the run with nothing spent.
        """
        from dpcore.privacy.ledger import BudgetExceeded, Ledger, LedgerError
        from dpcore.privacy import lineage
        from dpcore.data.groups import train_groups

        cfg = self.config
        ledger = Ledger()
        self.ledger = ledger
        train_images = self.splits.train.subset(self.train_kept)
        test_images = self.splits.test.subset(self.test_kept)
        self.log(f"privacy ledger {ledger.path}: identifying {len(train_images)} training and "
                 f"{len(test_images)} test images by content")
        ids_train = ledger.identify(train_images)
        ids_test = ledger.identify(test_images)
        private = cfg.private and not cfg.insecure_reproducible_noise
        sigma = self.privacy_plan.noise_multiplier if cfg.private else None
        if self.kind == "pretrain":
            self._check_public(ledger, ids_train)
        self.lineage = lineage.assess(self.created_weights, ledger=ledger, train_ids=ids_train,
                                      mechanism=(sigma, self.sample_rate, self.total_steps) if private else None,
                                      delta=cfg.delta, accountant=cfg.accountant)
        self.log(self.lineage.sentence)
        if self.units is not None and self.lineage.composed and not self.lineage.void:
            raise ConfigError("pretrained", "these starting weights were trained with DP on some of the same images, "
                              "and composing their per-image guarantee into a per-patient one is not implemented",
                              "start the patient-level run from public weights (hub, bundled, none), or train "
                              "image-level")
        if self.group is None:  # patient-level runs found it already (_prepare_units)
            self.group = train_groups(self.splits, cfg.dataset)
        verdict = ledger.verdict(ids_train, dataset=cfg.dataset, data_dir=cfg.data_dir,
                                 noise_multiplier=sigma if private else None, sample_rate=self.sample_rate,
                                 steps=self.total_steps - self.step_offset, delta=cfg.delta,
                                 per_unit=self.units is not None)
        self.verdict = verdict
        self.log("privacy budget: " + verdict.message)
        if verdict.exceeds and not cfg.allow_over_budget:
            raise BudgetExceeded(verdict.message)
        if verdict.exceeds:
            self.log("WARNING: launched past the privacy budget with --allow-over-budget; the ledger records it")
        try:
            self.spending = ledger.begin(
                self.ledger_run_id, train=ids_train, test=ids_test, dataset=cfg.dataset, data_dir=cfg.data_dir,
                kind=self.kind, private=cfg.private, insecure=cfg.insecure_reproducible_noise,
                noise_multiplier=sigma, sample_rate=self.sample_rate,
                planned_steps=self.total_steps - self.step_offset,
                delta=cfg.delta if cfg.private else None, accountant=cfg.accountant if cfg.private else None,
                label=self._label() + (f" (resumed at step {self.step_offset})" if self.resumed else ""),
                unit=self.unit_name, runs_dir=str(self.store.root) if self.store else None,
                over_budget=verdict.exceeds,
                owners=[self.group.ids[i] for i in self.train_kept] if self.group is not None else None)
        except LedgerError:
            raise
        except Exception as exc:  # sqlite, disk full, permissions: say what it means for the run
            raise LedgerError(f"the privacy ledger {ledger.path} could not record this run ({type(exc).__name__}: "
                              f"{exc}), so it takes no step. Fix: free disk space or make the file writable "
                              f"(or point {'DPCORE_LEDGER'} at a writable path)") from exc

    def _check_public(self, ledger, ids_train) -> None:
        """`pretrain` declares its data public: refuse images the ledger knows from private training."""
        from dpcore.privacy.ledger import LedgerError

        matches, n_known = ledger.lookup(ids_train)
        known = sorted({i for m in matches for i in m})
        if not known:
            return
        users = {e.run_id for e in ledger.entries()
                 if e.guaranteed and np.isin(ledger.run_image_ids(e.run_id), known).any()}
        if users and not self.force_public:
            raise LedgerError(
                f"{n_known:,} of these {len(matches):,} images were trained on privately before (run(s) "
                f"{', '.join(sorted(users)[:5])}{'…' if len(users) > 5 else ''}): declaring them public would void "
                "those runs' guarantees. Fix: pretrain on data that are public, or pass --force-public to record "
                "this as a non-private use of those images (their ε becomes ∞ in the ledger)")
        if users:
            self.log(f"WARNING: --force-public: {n_known} images known from private runs are used without DP; "
                     "the ledger voids their guarantee")

    def _label(self) -> str:
        cfg = self.config
        what = ("pretraining (declared public)" if self.kind == "pretrain" else
                "replayable noise: no guarantee" if cfg.insecure_reproducible_noise else
                f"ε={cfg.epsilon:g}" if cfg.private else "non-private")
        return f"{cfg.backbone}, {what}"

    def _setup_recipe(self) -> None:
        """EMA of the weights and the lr schedule (both act once per real optimizer step)."""
        cfg = self.config
        if cfg.ema_decay is not None and self.main:  # post-processing of what rank 0 releases
            self.ema = EMA(self._inner_model(), cfg.ema_decay)
        self.lr_schedule = LRSchedule(self.optimizer, self.total_steps, cfg.lr_schedule, cfg.warmup_fraction)
        self.lr_schedule.apply(0)
        if cfg.weight_standardization and cfg.pretrained != "none":
            self.log("warning: weight standardisation changes what pretrained conv weights compute; it is meant "
                     "for networks trained from scratch")

    def _inner_model(self) -> torch.nn.Module:
        """The trained module itself (inside Opacus' / book-keeping's wrapper)."""
        return getattr(self.model, "_module", self.model) if self.config.private else self.model

    def recipe_info(self) -> dict[str, Any]:
        """What the card and the plan say about the training recipe (augmult, EMA, WS, schedule, scope)."""
        cfg = self.config
        return {
            "augmult": cfg.augmult, "augment": cfg.augment, "augment_policy": self.policy.describe(),
            "views_averaged_before_clipping": cfg.augmult > 1 and cfg.private,
            "ema_decay": cfg.ema_decay,
            "ema_warmup": "decay_t = min(decay, (1+t)/(10+t))" if cfg.ema_decay is not None else None,
            "weight_standardization": cfg.weight_standardization,
            "weight_standardized_convs": self.created_weights.get("weight_standardized_convs", 0),
            "lr_schedule": cfg.lr_schedule, "warmup_fraction": cfg.warmup_fraction,
            "scope": cfg.scope, "trainable_blocks": cfg.trainable_blocks if cfg.scope == "last-k" else None,
            "privacy_note": ("augmented views of one example are averaged before clipping, so each example "
                             "still contributes one gradient of norm ≤ C and ε is that of the same σ, q, T; "
                             "the EMA is post-processing of the DP iterates (no privacy cost)"
                             if cfg.private else "non-private run"),
        }

    def plan_summary(self) -> dict[str, Any]:
        cfg = self.config
        out = {"n_train": self.n_train, "n_test": self.n_test, "steps_per_epoch": self.spe,
               "total_steps": self.total_steps, "class_names": self.splits.class_names,
               "device": str(self.device), "trainable_params": self.trainable, "recipe": self.recipe_info(),
               "privacy_unit": self.unit_name, "lineage": self.lineage.to_dict() if self.lineage else None,
               "budget": self.verdict.message if self.verdict else None,
               "processes": self.world.size if self.world is not None else 1}
        if self.group is not None and cfg.private and self.units is None:
            from dpcore.privacy.group_privacy import group_summary
            out["group_privacy"] = group_summary(self.privacy_plan.epsilon, cfg.delta, self.group)
        if self.group is not None and cfg.private:
            from dpcore.privacy.unit_guarantee import compare_units
            out["unit_comparison"] = compare_units(cfg, self.group, self.n_train)
        if self.features is not None:
            out["features"] = self.features_info()
        if cfg.private:
            out.update(self.privacy_plan.to_dict(), target_epsilon=cfg.epsilon, clip_norm=cfg.clip_norm,
                       grad_sample_mode=self.grad_sample_mode,
                       expected_batch_size=self.n_sampled * self.sample_rate,
                       **self.unit_facts(self.privacy_plan.noise_multiplier, self.total_steps,
                                         self.privacy_plan.epsilon))
        return out

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        # A linear head on cached features is far too small to split across threads: on 2 cores its
        # ops run ~100x slower with torch's default thread pool than with one thread (measured).
        small = self._head_features and self.device.type == "cpu"
        threads = torch.get_num_threads()
        if small:
            torch.set_num_threads(1)
        try:
            for epoch in range(self.step // self.spe, self.epochs):  # a resumed run starts mid-way
                if self.step >= self.total_steps:
                    break
                if self.config.private and self.units is not None:
                    self._patient_epoch(epoch)
                elif self.config.private:
                    self._private_epoch(epoch)
                else:
                    self._nonprivate_epoch(epoch)
        finally:
            if small:
                torch.set_num_threads(threads)

    def _private_epoch(self, epoch: int) -> None:
        stepped = []
        previous_hook = self.optimizer.step_hook

        def on_real_step(opt) -> None:  # called by Opacus only when noise was added and a step taken
            if previous_hook is not None:
                previous_hook(opt)
            stepped.append(True)

        self.optimizer.attach_step_hook(on_real_step)
        self.loader.batch_sampler.steps = (epoch + 1) * self.spe - self.step  # all of it, unless resumed mid-epoch
        with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=self._examples_per_batch(),
                                optimizer=self.optimizer) as physical_loader:
            for x, y in physical_loader:
                self._check_cancel()
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                if len(y) == 0 and self.grad_sample_mode != "bk":
                    self._empty_batch()
                else:
                    out = self.model(self._inputs(x))
                    # The loss of a private Poisson batch is never read out: it is a statistic of private
                    # examples that ε does not cover (only the noisy model and test-split figures are released).
                    loss = self.criterion(out, augment.expand_views(y.to(self.device), self.K))
                    loss.backward()
                    if self.K > 1 and self.grad_sample_mode != "bk":
                        self._average_views(len(y))
                self.optimizer.step()
                if stepped:
                    stepped.clear()
                    self._after_step(epoch, None)
                    if self.step >= self.total_steps:
                        break

    # -- patient-level DP-SGD (dpcore.privacy.units) -----------------------------------------
    def _patient_epoch(self, epoch: int) -> None:
        """1/q logical steps: Poisson-sample patients, cut their images into physical batches, one noisy step."""
        for _ in range((epoch + 1) * self.spe - self.step):
            if self.step >= self.total_steps:
                break
            self._check_cancel()
            sampled = self.units.sample(self.sample_rate, self.randomness.sampling)
            self._patient_step(self.units.chunks(sampled, self.physical_batch, self.K))
            self._after_step(epoch, None)

    def _patient_step(self, chunks) -> None:
        """Each chunk's clipped per-patient gradients are accumulated by the DP optimizer (a skipped step);
        the last chunk's step adds the noise once and updates the model. No patient sampled: noise only."""
        from dpcore.privacy.units import Oversized

        if not chunks:
            self.optimizer.zero_grad(set_to_none=True)
            self._no_contribution()
            self.optimizer.step()
            return
        for i, chunk in enumerate(chunks):
            self._check_cancel()
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            if isinstance(chunk, Oversized):
                self._oversized_gradient(chunk)
            else:
                self._chunk_gradient(chunk)
            self.optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
            self.optimizer.step()

    def _chunk_gradient(self, chunk) -> None:
        """n patients × k images × K views, unit-major: the per-example machinery treats k·K rows as one
        example, so each patient gets one gradient, the mean over their rows, clipped by the optimizer."""
        x, y = self.train_set[torch.as_tensor(chunk.rows)]
        rows_per_unit = chunk.k * self.K
        bk = self.grad_sample_mode == "bk"
        if bk:
            self.model.views_per_example = rows_per_unit
        try:
            out = self.model(self._inputs(x))
            loss = self.criterion(out, augment.expand_views(y.to(self.device), self.K))
            loss.backward()
        finally:
            if bk:
                self.model.views_per_example = self.K
        if not bk:
            average_views(self.model, chunk.n, rows_per_unit)

    def _oversized_gradient(self, chunk) -> None:
        """One patient with more images than a physical batch holds: their mean gradient accumulated exactly
        over the pieces by plain autograd (no per-example machinery), then clipped as one patient."""
        params = list(self.optimizer.params)
        rows = chunk.k * self.K
        with self._plain_gradients() as plain:
            for piece in chunk.pieces:
                self._check_cancel()
                x, y = self.train_set[torch.as_tensor(piece)]
                out = plain(self._inputs(x))
                loss = torch.nn.functional.cross_entropy(
                    out, augment.expand_views(y.to(self.device), self.K), reduction="sum") / rows
                loss.backward()  # .grad accumulates over the pieces: the patient's mean gradient
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        if self.grad_sample_mode == "bk":  # book-keeping's optimizer takes the clipped sum in p.grad
            from dpcore.privacy.bookkeeping import CLIP_EPS

            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            coef = (self.config.clip_norm / (norm + CLIP_EPS)).clamp(max=1.0)
            for p, g in zip(params, grads):
                p.grad = g * coef
        else:  # Opacus clips a one-row per-example gradient
            for p, g in zip(params, grads):
                p.grad_sample = g.unsqueeze(0)

    @contextlib.contextmanager
    def _plain_gradients(self):
        """The wrapped model with its per-example machinery off, for ordinary autograd gradients."""
        wrapper = self.model
        inner = wrapper._module
        if self.grad_sample_mode == "bk":
            wrapper.capturing = False
            try:
                yield inner
            finally:
                wrapper.capturing = True
        else:
            wrapper.disable_hooks()
            try:
                yield inner
            finally:
                wrapper.enable_hooks()

    def _no_contribution(self) -> None:
        """An empty logical batch: zero clipped sum, so the step is noise only (as the accountant assumes)."""
        if self.grad_sample_mode == "bk":
            for p in self.optimizer.params:
                p.grad = torch.zeros_like(p)
        else:
            self._empty_batch()

    def _nonprivate_epoch(self, epoch: int) -> None:
        cfg = self.config
        order = torch.randperm(self.n_train)  # the user's seed: the same order on every rank
        done = self.step - epoch * self.spe  # batches of this epoch taken before a resume
        for start in range(done * cfg.batch_size, self.n_train, cfg.batch_size):
            if self.step >= self.total_steps:
                break
            idx = order[start:start + cfg.batch_size]
            mine = idx if self.world is None else idx[self.world.rank::self.world.size]
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            losses = []
            for chunk in mine.split(self._examples_per_batch()):
                self._check_cancel()
                x, y = self.train_set[chunk]
                out = self.model(self._inputs(x))  # K views per example: the plain mean over all rows
                loss = self.criterion(out, augment.expand_views(y.to(self.device), self.K))
                (loss * (len(chunk) / len(idx))).backward()  # gradient of the mean over the logical batch
                losses.append((float(loss.detach()), len(chunk)))
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.world is not None:  # every rank's share of the logical batch, and its loss
                self._check_cancel()
                mine_loss = torch.tensor([sum(v * k for v, k in losses), float(len(mine))], dtype=torch.float64)
                total = self.world.sum_gradients(params, self.cancel.is_set(), extra=mine_loss)
                losses = [(float(total[0]) / max(float(total[1]), 1.0), int(total[1]))]
            if self.main:
                if self.spending is None:
                    raise RuntimeError("no privacy-ledger entry for this run: refusing to train")
                self.spending.ensure(self.step + 1 - self.step_offset)  # counted before it is taken: it voids its images
            self.optimizer.step()
            if self.world is not None and self.world.verify:
                self.world.verify_identical(params)
            self._after_step(epoch, losses)

    def _empty_batch(self) -> None:
        """An empty Poisson batch (each example left out, which happens): zero per-example gradients, so the
        step is noise only, as the accountant assumes. No forward pass: some layers (the functorch fallback
        of weight-standardised convs) cannot run on zero rows."""
        for p in self.model.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def _check_cancel(self) -> None:
        if self.world is not None:  # every rank stops after the same step: the flag the last all-reduce agreed
            if self.world.stop_agreed:
                raise Cancelled()
            return
        if self.cancel.is_set():
            raise Cancelled()

    def _examples_per_batch(self) -> int:
        return max(1, self.physical_batch // self.K)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A physical batch on the device, as K augmented views per example (example-major), normalised."""
        x = x.to(self.device)
        if self.K > 1 or self.policy.active:
            x = augment.views(x.float(), self.K, self.policy)
        return self.normalize(x)

    def _average_views(self, n: int) -> None:
        average_views(self.model, n, self.K)

    def _after_step(self, epoch: int, losses: list[tuple[float, int]] | None) -> None:
        """`losses`: the training-batch losses of a non-private step (None for DP steps: never released)."""
        self.step += 1
        if self.ema is not None:
            self.ema.update()
        self.lr_schedule.apply(self.step)  # the lr of the next real step
        loss = None
        if losses:
            n = sum(k for _, k in losses)
            loss = sum(v * k for v, k in losses) / n if n else None
        eps = None
        if self.config.private and self.main and (self.eps_tracker.cheap or self.step in self.eps_steps):
            eps = self.eps_tracker(self.step)
        elapsed = self.elapsed()
        eta = elapsed / self.step * (self.total_steps - self.step)
        self.emit(Event("step", self.run_id, step=self.step, total_steps=self.total_steps,
                        epoch=self.step / self.spe, loss=loss, epsilon=eps, elapsed=elapsed, eta=eta))
        if self.step in self.eval_steps:
            self.last_metrics = self.evaluate_all()
            self.eval_history.append(self._history_entry())
            self.emit(Event("eval", self.run_id, step=self.step, total_steps=self.total_steps,
                            epoch=self.step / self.spe, epsilon=eps, metrics=self.last_metrics,
                            elapsed=self.elapsed(), eta=eta))
        if (self.store is not None and self.main and self.checkpoint_every and self.step < self.total_steps
                and time.time() - self._last_checkpoint >= self.checkpoint_every):
            self._save_checkpoint()

    def evaluate_all(self) -> dict[str, Any]:
        """Evaluate the raw weights and, with EMA, the averaged ones; returns (and keeps the predictions
        of) the EMA metrics when ema_decay is set, the raw ones otherwise."""
        self.metrics_raw = self.evaluate()
        if self.ema is None:
            return self.metrics_raw
        with self.ema.swapped_in():
            self.metrics_ema = self.evaluate()
        return self.metrics_ema

    def _history_entry(self) -> dict[str, Any]:
        entry = {"step": self.step, **_headline(self.last_metrics)}
        if self.ema is not None:
            entry.update(raw=_headline(self.metrics_raw), ema=_headline(self.metrics_ema))
        return entry

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Metrics on the test split (not the private training data: what is released beside the model)."""
        self.model.eval()
        probs, losses = [], 0.0
        for start in range(0, self.n_test, self.physical_batch):
            x = self.test_x[start:start + self.physical_batch].to(self.device)
            y = self.test_y[start:start + self.physical_batch].to(self.device)
            logits = self.model(self.normalize(x))
            losses += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
        self.last_probs = torch.cat(probs).numpy()
        metrics = classification_metrics(self.test_y.numpy(), self.last_probs, self.splits.class_names)
        metrics["loss"] = losses / max(self.n_test, 1)
        return metrics

    # -- the end ---------------------------------------------------------------------------
    def _final_model(self) -> torch.nn.Module:
        """The module that is released: the EMA weights when ema_decay is set, standardised weights baked."""
        raw_model = self._inner_model()
        if self.ema is not None:  # the saved model is the EMA one (post-processing of the DP iterates)
            self.ema.copy_to()
        if self.config.weight_standardization:  # plain convs holding the standardised weights: same function
            models.factory.bake_weight_standardization(raw_model)
        return raw_model

    def _steps_counted(self) -> int:
        """Noisy steps taken (Opacus' record; the guard's count of noise draws if that is larger)."""
        history = self.engine.accountant.history if self.engine is not None else []
        return max(sum(n for _, _, n in history), self.noise_draws)

    def _finish(self, status: str) -> TrainResult:
        cfg = self.config
        if not self.main:  # rank 0 records the run; this rank's replica is identical and not saved
            return TrainResult(self.run_id, status, {})
        privacy = self._privacy_spent()
        # The exact count first: until this succeeds the ledger holds the (larger) reserved count.
        self._finish_ledger(status, privacy)
        if status == "done" and (self.last_metrics is None or self.eval_history[-1]["step"] != self.step):
            self.last_metrics = self.evaluate_all()
        self._final_model()
        # The head path trains a sub-module of created.model in place: the full model (frozen backbone +
        # trained head) is saved, so reloading and predicting work exactly as for any other run.
        saved = self.created.model if self.features is not None else self._inner_model()
        run_dir = self.store.run_dir(self.run_id)
        guarantee = self.lineage.to_dict() if self.lineage else None
        lineage_out = self._lineage_out(privacy)
        save_model(saved, run_dir / "model.safetensors", self.splits.class_names, self.created.data_config,
                   self.run_id, lineage=lineage_out)
        if self.last_probs is not None:  # test-split predictions, for the confusion matrix, ROC and gallery
            probs, labels = self.last_probs, self.test_y.numpy()
            kept = np.asarray(self.test_kept, dtype=np.int64)
            atomic_write(run_dir / "test_predictions.npz",
                         lambda tmp: np.savez(tmp, probs=probs, labels=labels, test_index=kept))
        card = build_card(
            run_id=self.run_id, config=cfg, status=status, splits=self.splits, n_train=self.n_train,
            n_test=self.n_test, skipped=self.skipped, created=self.created, trainable=self.trainable,
            privacy=privacy, metrics=self.last_metrics, eval_history=self.eval_history,
            device=str(self.device), duration=self.elapsed(), warnings=self.warnings,
            recipe=self.recipe_info(), metrics_raw=self.metrics_raw, metrics_ema=self.metrics_ema,
            lineage=guarantee, lineage_chain=lineage_out, group=self.group if self.units is None else None,
        )
        if self.features is not None:
            card["model"]["features"] = self.features_info()
        if self.world is not None:
            card["training"]["distributed"] = self.world.describe()
        if self.last_probs is not None:  # temperature on half the TEST split (never training images); never fails
            from dpcore.training import calibration

            calibration.for_finished_run(self.store, self.run_id, card, probs, labels, kept, cfg.seed)
        self.store.write_json(self.run_id, "card.json", card)
        if status == "done":  # a finished run is never resumed: its checkpoint is dead weight
            from dpcore.training import checkpoint

            checkpoint.remove(run_dir)
        self.store.record_results(self.run_id, self.last_metrics, card["privacy"])  # with the guarantee's facts
        self.store.set_status(self.run_id, status)
        self.emit(Event("finished" if status == "done" else "cancelled", self.run_id, step=self.step,
                        total_steps=self.total_steps, epoch=self.step / self.spe,
                        epsilon=privacy.get("epsilon"), metrics=self.last_metrics, elapsed=self.elapsed(),
                        eta=0.0, data={"card": card}))
        return TrainResult(self.run_id, status, card)

    def _lineage_out(self, privacy: dict[str, Any]) -> list[dict[str, Any]]:
        """The lineage the saved weights carry: their ancestors' and this run's own record."""
        from dpcore.privacy import lineage

        record = lineage.run_record(
            run_id=self.run_id, ledger_id=self.ledger.ledger_id, kind=self.kind, config=self.config,
            privacy=privacy, n_train=self.n_train, dataset_name=self.ledger_dataset_name(),
            guarantee=self.lineage)
        return (self.lineage.chain if self.lineage else []) + [record]

    def ledger_dataset_name(self) -> str:
        from dpcore.privacy.ledger import dataset_name

        return dataset_name(self.config.dataset, self.config.data_dir)

    def _finish_ledger(self, status: str, privacy: dict[str, Any] | None) -> None:
        if self.spending is None:
            return
        steps = self._steps_counted() if self.config.private else self.step - self.step_offset  # this entry's
        eps = privacy.get("epsilon") if privacy and privacy.get("private") and \
            not self.config.insecure_reproducible_noise else None
        try:
            self.spending.finish(status, steps, eps)
        except Exception as exc:  # noqa: BLE001 - the reserved count (≥ steps taken) stays in the ledger
            self.log(f"WARNING: the privacy ledger could not store this run's final step count ({type(exc).__name__}: "
                     f"{exc}); it keeps the reserved count of {self.spending.reserved} steps (≥ the {steps} taken)")

    def fail(self, status: str, message: str, trace: str = "") -> None:
        """Record a failed or interrupted run. Each part is tried on its own (a full disk can break any of
        them); the ledger part comes first and needs nothing the others need."""
        if not self.main:  # rank 0 records the run (it sees this rank's end as a failed collective)
            import sys

            print(f"dpcore: rank {self.world.rank} of run {self.run_id} ended ({status}): {message}", file=sys.stderr)
            return
        problems = []
        try:
            privacy = self._privacy_spent() if self.config.private and self.engine is not None else None
        except Exception:  # noqa: BLE001
            privacy = None
        try:
            self._finish_ledger(status, privacy)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"ledger: {exc}")
        if self.store is not None:
            try:
                self.store.set_status(self.run_id, status, error=message + ("\n" + trace if trace else ""))
            except Exception as exc:  # noqa: BLE001
                problems.append(f"run store: {type(exc).__name__}: {exc}")
        try:
            self.emit(Event("failed" if status == "failed" else "cancelled", self.run_id, elapsed=self.elapsed(),
                            message=message))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"events: {type(exc).__name__}: {exc}")
        if problems:
            import sys

            print(f"dpcore: run {self.run_id} ended ({message}); recording it also failed: " + "; ".join(problems)
                  + (f". The privacy ledger holds {self.spending.reserved} reserved steps for it."
                     if self.spending is not None else ""), file=sys.stderr)

    def _privacy_spent(self) -> dict[str, Any]:
        """The guarantee for what was actually trained, from Opacus' own record of (σ, q, steps)."""
        cfg = self.config
        if not cfg.private:
            return {"private": False, "epsilon": None, "delta": None, "accountant": None,
                    "noise_multiplier": None, "sample_rate": None, "steps": self.step, "clip_norm": None}
        history = self.engine.accountant.history
        sigma = self.privacy_plan.noise_multiplier
        if any(abs(s - sigma) > 1e-12 or abs(q - self.sample_rate) > 1e-12 for s, q, _ in history):
            raise RuntimeError(f"Opacus recorded steps with other (σ, q) than planned: {history}")
        steps = sum(n for _, _, n in history) + self.step_offset
        if steps != self.step:
            raise RuntimeError(f"Opacus counted {steps - self.step_offset} noisy steps (+ {self.step_offset} before "
                               f"a resume), the loop counted {self.step}")
        eps = accounting.epsilon(sigma, self.sample_rate, steps, cfg.delta, cfg.accountant)
        return {"private": True, "epsilon": eps, "delta": cfg.delta, "accountant": cfg.accountant,
                "noise_multiplier": sigma, "sample_rate": self.sample_rate, "steps": steps,
                "planned_steps": self.total_steps, "planned_epsilon": self.privacy_plan.epsilon,
                "target_epsilon": cfg.epsilon, "clip_norm": cfg.clip_norm,
                "expected_batch_size": self.n_sampled * self.sample_rate, "poisson_sampling": True,
                "grad_sample_mode": self.grad_sample_mode, **self.unit_facts(sigma, steps, eps),
                "noise_randomness": ("REPLAYABLE from the user's seed (--insecure-reproducible-noise): no guarantee"
                                     if cfg.insecure_reproducible_noise else
                                     "secret: OS-seeded, reseeded every noisy step, never stored"),
                "insecure_reproducible_noise": bool(cfg.insecure_reproducible_noise),
                **({"resumed": self.resumed} if self.resumed else {})}

    @property
    def unit_name(self) -> str:
        """What one privacy unit is: "image", or the owner the data name ("patient"; "lesion" for HAM10000)."""
        return self.units.name if self.units is not None else "image"

    def unit_facts(self, sigma: float | None = None, steps: int | None = None,
                   epsilon: float | None = None) -> dict[str, Any]:
        """The privacy unit of a private run, and for patient-level runs what the same (σ, q, T) promises one
        image (replace-one: `accounting.epsilon_replace_one`). `epsilon`: the accountant's ε for (σ, q, T), which
        the caller has already (it is also what an image that is its patient's only one gets)."""
        if self.units is None:
            return {"unit": "image"}
        u = self.units
        out = {"unit": u.name, "n_units": u.n_units, "unit_source": u.source, "largest_unit": u.largest,
               "units": u.describe(), "expected_images_per_batch": self.n_train * self.sample_rate,
               "unit_gradient": (f"the mean over the {u.name}'s images in the batch (each image's augmented views "
                                 f"averaged first), clipped to C as one vector")}
        if sigma is not None and steps is not None and epsilon is not None:
            multi = int((u.sizes > 1).sum())
            out["per_image"] = {
                "epsilon_single_image_owner": epsilon,
                "epsilon_replace_one": accounting.epsilon_replace_one(sigma, self.sample_rate, steps,
                                                                      self.config.delta),
                "units_with_several_images": multi,
                "note": (f"an image whose {u.name} has no other image is added or removed with its {u.name} (the same "
                         f"ε); removing one image of a {u.name} with several changes that {u.name}'s clipped "
                         "gradient, i.e. replace-one adjacency, whose ε (PLD) is epsilon_replace_one"),
            }
        return out

    # -- checkpoints and resume (dpcore.training.checkpoint) ------------------------------------------
    def _optimizer_core(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "original_optimizer", self.optimizer)

    def _save_checkpoint(self) -> None:
        """Weights, optimizer, EMA, public RNG and step; never the secret noise/sampling generators."""
        from dpcore.training import checkpoint

        cfg = self.config
        meta = {"run_id": self.run_id, "total_steps": self.total_steps, "sample_rate": self.sample_rate,
                "noise_multiplier": self.privacy_plan.noise_multiplier if cfg.private else None,
                "privacy_unit": self.unit_name, "eval_history": self.eval_history, "last_metrics": self.last_metrics,
                "ema_updates": self.ema.updates if self.ema is not None else None, "saved_at": time.time()}
        try:
            checkpoint.save(self.store.run_dir(self.run_id), step=self.step, model=self._inner_model(),
                            optimizer=self._optimizer_core(), ema_shadow=self.ema.shadow if self.ema else None,
                            meta=meta)
        except Exception as exc:  # noqa: BLE001 - a failed checkpoint must not end a healthy run; say so
            self.log(f"WARNING: could not write a checkpoint at step {self.step} ({type(exc).__name__}: {exc})")
        else:
            self.log(f"checkpoint at step {self.step} of {self.total_steps}")
        self._last_checkpoint = time.time()

    def _restore(self) -> None:
        """Continue from the checkpoint: same plan (σ, q, T) or refused; weights, optimizer, EMA, public RNG."""
        from dpcore.training import checkpoint

        cfg = self.config
        ck = checkpoint.load(self.store.run_dir(self.run_id))
        meta = ck.meta
        sigma = self.privacy_plan.noise_multiplier if cfg.private else None
        same = (meta["total_steps"] == self.total_steps and abs(meta["sample_rate"] - self.sample_rate) < 1e-15
                and (sigma is None) == (meta["noise_multiplier"] is None)
                and (sigma is None or abs(meta["noise_multiplier"] - sigma) < 1e-12))
        if not same:
            raise checkpoint.CheckpointError(
                f"run {self.run_id}'s checkpoint was made for (σ={meta['noise_multiplier']}, q={meta['sample_rate']}, "
                f"T={meta['total_steps']}) but the run now plans (σ={sigma}, q={self.sample_rate}, T={self.total_steps}): "
                "its data or configuration changed. Fix: train it again as a new run")
        self._inner_model().load_state_dict({k: v.to(self.device) for k, v in ck.prefixed("model/").items()})
        self._optimizer_core().load_state_dict(checkpoint.optimizer_state(ck.prefixed("optim/"), meta["optimizer"]))
        if self.ema is not None:
            self.ema.shadow = {k: v.to(self.device) for k, v in ck.prefixed("ema/").items()}
            self.ema.updates = int(meta["ema_updates"] or 0)
        torch.set_rng_state(ck.tensors["rng/torch"])
        self.step = self.step_offset = ck.step
        self.eval_history = list(meta.get("eval_history") or [])
        self.last_metrics = meta.get("last_metrics")
        self.lr_schedule.apply(self.step)
        self.resumed = {"from_step": ck.step, "checkpoint_saved_at": meta.get("saved_at"),
                        "earlier_ledger_entries": self._ledger_entries_of_run(),
                        "note": ("ε is that of the T steps that produced this model: steps 1.."
                                 f"{ck.step} before the checkpoint and the rest after resuming. Steps taken after the "
                                 "checkpoint but before the run stopped were discarded and redone: the privacy ledger "
                                 "counts them twice (every noisy step ever taken, under each entry), since their "
                                 "evaluations were released")}
        self.log(f"resuming from the checkpoint at step {ck.step} of {self.total_steps} (fresh secret noise and "
                 "sampling; the ledger records the remaining steps as a new entry)")

    def _ledger_entries_of_run(self) -> list[str]:
        from dpcore.privacy.ledger import Ledger

        try:
            ids = [e.run_id for e in Ledger().entries()]
        except Exception:  # noqa: BLE001 - _open_ledger reports ledger problems properly
            return []
        return [i for i in ids if i == self.run_id or i.startswith(self.run_id + "+resume")]

    @property
    def ledger_run_id(self) -> str:
        """This process's ledger entry: the run id, or run id + resumeN for a resumed run."""
        if not self.resumed:
            return self.run_id
        return f"{self.run_id}+resume{len(self.resumed['earlier_ledger_entries'])}"

    def features_info(self) -> dict[str, Any]:
        """What the card says about the cached-features path: that it was used, and where the cache is."""
        f = self.features
        if self.feature_stage and self.feature_stage.startswith("prefix:"):
            start = int(self.feature_stage.split(":", 1)[1])
            extractor = (f"conv_stem → bn1 → blocks[0..{start - 1}] (frozen), eval mode, no grad; the last "
                         f"{self.config.trainable_blocks} blocks and the head train on these activations")
        else:
            extractor = "forward_head(forward_features(x), pre_logits=True), eval mode, no grad"
        return {"used": True, "stage": self.feature_stage, "cache_file": str(f.path), "cache_hit": f.hit,
                "dim": f.dim, "shape": list(f.train_x.shape[1:]), "extractor": extractor,
                "physical_batch_size": self.physical_batch}

    def log(self, message: str) -> None:
        self.emit(Event("log", self.run_id, step=self.step, elapsed=self.elapsed(), message=message))

    def elapsed(self) -> float:
        return time.time() - self.t0


def average_views(model: torch.nn.Module, n: int, k: int) -> None:
    """Opacus' per-row gradients (n·K rows, example-major) → per-example gradients (n), before clipping.

    With loss_reduction "mean" Opacus scales the output gradients by the rows of the physical batch
    (n·K), so ``grad_sample[r]`` is the gradient of row r's own loss; the mean over an example's K rows
    is the gradient of the example's mean view loss. Each example then has one gradient, clipped to C
    by the optimizer, so the guarantee stays per example (De et al. 2022).
    """
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if not p.requires_grad or gs is None:
            continue
        if isinstance(gs, list) or gs.shape[0] != n * k:
            raise RuntimeError(f"per-example gradient of shape {getattr(gs, 'shape', None)} where "
                               f"{n} examples × {k} views were expected")
        p.grad_sample = gs.view(n, k, *gs.shape[1:]).mean(1)


def _make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _eval_schedule(spe: int, epochs: int, per_epoch: int) -> set[int]:
    """Steps after which the test split is evaluated: `per_epoch` evenly spaced per epoch, and the last."""
    marks = {min(spe, max(1, round(spe * (k + 1) / per_epoch))) for k in range(per_epoch)}
    return {e * spe + m for e in range(epochs) for m in marks}


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "roc_auc", "loss")}
