"""A run's plan before launch: training-set size, sampling (q, T), σ for the target ε and the planned ε, and
the privacy unit they are stated for.

The Train page draws this above the Launch button and the CLI can print it; the trainer computes the same
numbers again from what it really loads (`dpcore.privacy.accounting.sampling_plan` / `plan`). What the
ledger and the weights' lineage add (the budget verdict, the guarantee) is `dpcore.training.preflight`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from dpcore.config import PrivacyWarning, RunConfig
from dpcore.privacy import accounting


@dataclass(frozen=True)
class LaunchPlan:
    n_train: int  # training images
    owners: tuple[str, int] | None  # (unit, number of patients/lesions) where the data name owners
    unit: str  # the privacy unit ε is stated for: "image", or the owners' unit for a patient-level run
    steps_per_epoch: int
    steps: int  # T
    sample_rate: float  # q: each unit joins each step independently with this probability
    noise_multiplier: float | None  # σ calibrated for the target ε (None: non-private)
    epsilon: float | None  # the ε that σ really gives for (q, T) (None: non-private)
    warnings: tuple[str, ...] = ()  # PrivacyWarning messages about this plan (e.g. δ > 1/n)

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    @property
    def patient(self) -> bool:
        return self.unit != "image"


def train_size(dataset: str, data_dir: str | None, seed: int, test_fraction: float, medmnist_size: int,
               split: str = "official") -> tuple[int, tuple[str, int] | None]:
    """(training images, (unit, number of patients/lesions) or None where the data name no owners): the n
    that q = batch / n is planned over, read from the data set as the trainer reads it."""
    from dpcore.data import load_dataset
    from dpcore.data.groups import train_groups

    splits = load_dataset(dataset, data_dir, seed=seed, test_fraction=test_fraction, medmnist_size=medmnist_size,
                          split=split)
    group = train_groups(splits, dataset)
    return len(splits.train), (None if group is None else (group.unit, group.n_groups))


def launch_plan(config: RunConfig, sizes: tuple[int, tuple[str, int] | None] | None = None) -> LaunchPlan:
    """What a run of `config` would sample and promise, so the user sees σ and ε before anything trains.

    `sizes` is `train_size(...)` for the config's data when already known (the page caches it); otherwise the
    data set is read. Raises ConfigError for a plan the trainer would refuse (batch > n, T too large,
    patient-level DP on data that name no patients)."""
    config.check_paths()
    n_train, owners = sizes if sizes is not None else train_size(
        config.dataset, config.data_dir, config.seed, config.test_fraction, config.medmnist_size, config.split)
    patient = config.privacy_unit == "patient"
    if patient and owners is None:
        from dpcore.privacy.units import refuse_without_groups

        raise refuse_without_groups(config.dataset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrivacyWarning)
        config.check_against_data(n_train)
    sampling = accounting.sampling_plan(owners[1] if patient else n_train, config.batch_size, config.epochs)
    sigma = eps = None
    if config.private:
        plan = accounting.plan(config.epsilon, config.delta, sampling.sample_rate, sampling.steps, config.accountant)
        sigma, eps = plan.noise_multiplier, plan.epsilon
    return LaunchPlan(n_train=n_train, owners=owners, unit=owners[0] if patient else "image",
                      steps_per_epoch=sampling.steps_per_epoch, steps=sampling.steps,
                      sample_rate=sampling.sample_rate, noise_multiplier=sigma, epsilon=eps,
                      warnings=tuple(str(w.message) for w in caught))


__all__ = ["LaunchPlan", "launch_plan", "train_size"]
