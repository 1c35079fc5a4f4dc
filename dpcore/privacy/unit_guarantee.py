"""Before launch: what image-level and patient-level DP would each promise one patient, side by side.

The same data, epochs and expected images per step for both choices (a patient-level batch of
B·P/n patients for an image-level batch of B images), each calibrated to the same target ε:

* image-level: ε per image; the largest patient (k images) gets only group privacy (kε, k·e^{(k−1)ε}·δ);
* patient-level: ε per patient with all of their images (the accountant over patients); one image of a
  patient with other images gets the replace-one ε of the same mechanism (`accounting.epsilon_replace_one`).
"""
from __future__ import annotations

from typing import Any

from dpcore.privacy import accounting
from dpcore.privacy.group_privacy import _fmt, group_guarantee, is_meaningful


def _plan(target: float, delta: float, n: int, batch: int, epochs: int, accountant: str) -> dict[str, Any]:
    sampling = accounting.sampling_plan(n, batch, epochs)
    plan = accounting.plan(target, delta, sampling.sample_rate, sampling.steps, accountant)
    return {"n": n, "batch_size": batch, "sample_rate": sampling.sample_rate, "steps": sampling.steps,
            "noise_multiplier": plan.noise_multiplier, "epsilon": plan.epsilon}


def compare_units(config, group, n_train: int) -> dict[str, Any]:
    """Both choices for `config` (private) on a training split grouped by `group` (a GroupInfo)."""
    unit, k, P = group.unit, max(group.largest, 1), group.n_groups
    eps, delta, acc = float(config.epsilon), float(config.delta), config.accountant
    if config.privacy_unit == "patient":
        batch_units = config.batch_size
        batch_images = max(1, min(n_train, round(config.batch_size * n_train / P)))
    else:
        batch_images = config.batch_size
        batch_units = max(1, min(P, round(config.batch_size * P / n_train)))
    image = _plan(eps, delta, n_train, batch_images, config.epochs, acc)
    ge, gd = group_guarantee(image["epsilon"], delta, k)
    image.update(per_patient_epsilon=ge, per_patient_delta=gd, meaningful=is_meaningful(ge, gd),
                 sentence=(f"ε = {_fmt(image['epsilon'])} per image; the largest {unit} ({k} images) gets only "
                           f"ε = {_fmt(ge)}, δ ≈ {_fmt(gd)}"
                           + (" — no guarantee at all." if not is_meaningful(ge, gd) else ".")))
    patient = _plan(eps, delta, P, batch_units, config.epochs, acc)
    replace = accounting.epsilon_replace_one(patient["noise_multiplier"], patient["sample_rate"], patient["steps"],
                                             delta)
    patient.update(per_patient_epsilon=patient["epsilon"], per_patient_delta=delta, meaningful=True,
                   per_image_epsilon=replace,
                   sentence=(f"ε = {_fmt(patient['epsilon'])}, δ = {_fmt(delta)} per {unit}, with all of their images "
                             f"(one image of a {unit} with several: ε = {_fmt(replace)}, replace-one)."))
    return {"unit": unit, "n_units": P, "largest": k, "n_images": n_train, "source": group.source,
            "coverage": group.coverage, "image": image, "patient": patient, "chosen": config.privacy_unit}
