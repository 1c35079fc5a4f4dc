"""Privacy units: who DP-SGD protects, and how a logical batch of them is cut into physical batches.

Image-level DP-SGD samples images; patient-level DP-SGD (McMahan et al. 2018, user-level DP; the
"unit" here) samples *patients*: each patient enters a logical batch with probability q, with all of
their training images. Each sampled patient contributes ONE gradient, the **mean** over their images
(each image's K augmented views averaged first) — chosen over the sum so that a patient with 30
images weighs in like one with a single image — clipped to C as a whole; the noise is σ·C on the
sum over patients, divided by the expected number of patients q·P. The accountant is then run over
patients: (σ, q, T) with q the patient sampling rate, and the (ε, δ) it gives is per patient under
add/remove-one-patient adjacency.

The physical batch bounds memory in rows (images × views). `UnitPlan.chunks` packs the sampled
patients into physical batches of patients *with the same number of images*, so a chunk is n
patients × k images × K views, unit-major: the existing per-example machinery (Opacus' hooks, the
book-keeping rules, the cached-features head) then treats k·K rows as one "example" and its clipping
is per patient, exact, with no padding. A patient whose k·K rows exceed the budget is an
`Oversized` chunk: its images are split into pieces within the budget and its mean gradient is
accumulated exactly over the pieces (plain autograd), then clipped as one (`dpcore.training.trainer`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpcore.errors import ConfigError

PRIVACY_UNITS = ("image", "patient")


@dataclass(frozen=True)
class Chunk:
    """n patients of k images each, their rows unit-major (patient 0's k images, then patient 1's, …)."""

    rows: np.ndarray  # indices into the training set
    k: int  # images per patient in this chunk
    units: np.ndarray  # the patients (dense unit numbers), in row order

    @property
    def n(self) -> int:
        return len(self.units)


@dataclass(frozen=True)
class Oversized:
    """One patient whose images do not fit one physical batch: `pieces` (each within the budget) together
    hold all of its k images; its gradient is accumulated over them before it is clipped."""

    unit: int
    k: int
    pieces: tuple[np.ndarray, ...]


class UnitPlan:
    """The training set's images grouped by privacy unit (dense numbers 0..P-1, one per row)."""

    def __init__(self, unit_of_row, *, name: str = "patient", source: str = ""):
        index = np.asarray(unit_of_row, dtype=np.int64)
        if index.ndim != 1 or len(index) == 0:
            raise ValueError("a unit plan needs one unit number per training image")
        _, dense = np.unique(index, return_inverse=True)
        self.unit_of_row = dense.astype(np.int64)
        order = np.argsort(self.unit_of_row, kind="stable")
        counts = np.bincount(self.unit_of_row)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        self.members = [order[bounds[u]:bounds[u + 1]] for u in range(len(counts))]  # rows of each unit
        self.sizes = counts
        self.name, self.source = name, source

    @property
    def n_units(self) -> int:
        return len(self.members)

    @property
    def n_rows(self) -> int:
        return len(self.unit_of_row)

    @property
    def largest(self) -> int:
        return int(self.sizes.max())

    def sample(self, sample_rate: float, generator: torch.Generator) -> np.ndarray:
        """Poisson sampling of units: each independently with probability q (the secret generator)."""
        mask = torch.rand(self.n_units, generator=generator) < sample_rate
        return np.flatnonzero(mask.numpy())

    def chunks(self, units: np.ndarray, budget_rows: int, views: int = 1) -> list[Chunk | Oversized]:
        """Physical batches for the sampled `units`: by size k, ⌊budget / (k·views)⌋ patients a chunk; a
        patient with k·views > budget is `Oversized`, cut into pieces of ⌊budget / views⌋ images."""
        if budget_rows < views:
            raise ConfigError("max_physical_batch_size", f"a physical batch of {budget_rows} rows cannot hold the "
                              f"{views} augmented views of one image", f"use --max-physical-batch-size {views} or more")
        per_piece = budget_rows // views  # images a physical batch holds
        by_size: dict[int, list[int]] = {}
        for u in np.asarray(units, dtype=np.int64):
            by_size.setdefault(int(self.sizes[u]), []).append(int(u))
        out: list[Chunk | Oversized] = []
        for k in sorted(by_size):
            group = by_size[k]
            if k > per_piece:
                for u in group:
                    rows = self.members[u]
                    out.append(Oversized(u, k, tuple(rows[i:i + per_piece] for i in range(0, k, per_piece))))
                continue
            per_chunk = per_piece // k
            for i in range(0, len(group), per_chunk):
                us = np.array(group[i:i + per_chunk], dtype=np.int64)
                out.append(Chunk(np.concatenate([self.members[u] for u in us]), k, us))
        return out

    def describe(self) -> dict:
        hist = np.bincount(self.sizes)
        return {"unit": self.name, "source": self.source, "n_units": self.n_units, "n_images": self.n_rows,
                "largest": self.largest, "mean_images": float(self.sizes.mean()),
                "size_histogram": {str(k): int(v) for k, v in enumerate(hist) if v}}


def unit_plan(group, kept: list[int] | None = None) -> UnitPlan:
    """The plan for a `dpcore.data.groups.GroupInfo` of the training split, restricted to the `kept` rows
    (unreadable images skipped); an image with no known owner is a unit of its own."""
    index = np.asarray(group.group_index(), dtype=np.int64)
    if kept is not None:
        index = index[np.asarray(kept, dtype=np.int64)]
    return UnitPlan(index, name=group.unit, source=group.source)


def refuse_without_groups(dataset: str) -> ConfigError:
    return ConfigError(
        "privacy_unit", f"data set {dataset!r} names no patient for its images, so patient-level DP cannot know "
        "which images belong together",
        "use --privacy-unit image, or a folder data set with a metadata.csv that has a patient_id column "
        "(HAM10000 is grouped by lesion_id; Kermany chest X-rays by their file names)")
