"""Class probabilities from a stored run, with exactly the preprocessing it was trained with."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

import models

from dpcore.training.calibration import temperature_of
from dpcore.config import RunConfig
from dpcore.data import to_rgb
from dpcore.errors import DPCoreError
from dpcore.store.model_io import load_weights, read_metadata
from dpcore.training.preprocess import Normalizer, make_to_uint8
from dpcore.store.runs import RunStore
from dpcore.analysis.uploads import MAX_UPLOAD_BYTES, decode_upload

# A local file may be larger than an upload (a 16-bit X-ray PNG); the pixel limit against bombs is the upload's.
MAX_FILE_BYTES = 10 * MAX_UPLOAD_BYTES


def read_image_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> Image.Image:
    """An image file to predict on, checked like an upload (format, pixel count before decoding: a small PNG
    declaring 20000×20000 pixels is refused, not decoded); every failure is a DPCoreError naming the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:  # not read into memory at all
                raise DPCoreError(f"{path}: the file is {size / 2**20:.1f} MB, more than the {max_bytes / 2**20:.0f} "
                                  "MB allowed. Fix: pass a smaller image (resize it, or re-save it as JPEG)")
            data = f.read()
    except FileNotFoundError:
        raise DPCoreError(f"{path}: no such file. Fix: check the path") from None
    except OSError as e:
        raise DPCoreError(f"{path}: cannot be read ({type(e).__name__}: {e}). Fix: pass a readable PNG or JPEG "
                          "file") from None
    return decode_upload(data, path, max_bytes=max_bytes)


@dataclass
class LoadedRun:
    run_id: str
    config: RunConfig
    model: torch.nn.Module
    class_names: list[str]
    data_config: dict[str, Any]
    to_uint8: Callable[[Image.Image], torch.Tensor]
    normalize: Normalizer
    device: torch.device
    temperature: float = 1.0  # fitted on held-out test images (dpcore.training.calibration); 1.0 when the run has none

    @torch.no_grad()
    def predict_proba(self, images: Sequence[Image.Image], batch_size: int = 64, calibrated: bool = True
                      ) -> np.ndarray:
        """(N, classes) probabilities; images in any PIL mode (converted like the training images). Calibrated:
        softmax(logits / T) with the run's temperature (same predicted class); calibrated=False: the model's own
        softmax, as stored in test_predictions.npz."""
        if not images:
            return np.zeros((0, len(self.class_names)))
        t = self.temperature if calibrated else 1.0
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.stack([self.to_uint8(to_rgb(im)) for im in images[start:start + batch_size]])
            logits = self.model(self.normalize(x.to(self.device)))
            out.append(torch.softmax(logits.float() / t, dim=1).cpu())
        return torch.cat(out).numpy()


def load_run(store: RunStore, run_id: str, device: str = "cpu") -> LoadedRun:
    """Rebuild a run's model from config.json + model.safetensors only (no pickle, no training data, no
    pretrained weights: the saved file holds every parameter, and its keys tell the architecture)."""
    run_dir = store.run_dir(run_id)
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        status = store.get_run(run_id).status
        raise DPCoreError(f"run {run_id} has no saved model (status: {status}); only finished or cancelled "
                          "runs can predict")
    config = RunConfig.from_json((run_dir / "config.json").read_text())
    meta = read_metadata(weights)
    # the architecture only (no pretrained weights needed): BatchNorm folded into the convolutions or turned
    # into GroupNorm, as the saved weights' keys say the run had it
    created = models.create_model(config.backbone, len(meta["class_names"]), pretrained="none",
                                  image_size=config.image_size, norm=models.saved_norm(config.backbone, weights))
    models.set_trainable(created.model, config.scope)
    load_weights(created.model, weights)
    dev = torch.device(device)
    model = created.model.to(dev).eval()
    data_config = meta["data_config"]
    try:
        card = store.card(run_id)
    except (DPCoreError, OSError, ValueError):  # no card (a cancelled run): no calibration
        card = None
    return LoadedRun(run_id, config, model, meta["class_names"], data_config, make_to_uint8(data_config),
                     Normalizer.from_config(data_config).to(dev), dev, temperature_of(card))
