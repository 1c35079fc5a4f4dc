"""The shape every data set loader returns, so the trainer never cares where images came from."""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image


class ImageList:
    """A labelled, indexable list of images; `image(i)` decodes one to an RGB PIL image."""

    labels: np.ndarray  # int64, shape (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def source(self, i: int) -> str:
        """Human-readable origin of item i (a file path, or 'name[index]' for arrays)."""
        raise NotImplementedError  # pragma: no cover

    def subset(self, indices: Sequence[int]) -> "ImageList":  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class DataSplits:
    """Train/test splits of one data set, with class names and per-example metadata.

    `train_metadata`/`test_metadata` hold one dict per example (e.g. sex, age, localization for
    HAM10000; empty dicts where a set has none). `split_info` records how the split was made
    (official folders, stratified with seed, grouped by lesion) so the run card can say so.
    """

    name: str
    class_names: list[str]
    train: ImageList
    test: ImageList
    train_metadata: list[dict[str, Any]]
    test_metadata: list[dict[str, Any]]
    split_info: dict[str, Any] = field(default_factory=dict)
    privacy_unit: str = "image"
    val: ImageList | None = None  # an official validation split when the source has one
    val_metadata: list[dict[str, Any]] | None = None


def hash_file_signatures(h, images: "ImageList") -> None:
    """Feed each item's file path, size and mtime to hash ``h``: a cheap identity of files on disk."""
    for i in range(len(images)):
        src = images.source(i)
        try:
            st = os.stat(src)
            h.update(os.fsencode(src) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(os.fsencode(src) + b"\0?\n")  # (fsencode: non-UTF-8 file names hash too)


# sha256 of files by signature (path, size, mtime_ns, inode): a data set is hashed once per process, and an
# edited or replaced file (new mtime or inode) is hashed again. Measured on shared/data/chest_xray (5,840 JPEGs,
# 47 MB): 0.15-0.4 s to hash from the page cache, 0.02 s to stat; so no cache on disk.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_MAX = 2_000_000


def file_digest(path: str) -> str | None:
    """sha256 (hex) of a file's bytes, as the privacy ledger identifies images; None where it cannot be read
    (a broken or looping link, no permission): such a file is reported as unreadable when it is decoded."""
    try:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        with _DIGESTS_LOCK:
            hit = _DIGESTS.get(key)
        if hit is not None:
            return hit
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None
    with _DIGESTS_LOCK:
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


def content_digests(images: ImageList, indices: Sequence[int] | None = None) -> list[str | None]:
    """sha256 of each item's content: a file's bytes (cached by signature), or an array image's pixels with dtype
    and shape (`sha256_array`), or else the decoded RGB pixels. Two items with one digest are
    the same image, whatever their names."""
    idx = range(len(images)) if indices is None else indices
    paths = getattr(images, "paths", None)
    if paths is not None:
        return [file_digest(paths[i]) for i in idx]
    array = getattr(images, "array", None)
    if array is not None:
        return [sha256_array(array[i]) for i in idx]
    return [sha256_array(np.asarray(images.image(i))) for i in idx]


def sha256_array(a: np.ndarray) -> str:
    """sha256 of an image array's pixels, with dtype and shape, so (28,28) and (784,) differ.

    A trailing channel axis of 1 is dropped: (H,W,1) and (H,W) are the same grayscale image.
    """
    a = np.ascontiguousarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    h = hashlib.sha256(f"ndarray {a.dtype.str} {','.join(map(str, a.shape))}\0".encode())
    h.update(a.tobytes())
    return h.hexdigest()
