"""Decoding images of any PIL mode to 8-bit RGB, and the two concrete ImageList kinds.

Medical images come as 8-bit grayscale, 16-bit grayscale (X-ray PNG/TIFF), palette GIFs, CMYK JPEGs
and RGBA screenshots; the backbones all take 8-bit RGB, so every image goes through `to_rgb` once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from dpcore.errors import DataError, UnreadableImagesError
from dpcore.data.base import ImageList

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent pixels become black, high bit depths are scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # A palette image with a transparent colour: honour it like RGBA rather than show the hidden colour.
        return _composite_black(img.convert("RGBA")) if "transparency" in img.info else img.convert("RGB")
    if mode in _ALPHA_MODES:
        return _composite_black(img.convert("RGBA") if mode != "RGBA" else img)
    if mode in _16BIT_MODES:
        a = np.asarray(img).astype(np.float64)
        return _gray_to_rgb(a / 257.0)  # 0..65535 -> 0..255 exactly (65535 / 257 = 255)
    if mode == "I":
        a = np.asarray(img).astype(np.float64)
        peak = a.max() if a.size else 0
        return _gray_to_rgb(a * (255.0 / peak) if peak > 255 else a)
    if mode == "F":
        a = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1.0:
            a = a * 255.0  # a [0, 1] float image
        elif hi > 255:
            a = a * (255.0 / hi)
        return _gray_to_rgb(a)
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, HSV, ...


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB")


def _composite_black(rgba: Image.Image) -> Image.Image:
    a = np.asarray(rgba).astype(np.uint16)
    rgb = (a[..., :3] * a[..., 3:4] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def open_image(path: str | Path) -> Image.Image:
    """Fully decode one file to RGB; truncated or corrupt files fail here, naming the file.

    Raises UnreadableImagesError with the single (path, reason) so callers can collect them all.
    """
    try:
        with Image.open(path) as im:
            im.load()  # PIL opens lazily: without this a truncated file would only fail later, in a worker
            if im.getexif().get(0x0112, 1) != 1:  # phone/camera photos (DermNet) store rotation in EXIF
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise UnreadableImagesError([(str(path), f"{type(e).__name__}: {e}")]) from e


def _labels(labels, n: int, what: str) -> np.ndarray:
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(lab) != n:
        raise DataError(f"{what}: {n} images but {len(lab)} labels; they must match one to one")
    return lab


class PathImageList(ImageList):
    """Image files on disk, decoded on demand (the list itself holds only paths)."""

    def __init__(self, paths: Sequence[str | Path], labels):
        self.paths = [str(p) for p in paths]
        self.labels = _labels(labels, len(self.paths), "PathImageList")

    def image(self, i: int) -> Image.Image:
        return open_image(self.paths[i])

    def source(self, i: int) -> str:
        return self.paths[i]

    def subset(self, indices: Sequence[int]) -> "PathImageList":
        idx = np.asarray(indices, dtype=np.int64)
        return PathImageList([self.paths[j] for j in idx], self.labels[idx])


class ArrayImageList(ImageList):
    """Images already in memory as uint8 (N,H,W) or (N,H,W,C), e.g. MedMNIST, digits, CIFAR-10.

    `source(i)` is 'name[k]' with k the index in the original array, also after `subset`, so a
    reported item can be found in the source file.
    """

    def __init__(self, array: np.ndarray, labels, name: str, _index: np.ndarray | None = None):
        array = np.asarray(array)
        if array.dtype != np.uint8:
            raise DataError(f"{name}: images must be uint8, got {array.dtype}; scale them to 0..255 first")
        if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (1, 3, 4)):
            raise DataError(f"{name}: expected image array (N,H,W) or (N,H,W,C) with C in 1/3/4, "
                            f"got shape {array.shape}")
        self.array, self.name = array, name
        self.labels = _labels(labels, len(array), name)
        self.index = np.arange(len(array)) if _index is None else np.asarray(_index, dtype=np.int64)

    def image(self, i: int) -> Image.Image:
        a = self.array[i]
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return to_rgb(Image.fromarray(a))

    def source(self, i: int) -> str:
        return f"{self.name}[{int(self.index[i])}]"

    def subset(self, indices: Sequence[int]) -> "ArrayImageList":
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayImageList(self.array[idx], self.labels[idx], self.name, _index=self.index[idx])
