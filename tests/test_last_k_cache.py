"""Last-k fine-tuning on cached activations of the frozen blocks (``models.split``, ``dpcore.training.features``):
the split computes the same function as the model, the trainer takes the cached path only when it is
exact (no augmentation, frozen prefix), trains the model's own parameters, and saves a model that
predicts like any other."""
from __future__ import annotations

import json

import pytest
import torch

import models
from dpcore.config import RunConfig
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train
from models.split import last_k_split


def _lite(k: int, size: int = 64):
    created = models.create_model("tf_efficientnet_lite0", 3, pretrained="bundled", image_size=size)
    models.set_trainable(created.model, "last-k", k)
    return created.model.eval()


@pytest.mark.parametrize("k", [1, 2, 7])
def test_suffix_of_prefix_is_the_model(k):
    model = _lite(k)
    prefix, suffix = last_k_split(model, k)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(suffix.eval()(prefix(model, x)), model(x), atol=1e-5)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in suffix.parameters() if p.requires_grad} == trainable  # the same tensors, all of them


def test_no_split_when_a_prefix_parameter_trains_or_the_family_is_unknown():
    model = _lite(2)
    model.conv_stem.weight.requires_grad_(True)
    assert last_k_split(model, 2) is None
    tiny = models.create_model("tiny_cnn", 3, image_size=16).model
    assert last_k_split(tiny, 1) is None


def _run(tmp_path, **kw):
    cfg = RunConfig(dataset="digits", backbone="tf_efficientnet_lite0", pretrained="bundled", scope="last-k",
                    trainable_blocks=1, image_size=32, epochs=1, batch_size=256, max_physical_batch_size=128,
                    epsilon=4.0, lr=1e-3, optimizer="adam", device="cpu", **kw)
    return train(cfg, RunStore(tmp_path))


def test_dp_last_k_on_cached_activations_trains_and_saves_the_whole_model(tmp_path, fresh_ledger):
    from dpcore.analysis.predict import load_run

    before = {k: v.clone() for k, v in _lite(1, 32).state_dict().items()}
    result = _run(tmp_path, augment="none")
    card = RunStore(tmp_path).card(result.run_id)
    feats = card["model"]["features"]
    assert feats["stage"] == "prefix:6" and feats["shape"][0] == 192 and not feats["cache_hit"]
    assert card["privacy"]["grad_sample_mode"] == "bk" and card["privacy"]["epsilon"] <= 4.0
    loaded = load_run(RunStore(tmp_path), result.run_id)
    after = loaded.model.state_dict()
    changed = {k for k in before if k in after and before[k].shape == after[k].shape
               and not torch.equal(before[k], after[k])}
    assert any(k.startswith("blocks.6.") for k in changed)  # the last block trained
    assert not any(k.startswith(("conv_stem.", "blocks.0.", "blocks.5.")) for k in changed)  # the prefix did not
    again = _run(tmp_path, augment="none")  # a second run reads the cached activations
    card2 = RunStore(tmp_path).card(again.run_id)
    assert card2["model"]["features"]["cache_hit"]


def test_augmentation_keeps_last_k_on_images(tmp_path, fresh_ledger):
    result = _run(tmp_path, augment="natural")
    card = RunStore(tmp_path).card(result.run_id)
    assert card["model"].get("features") is None
