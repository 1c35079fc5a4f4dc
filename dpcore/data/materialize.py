"""Decode and resize every image once into one uint8 tensor.

DP-SGD runs many epochs over small data sets; decoding JPEGs each epoch would dominate CPU time,
and uint8 at the model's input size is 4x smaller than float. Decoding runs in a thread pool because
PIL releases the GIL while decoding and resizing.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from dpcore.errors import DataError, UnreadableImagesError
from dpcore.data.base import ImageList

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class Materialized:
    """Decoded images (N,C,H,W) uint8, labels (N,) int64; `kept[j]` is the ImageList index of row j."""

    images: torch.Tensor
    labels: torch.Tensor
    kept: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of each left-out item


def materialize(images: ImageList, transform: Transform, *, skip_unreadable: bool = False, workers: int = 2,
                progress: Callable[[int, int], None] | None = None) -> Materialized:
    """Decode + transform each image once; unreadable images are all reported, or skipped when asked.

    `transform` maps an RGB PIL image to a uint8 tensor of one fixed shape. Errors raised by the
    transform itself are bugs or config problems, not bad files, so they propagate (naming the item).
    `progress(done, total)` is called from the calling thread now and then.
    """
    n = len(images)
    failed: list[tuple[int, str, str]] = []
    out: torch.Tensor | None = None
    ok = torch.zeros(n, dtype=torch.bool)

    def work(i: int):
        try:
            img = images.image(i)
        except UnreadableImagesError as e:
            return i, None, "; ".join(why for _, why in e.files)
        except Exception as e:  # noqa: BLE001 - any decode failure is reported, never silently dropped
            return i, None, f"{type(e).__name__}: {e}"
        try:
            x = transform(img)
        except Exception as e:
            raise DataError(f"the image transform failed on {images.source(i)}: {type(e).__name__}: {e}") from e
        return i, x, None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            for done, (i, x, why) in enumerate(pool.map(work, range(n)), 1):
                if x is None:
                    failed.append((i, images.source(i), why))
                else:
                    out = _store(out, x, i, n, images)
                    ok[i] = True
                if progress is not None and (done % 256 == 0 or done == n):
                    progress(done, n)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # don't decode the rest of a data set we abandon
            raise

    skipped = [(src, why) for _, src, why in failed]
    if failed and (not skip_unreadable or len(failed) == n):
        raise UnreadableImagesError(skipped)
    if out is None:  # only when n == 0
        raise DataError("there are no images to decode; check the data folder and the split")
    kept = torch.nonzero(ok).flatten()
    if len(kept) < n:
        out = out[kept]
    labels = torch.as_tensor(images.labels, dtype=torch.int64)[kept]
    return Materialized(images=out, labels=labels, kept=kept.tolist(), skipped=skipped)


def _store(out: torch.Tensor | None, x: torch.Tensor, i: int, n: int, images: ImageList) -> torch.Tensor:
    """Write x into row i of one preallocated tensor (no list of N tensors + stack: half the peak memory)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 3:
        raise DataError(f"the image transform must return a uint8 tensor (C,H,W); on {images.source(i)} it "
                        f"returned {getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if out is None:
        out = torch.zeros((n, *x.shape), dtype=torch.uint8)
    elif tuple(x.shape) != tuple(out.shape[1:]):
        raise DataError(f"the image transform must return one fixed shape; got {tuple(x.shape)} for "
                        f"{images.source(i)} but {tuple(out.shape[1:])} before. Fix: resize and crop to a fixed size")
    out[i] = x
    return out
