"""The shape every data set loader returns, so the trainer never cares where images came from."""
from __future__ import annotations

import os
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
