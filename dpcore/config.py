"""The one frozen, validated description of a training run; saved as config.json with every run."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dpcore.errors import ConfigError
from dpcore.privacy.accounting import ACCOUNTANTS, MAX_EPSILON, MAX_STEPS, check_steps

# The vocabulary a config may use; the training parts that implement each word import it from here.
AUGMENTS = ("none", "xray", "dermoscopy", "natural", "auto")  # dpcore.training.augment
MAX_AUGMULT = 64
LR_SCHEDULES = ("constant", "cosine")  # dpcore.training.schedule
SCOPES = ("full", "head", "bias", "last-k")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
MEDMNIST_SIZES = (28, 64, 128, 224)
DATASETS_NEEDING_DIR = ("folder", "ham10000")
PRETRAINED_WORDS = ("none", "hub", "bundled", "default")  # besides a PATH.safetensors
# Any data set of 10 batches or more makes this many epochs more than accounting.MAX_STEPS steps; refusing it here
# stops a typo (--epochs 100000000) before any image is read. The exact bound on T is `check_against_data`'s.
MAX_EPOCHS = 100_000


class PrivacyWarning(UserWarning):
    """A setting that is allowed but weakens the guarantee (e.g. δ > 1/n)."""


# Decisions of one launch, not settings of a run: a form filled from an earlier run's config never carries them
# over (a budget override, the device, test-only reproducible noise must each be chosen again).
PER_LAUNCH_FIELDS = frozenset({"allow_over_budget", "device", "insecure_reproducible_noise"})


@dataclass(frozen=True)
class RunConfig:
    """A run: data, backbone, privacy budget and optimisation. Immutable; `replace` makes variants.

    `epsilon=None` means non-private (no clipping, no noise, no ε claimed); use `non_private=True`
    from the CLI. `batch_size` is the logical (expected) batch; `max_physical_batch_size` bounds
    memory, with virtual steps accumulating up to the logical batch.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    backbone: str = "tiny_cnn"
    # "none" | "hub" | "bundled" (weights shipped with the app) | "default" (local hub cache, then bundled, then
    # $DPCORE_WEIGHTS_DIR: see models.weight_sources) | path to a .safetensors file
    pretrained: str = "none"
    scope: str = "full"
    epsilon: float | None = 2.0
    delta: float = 1e-5
    accountant: str = "rdp"
    epochs: int = 15
    batch_size: int = 256
    max_physical_batch_size: int = 128
    lr: float = 0.01  # Adam at 0.01 suits DP training from scratch; use ~1e-3 to fine-tune pretrained weights
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    image_size: int | None = None  # None: the backbone's default input size
    seed: int = 0
    device: str = "auto"
    test_fraction: float = 0.2  # used only where the data set has no official test split
    # "official" (the data set's own split, or a stratified held-out one) | "grouped" (train ∪ test split again so
    # that no patient / lesion is on both sides: dpcore.data.regroup)
    split: str = "official"
    # who the guarantee protects: "image" (add/remove one image) | "patient" (add/remove one patient with all of
    # their images: patients are Poisson-sampled and each one's mean gradient is clipped; dpcore.privacy.units).
    # With "patient", batch_size counts patients (the expected patients per logical batch) and epochs pass over them.
    privacy_unit: str = "image"
    medmnist_size: int = 28
    skip_unreadable: bool = False
    evals_per_epoch: int = 1
    cache_dir: str | None = None
    # the DP fine-tuning recipe of De et al. 2022 / Berrada et al. 2023 (all off by default)
    augmult: int = 1  # K augmented views per example, gradients averaged before clipping
    augment: str = "auto"  # none | xray | dermoscopy | natural | auto (from the data set; none when augmult=1)
    ema_decay: float | None = None  # EMA of the weights (post-processing: no privacy cost)
    weight_standardization: bool = False  # conv weights standardised per output filter (from-scratch nets)
    lr_schedule: str = "constant"  # constant | cosine, over the run's logical steps
    warmup_fraction: float = 0.0  # linear warm-up over this fraction of the steps (0 .. 0.5)
    trainable_blocks: int = 1  # scope "last-k": the head plus the last k blocks of the backbone
    # DEBUG ONLY: noise and sampling derived from `seed` (replayable): such a run carries NO DP guarantee
    insecure_reproducible_noise: bool = False
    # launch even when the ledger says a data set's budget would be exceeded (recorded in the ledger)
    allow_over_budget: bool = False

    def __post_init__(self) -> None:
        self._validate()

    @property
    def private(self) -> bool:
        return self.epsilon is not None

    # -- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        from models import list_models  # local import: models/ imports dpcore.errors only

        from dpcore.data import list_datasets

        def bad(field: str, problem: str, fix: str) -> None:
            raise ConfigError(field, problem, fix)

        if self.dataset not in list_datasets():
            bad("dataset", f"unknown data set {self.dataset!r}", f"use one of {', '.join(list_datasets())}")
        if self.backbone not in list_models():
            bad("backbone", f"unknown backbone {self.backbone!r}", f"use one of {', '.join(list_models())}")
        if self.pretrained not in PRETRAINED_WORDS and not str(self.pretrained).endswith(".safetensors"):
            bad("pretrained", f"{self.pretrained!r} is neither one of {', '.join(PRETRAINED_WORDS)} nor a "
                ".safetensors file", "pass none, hub, bundled, default, or the path of a .safetensors weights file")
        if self.pretrained in ("hub", "bundled"):
            from models import get_spec, list_models

            spec = get_spec(self.backbone)
            if self.pretrained == "hub" and spec.timm_name is not None and not spec.hub_weights:
                bad("pretrained", f"timm's hub weights do not fit {self.backbone} (built with TF padding for "
                    "TFLite weights)", "use pretrained default with DPCORE_WEIGHTS_DIR, or a .safetensors file")
            if self.pretrained == "bundled" and not spec.bundled:
                have = ", ".join(n for n in list_models() if get_spec(n).bundled)
                bad("pretrained", f"no weights are bundled for {self.backbone} (bundled: {have})",
                    "use pretrained default, hub or a .safetensors file, or a backbone with bundled weights")
        if self.scope not in SCOPES:
            bad("scope", f"unknown fine-tuning scope {self.scope!r}", f"use one of {SCOPES}")
        for name in ("delta", "momentum", "weight_decay", "test_fraction"):  # compared below (a string would raise)
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad(name, f"must be a number, got {v!r}",
                    f"pass e.g. --{name.replace('_', '-')} {getattr(RunConfig, name):g}")
        if self.epsilon is not None:
            if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)):
                bad("epsilon", f"must be a number, got {self.epsilon!r}", "pass e.g. --epsilon 2")
            if not self.epsilon > 0 or not math.isfinite(self.epsilon):
                bad("epsilon", f"must be a finite number > 0, got {self.epsilon}",
                    "pass a positive ε such as 0.5, 2 or 8 (or --non-private for a baseline without DP)")
            if self.epsilon > MAX_EPSILON:
                bad("epsilon", f"must be at most {MAX_EPSILON:g}, got {self.epsilon:g}: an ε this large promises "
                    f"nothing (one image may change the odds of any outcome by e^{self.epsilon:g})",
                    "pass a target ε of at most 10 for a meaningful guarantee, or --non-private for a baseline")
        if not 0 < self.delta < 1:
            bad("delta", f"must be in (0, 1), got {self.delta}", "use δ well below 1/n, e.g. 1e-5")
        if self.accountant not in ACCOUNTANTS:
            bad("accountant", f"unknown accountant {self.accountant!r}", f"use one of {ACCOUNTANTS}")
        for name in ("epochs", "batch_size", "max_physical_batch_size", "evals_per_epoch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, f"must be a whole number ≥ 1, got {v!r}", f"pass --{name.replace('_', '-')} 1 or more")
        if self.epochs > MAX_EPOCHS:
            bad("epochs", f"must be at most {MAX_EPOCHS:,}, got {self.epochs:,}",
                f"pass fewer --epochs (a run takes at most {MAX_STEPS:,} steps in all)")
        for name in ("lr", "clip_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                bad(name, f"must be a finite number > 0, got {v!r}", f"pass a positive --{name.replace('_', '-')}")
        if not 0 <= self.momentum < 1:
            bad("momentum", f"must be in [0, 1), got {self.momentum}", "pass e.g. 0.9, or 0 for plain SGD")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be ≥ 0, got {self.weight_decay}", "pass 0 or a small positive value")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"unknown optimizer {self.optimizer!r}", f"use one of {OPTIMIZERS}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or not 8 <= self.image_size <= 1024):
            bad("image_size", f"must be a whole number of pixels in [8, 1024], got {self.image_size!r}",
                "pass e.g. --image-size 64, or leave it out for the backbone's default")
        if not isinstance(self.seed, int):
            bad("seed", f"must be a whole number, got {self.seed!r}", "pass e.g. --seed 0")
        if self.device not in DEVICES:
            bad("device", f"unknown device {self.device!r}", f"use one of {DEVICES}")
        if self.split not in ("official", "grouped"):
            bad("split", f"unknown split {self.split!r}", "use official or grouped")
        if self.privacy_unit not in ("image", "patient"):
            bad("privacy_unit", f"unknown privacy unit {self.privacy_unit!r}", "use image or patient")
        if self.privacy_unit == "patient" and not self.private:
            bad("privacy_unit", "a non-private run protects no one, so it has no privacy unit",
                "use --privacy-unit image (the default) with --non-private, or give an --epsilon")
        if not 0 < self.test_fraction < 1:
            bad("test_fraction", f"must be in (0, 1), got {self.test_fraction}", "pass e.g. 0.2")
        if self.medmnist_size not in MEDMNIST_SIZES:
            bad("medmnist_size", f"MedMNIST comes in sizes {MEDMNIST_SIZES}, got {self.medmnist_size}",
                "pick one of those sizes")
        for name in ("insecure_reproducible_noise", "allow_over_budget"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be true or false, got {getattr(self, name)!r}", f"pass --{name.replace('_', '-')} "
                    "to switch it on")
        self._validate_recipe(bad)

    def _validate_recipe(self, bad) -> None:
        """augmult, augment, ema_decay, weight_standardization, lr_schedule, warmup_fraction, trainable_blocks."""
        k = self.augmult
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_AUGMULT:
            bad("augmult", f"must be a whole number of views per example in [1, {MAX_AUGMULT}], got {k!r}",
                "pass e.g. --augmult 4 (1 = no augmentation multiplicity); each step costs about K times more")
        if self.augment not in AUGMENTS:
            bad("augment", f"unknown augmentation {self.augment!r}", f"use one of {AUGMENTS}")
        if self.scope == "head" and (k > 1 or self.augment not in ("none", "auto")):
            bad("augmult" if k > 1 else "augment", "scope 'head' trains on cached features of the un-augmented "
                "images, so it cannot augment", "use scope full, bias or last-k, or augmult 1 and augment none")
        if self.ema_decay is not None:
            d = self.ema_decay
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 1:
                bad("ema_decay", f"must be a number in (0, 1), got {d!r}",
                    "pass e.g. --ema-decay 0.999 (or leave it out for no EMA)")
        if not isinstance(self.weight_standardization, bool):
            bad("weight_standardization", f"must be true or false, got {self.weight_standardization!r}",
                "pass --weight-standardization to switch it on")
        if self.weight_standardization and self.scope == "head":
            bad("weight_standardization", "a frozen backbone's cached features are keyed on its weights, not on "
                "standardisation, and standardising changes a pretrained backbone's function",
                "use weight standardisation with scope full (networks trained from scratch)")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("lr_schedule", f"unknown lr schedule {self.lr_schedule!r}", f"use one of {LR_SCHEDULES}")
        w = self.warmup_fraction
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 0.5:
            bad("warmup_fraction", f"must be a fraction of the steps in [0, 0.5], got {w!r}",
                "pass e.g. --warmup-fraction 0.05 (0 = no warm-up)")
        t = self.trainable_blocks
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            bad("trainable_blocks", f"must be a whole number ≥ 1, got {t!r}",
                "pass e.g. --trainable-blocks 2 with --scope last-k")

    def check_paths(self) -> None:
        """Checks of files this machine must have to train (not needed to reload a finished run)."""
        if self.dataset in DATASETS_NEEDING_DIR and not self.data_dir:
            raise ConfigError("data_dir", f"data set {self.dataset!r} needs a data folder", "pass --data-dir PATH")
        if self.data_dir and not Path(self.data_dir).exists():
            raise ConfigError("data_dir", f"{self.data_dir} does not exist",
                              "check the path (the data are read in place, never copied)")
        if self.pretrained not in PRETRAINED_WORDS and not Path(self.pretrained).is_file():
            raise ConfigError("pretrained", f"weights file {self.pretrained} does not exist",
                              "check the path, or use --pretrained none (random init), hub, bundled or default")

    def check_against_data(self, n_train: int) -> None:
        """Checks that need the training-set size n: batch ≤ n, T ≤ MAX_STEPS, and a warning when δ > 1/n."""
        if self.batch_size > n_train:
            raise ConfigError("batch_size", f"logical batch {self.batch_size} is larger than the {n_train} "
                              "training examples", f"use --batch-size {max(1, n_train // 4)} or smaller")
        if self.privacy_unit == "image":  # patient-level runs step over patients: sampling_plan checks those
            spe = math.ceil(n_train / self.batch_size)
            check_steps(self.epochs * spe, self.epochs, spe)
        if self.private and self.delta > 1.0 / n_train:
            warnings.warn(
                f"delta={self.delta:g} is larger than 1/n = {1.0 / n_train:.3g} for n={n_train} training "
                "examples: a mechanism that publishes one random example whole meets such a δ. "
                f"Use delta ≤ {0.1 / n_train:.1g}.",
                PrivacyWarning,
                stacklevel=2,
            )

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict):
            raise ConfigError("config", f"a run config is a JSON object of fields, got a JSON {_json_kind(data)}",
                              'write it as {"dataset": "digits", "epsilon": 2, ...} (see any run\'s config.json)')
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], "is not a run-config field", f"remove it; valid fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, source: str = "the run config") -> "RunConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("config", f"{source} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                              "fix the file, or write a new one from a run's config.json") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """A config from a JSON file (`train --config`); a missing or unreadable file is a ConfigError."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("config", f"{path} does not exist", "check the path of --config") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("config", f"{path} cannot be read ({type(e).__name__}: {e})",
                              "pass a readable UTF-8 JSON file to --config") from None
        return cls.from_json(text, str(path))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
