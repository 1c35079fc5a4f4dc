"""What a run would promise, before it is launched: its plan, its guarantee over its weights' lineage, what
image-level DP gives the largest patient or lesion, and what it would do to the privacy budget.

The Train page and the CLI show this before anything trains; the trainer computes the same things again
from what it really loads (and refuses a launch past a budget there, whoever launched it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpcore.privacy import accounting
from dpcore.config import RunConfig


@dataclass(frozen=True)
class Preflight:
    n_train: int
    n_test: int
    steps_per_epoch: int
    total_steps: int
    sample_rate: float
    noise_multiplier: float | None
    planned_epsilon: float | None
    lineage: Any  # dpcore.privacy.lineage.LineageGuarantee
    verdict: Any  # dpcore.privacy.ledger.Verdict
    group: Any  # dpcore.data.groups.GroupInfo | None
    group_summary: dict[str, Any] | None
    unit: str = "image"
    units: dict[str, Any] | None = None  # image- vs patient-level, side by side (dpcore.privacy.unit_guarantee)

    @property
    def guarantee_epsilon(self) -> float | None:
        """ε for the training images over the whole lineage (None: non-private; inf: void)."""
        return self.lineage.epsilon if self.lineage is not None else self.planned_epsilon


def weights_of(pretrained: str, backbone: str) -> dict[str, Any]:
    """The starting weights' description (source, lineage) without building the model. ``bundled`` and
    ``default`` are resolved as ``models.create_model`` resolves them (``models.weight_sources``)."""
    if pretrained in (None, "", "none"):
        return {"source": "none", "name": None}
    if pretrained == "hub":
        import models

        return {"source": "hub", "name": models.get_spec(backbone).timm_name}
    if pretrained in ("bundled", "default"):
        import models

        return models.describe_source(backbone, pretrained)
    from models.factory import _file_metadata, _sha256
    from pathlib import Path

    from dpcore.privacy.lineage import from_metadata

    meta = _file_metadata(pretrained)
    out: dict[str, Any] = {"source": "file", "name": pretrained, "lineage": from_metadata(meta)}
    if Path(pretrained).is_file():
        out["sha256"] = _sha256(Path(pretrained))
    if out["lineage"] is None and meta.get("run_id"):
        out["legacy_run"] = meta["run_id"]
    return out


def preflight(config: RunConfig, ledger=None, splits=None) -> Preflight:
    """Everything the launch screen states about a planned run (reads the data set; identifies its images
    by content, which is cached; writes nothing)."""
    from dpcore.data import load_dataset
    from dpcore.data.groups import train_groups
    from dpcore.privacy.ledger import Ledger
    from dpcore.privacy import lineage as lineage_mod
    from dpcore.privacy.group_privacy import group_summary

    config.check_paths()
    ledger = ledger or Ledger()
    splits = splits or load_dataset(config.dataset, config.data_dir, seed=config.seed,
                                    test_fraction=config.test_fraction, cache_dir=config.cache_dir,
                                    medmnist_size=config.medmnist_size, split=config.split)
    n_train, n_test = len(splits.train), len(splits.test)
    group = train_groups(splits, config.dataset)
    patient = config.privacy_unit == "patient"
    if patient and group is None:
        from dpcore.privacy.units import refuse_without_groups

        raise refuse_without_groups(config.dataset)
    sampling = accounting.sampling_plan(group.n_groups if patient else n_train, config.batch_size, config.epochs)
    sigma = eps = None
    private = config.private and not config.insecure_reproducible_noise
    if config.private:
        plan = accounting.plan(config.epsilon, config.delta, sampling.sample_rate, sampling.steps, config.accountant)
        sigma, eps = plan.noise_multiplier, plan.epsilon
    train_images = splits.train
    if config.skip_unreadable:  # the run will leave these out: so does the preview
        from dpcore.errors import UnreadableImagesError

        try:
            ids = ledger.identify(train_images)
        except UnreadableImagesError as exc:
            bad = {src for src, _ in exc.files}
            train_images = train_images.subset([i for i in range(len(train_images))
                                                if train_images.source(i) not in bad])
            ids = ledger.identify(train_images)
    else:
        ids = ledger.identify(train_images)
    guarantee = lineage_mod.assess(
        weights_of(config.pretrained, config.backbone), ledger=ledger, train_ids=ids,
        mechanism=(sigma, sampling.sample_rate, sampling.steps) if private else None, delta=config.delta,
        accountant=config.accountant)
    verdict = ledger.verdict(ids, dataset=config.dataset, data_dir=config.data_dir,
                             noise_multiplier=sigma if private else None, sample_rate=sampling.sample_rate,
                             steps=sampling.steps, delta=config.delta, per_unit=patient)
    summary = units = None
    if group is not None and private and guarantee.epsilon is not None and not patient:
        summary = group_summary(guarantee.epsilon, config.delta, group)
    if group is not None and private:
        from dpcore.privacy.unit_guarantee import compare_units

        units = compare_units(config, group, n_train)
    return Preflight(n_train=n_train, n_test=n_test, steps_per_epoch=sampling.steps_per_epoch,
                     total_steps=sampling.steps, sample_rate=sampling.sample_rate, noise_multiplier=sigma,
                     planned_epsilon=eps, lineage=guarantee, verdict=verdict, group=group, group_summary=summary,
                     unit=group.unit if patient else "image", units=units)


__all__ = ["Preflight", "preflight", "weights_of"]
