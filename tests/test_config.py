"""Every invalid config value gives one clear error naming the field and the fix."""
import dataclasses
import json
import warnings

import pytest

from dpcore.config import PrivacyWarning, RunConfig
from dpcore.errors import ConfigError


@pytest.mark.parametrize("changes,field", [
    (dict(epsilon=0), "epsilon"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(epsilon=float("inf")), "epsilon"),
    (dict(delta=1.0), "delta"),
    (dict(delta=0.0), "delta"),
    (dict(accountant="gdp"), "accountant"),
    (dict(backbone="resnet999"), "backbone"),
    (dict(dataset="mnist-fashion"), "dataset"),
    (dict(scope="everything"), "scope"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_physical_batch_size=-3), "max_physical_batch_size"),
    (dict(lr=0.0), "lr"),
    (dict(clip_norm=-1.0), "clip_norm"),
    (dict(optimizer="lbfgs"), "optimizer"),
    (dict(device="tpu"), "device"),
    (dict(image_size=3), "image_size"),
    (dict(test_fraction=1.0), "test_fraction"),
    (dict(medmnist_size=32), "medmnist_size"),
    (dict(pretrained="weights.pt"), "pretrained"),
])
def test_invalid_values_raise_one_clear_error(changes, field):
    with pytest.raises(ConfigError) as err:
        RunConfig(**changes)
    assert err.value.field == field
    assert "Fix:" in str(err.value) and field in str(err.value)


def test_missing_data_dir_and_weights_are_reported(tmp_path):
    with pytest.raises(ConfigError) as err:
        RunConfig(dataset="folder").check_paths()
    assert err.value.field == "data_dir"
    with pytest.raises(ConfigError) as err:
        RunConfig(dataset="folder", data_dir=str(tmp_path / "nope")).check_paths()
    assert err.value.field == "data_dir" and "does not exist" in str(err.value)
    with pytest.raises(ConfigError) as err:
        RunConfig(pretrained=str(tmp_path / "w.safetensors")).check_paths()
    assert err.value.field == "pretrained"


def test_batch_larger_than_data_and_delta_above_one_over_n():
    cfg = RunConfig(batch_size=512, delta=1e-2)
    with pytest.raises(ConfigError) as err:
        cfg.check_against_data(400)
    assert err.value.field == "batch_size"
    with pytest.warns(PrivacyWarning, match="1/n"):
        cfg.check_against_data(1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunConfig(delta=1e-5).check_against_data(1000)  # δ < 1/n: no warning
        RunConfig(epsilon=None, delta=1e-2).check_against_data(1000)  # non-private: δ is moot


def test_config_is_frozen_and_round_trips_json():
    cfg = RunConfig(epsilon=0.5, accountant="pld", epochs=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epsilon = 3  # type: ignore[misc]
    again = RunConfig.from_json(cfg.to_json())
    assert again == cfg
    assert RunConfig(epsilon=None).private is False


def test_unknown_json_field_is_rejected():
    data = json.loads(RunConfig().to_json())
    data["learning_rate"] = 0.1
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data)
    assert err.value.field == "learning_rate"
