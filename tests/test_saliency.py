"""Grad-CAM (pytorch_grad_cam) on a trained tiny_cnn run and on random-init ViT / ResNet at 32 px."""
import numpy as np
import pytest
import torch
from PIL import Image

import models
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.predict import LoadedRun, load_run
from dpcore.preprocess import Normalizer, make_to_uint8
from dpcore.saliency import SaliencyError, SaliencyResult, saliency
from dpcore.store import RunStore
from dpcore.trainer import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("runs"))
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, epsilon=None,
                    batch_size=128, max_physical_batch_size=128)
    result = train(cfg, store)
    return load_run(store, result.run_id)


def _random_run(backbone: str, size: int = 32, scope: str = "full") -> LoadedRun:
    torch.manual_seed(0)
    created = models.create_model(backbone, 3, image_size=size)
    models.set_trainable(created.model, scope)
    dc = created.data_config
    return LoadedRun("handmade", RunConfig(backbone=backbone, image_size=size, scope=scope), created.model.eval(),
                     ["a", "b", "c"], dc, make_to_uint8(dc), Normalizer.from_config(dc), torch.device("cpu"))


def _photo(size=48) -> Image.Image:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    a[size // 4: size // 2, size // 4: size // 2] = 255  # some structure
    return Image.fromarray(a)


def _check(res: SaliencyResult, size: int):
    assert isinstance(res, SaliencyResult)
    assert res.heatmap.shape == (size, size)
    assert res.heatmap.min() >= 0 and res.heatmap.max() <= 1
    assert res.heatmap.std() > 0  # not constant
    assert res.overlay.mode == "RGB" and res.overlay.size == (size, size)
    assert res.method.startswith("Grad-CAM")


def test_tiny_cnn_trained_run_predicted_class_and_model_unchanged(tiny_run):
    img = load_dataset("digits").test.image(0)
    before = tiny_run.predict_proba([img])
    flags = [p.requires_grad for p in tiny_run.model.parameters()]
    res = saliency(tiny_run, img)
    _check(res, 16)
    assert res.target_class == int(before.argmax())
    assert res.method == "Grad-CAM on features.1"  # the last conv block
    assert not tiny_run.model.training
    assert [p.requires_grad for p in tiny_run.model.parameters()] == flags
    assert all(p.grad is None for p in tiny_run.model.parameters())
    np.testing.assert_allclose(tiny_run.predict_proba([img]), before, atol=1e-6)
    other = (res.target_class + 1) % len(tiny_run.class_names)
    assert saliency(tiny_run, img, target_class=other).target_class == other


def test_vit_tiny_drops_class_token():
    run = _random_run("vit_tiny_patch16_224")
    res = saliency(run, _photo(), target_class=2)
    _check(res, 32)
    assert res.target_class == 2 and res.method == "Grad-CAM on blocks.11.norm1"


def test_resnet18_head_only_run_restores_flags():
    run = _random_run("resnet18", scope="head")
    flags = [p.requires_grad for p in run.model.parameters()]
    before = run.predict_proba([_photo()])
    res = saliency(run, _photo())
    _check(res, 32)
    # layer4 is 1×1 at 32 px, so the last block with a spatial grid is used
    assert res.method == "Grad-CAM on layer3.1"
    assert [p.requires_grad for p in run.model.parameters()] == flags
    np.testing.assert_allclose(run.predict_proba([_photo()]), before, atol=1e-6)


def test_bad_target_class():
    with pytest.raises(SaliencyError, match="target class 7"):
        saliency(_random_run("resnet18"), _photo(), target_class=7)
