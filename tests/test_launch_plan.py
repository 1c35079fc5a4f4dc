"""The plan shown before launch (dpcore.training.launch_plan): the numbers the trainer will use."""
from __future__ import annotations

import math

import pytest

from dpcore.config import RunConfig
from dpcore.errors import ConfigError
from dpcore.privacy import accounting
from dpcore.training.launch_plan import LaunchPlan, launch_plan, train_size


def test_digits_plan_is_the_accountants_plan_for_the_same_q_and_t():
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", epsilon=2.0, delta=1e-5, epochs=3, batch_size=64)
    p = launch_plan(cfg)
    assert isinstance(p, LaunchPlan) and p.n_train == 1437 and p.owners is None  # sklearn digits, 80 % train
    assert p.unit == "image" and p.private and not p.patient and p.warnings == ()
    assert p.steps_per_epoch == math.ceil(1437 / 64) == 23 and p.steps == 69 and p.sample_rate == 1 / 23
    ref = accounting.plan(2.0, 1e-5, 1 / 23, 69, "rdp")
    assert p.noise_multiplier == ref.noise_multiplier and p.epsilon == ref.epsilon
    assert 1.9 < p.epsilon <= 2.0 and 1.0 < p.noise_multiplier < 1.5
    with pytest.raises(AttributeError):
        p.n_train = 0  # frozen


def test_known_sizes_are_not_read_again_and_warnings_are_kept():
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", epsilon=1.0, delta=1e-2, epochs=2, batch_size=100)
    p = launch_plan(cfg, sizes=(1000, None))  # δ = 0.01 > 1/n
    assert p.n_train == 1000 and p.steps == 20 and p.sample_rate == 0.1
    assert p.epsilon == accounting.plan(1.0, 1e-2, 0.1, 20, "rdp").epsilon
    assert len(p.warnings) == 1 and "larger than 1/n" in p.warnings[0]


def test_non_private_plan_has_no_sigma_and_no_epsilon():
    p = launch_plan(RunConfig(dataset="digits", backbone="tiny_cnn", epsilon=None, epochs=1, batch_size=100))
    assert not p.private and p.noise_multiplier is None and p.epsilon is None and p.steps == 15


def test_a_patient_level_plan_samples_patients_and_names_its_unit(tmp_path):
    from test_patient_dp import _kermany_folder

    root = _kermany_folder(tmp_path / "xr")
    cfg = RunConfig(dataset="folder", data_dir=str(root), backbone="tiny_cnn", epsilon=4.0, delta=1e-3, epochs=2,
                    batch_size=8, max_physical_batch_size=8, privacy_unit="patient", image_size=16)
    sizes = train_size(cfg.dataset, cfg.data_dir, cfg.seed, cfg.test_fraction, cfg.medmnist_size, cfg.split)
    n_images, (unit, n_patients) = sizes
    assert unit == "patient" and n_patients == 40 and n_images > n_patients
    p = launch_plan(cfg)
    assert p.unit == "patient" and p.patient and p.owners == (unit, n_patients) and p.n_train == n_images
    assert p.steps_per_epoch == 5 and p.steps == 10 and p.sample_rate == 0.2  # 40 patients / 8 per step
    ref = accounting.plan(4.0, 1e-3, 0.2, 10, "rdp")
    assert (p.noise_multiplier, p.epsilon) == (ref.noise_multiplier, ref.epsilon)
    image = launch_plan(cfg.replace(privacy_unit="image"))
    assert image.unit == "image" and image.sample_rate == 1 / math.ceil(n_images / 8)


def test_patient_level_dp_on_data_without_patients_is_refused():
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", epsilon=2.0, epochs=1, batch_size=64,
                    privacy_unit="patient")
    with pytest.raises(ConfigError, match="names no patient"):
        launch_plan(cfg)
