"""Grad-CAM (pytorch_grad_cam) on a trained tiny_cnn run and on random-init ViT / ResNet at 32 px."""
import numpy as np
import pytest
import torch
from PIL import Image

import models
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.analysis.predict import LoadedRun, load_run
from dpcore.training.preprocess import Normalizer, make_to_uint8
from dpcore.analysis.saliency import SaliencyError, SaliencyResult, saliency
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train


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


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(float) @ np.array([0.2126, 0.7152, 0.0722])


def test_the_colour_map_runs_dark_to_bright_and_clips():
    from dpcore.analysis.saliency import COLOUR_TABLE, colour_map

    assert COLOUR_TABLE.shape == (256, 3) and COLOUR_TABLE.dtype == np.uint8
    lum = _luminance(COLOUR_TABLE)  # brighter means more, also in grey scale
    assert np.all(np.diff(lum[::8]) > 0) and np.all(np.diff(lum) > -1)  # (tiny dips of under 1/255 in the purples)
    out = colour_map(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]]))
    np.testing.assert_array_equal(out[0], COLOUR_TABLE[[0, 0, 128, 255, 255, 0]])


def test_blend_mixes_the_image_and_the_colour_map_by_opacity():
    from dpcore.analysis.saliency import blend, colour_map

    image = _photo(16)
    heat = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    rgb = np.asarray(image, dtype=float)
    colours = colour_map(heat).astype(float)
    np.testing.assert_array_equal(np.asarray(blend(image, heat, 0.0)), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(blend(image, heat, 1.0)), colour_map(heat))
    for a in (0.25, 0.5, 0.8):
        mixed = np.asarray(blend(image, heat, a), dtype=float)
        np.testing.assert_allclose(mixed, (1 - a) * rgb + a * colours, atol=0.5 + 1e-9)
    half = np.asarray(blend(image, heat, 0.5), dtype=float)
    differ = rgb != colours
    assert np.all(np.minimum(rgb, colours)[differ] - 0.5 <= half[differ])
    assert np.all(half[differ] <= np.maximum(rgb, colours)[differ] + 0.5)
    with pytest.raises(SaliencyError, match="opacity 1.5"):
        blend(image, heat, 1.5)


def test_blend_resizes_a_coarser_map_to_the_image():
    from dpcore.analysis.saliency import blend

    heat = np.zeros((4, 4), dtype=np.float32)
    heat[:2] = 1.0  # the top half is hot
    out = np.asarray(blend(Image.new("RGB", (32, 32), (128, 128, 128)), heat, 1.0))
    assert out.shape == (32, 32, 3)
    assert _luminance(out[0, 0]) > _luminance(out[-1, -1])


def test_the_result_keeps_the_map_apart_so_it_can_be_reblended(tiny_run):
    img = load_dataset("digits").test.image(3)
    res = saliency(tiny_run, img)
    assert res.image.size == (16, 16) and res.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(res.overlay), np.asarray(res.blended(0.4)))
    np.testing.assert_array_equal(np.asarray(res.blended(0.0)), np.asarray(res.image))
    assert not np.array_equal(np.asarray(res.blended(0.9)), np.asarray(res.blended(0.1)))
