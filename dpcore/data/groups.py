"""Who owns each image: the patient or lesion behind it, where the data say so.

Image-level DP protects one image; a patient with k images gets only group privacy (see
dpcore/privacy/group_privacy.py). To say how much weaker that is, and later to train with
patient-level DP, we need each image's owner. Three sources are known, tried in this order:

1. a ``patient_id`` field in the per-example metadata (a folder data set's optional metadata.csv,
   see dpcore/data/folder.py; the column name is matched ignoring case and ``_``: PatientID works);
2. a ``lesion_id`` field (HAM10000_metadata.csv; HAM10000 records no patient, and one patient may
   have several lesions, so the lesion is the largest unit these data can name);
3. Kermany et al.'s chest X-ray file names, when at least ``KERMANY_MIN_MATCH`` (90 %) of a split's
   file names follow the rule below. A lower bar would let a few look-alike names in an unrelated
   folder pass as a grouping; the real data match 100 %, so 90 % leaves room for a few renamed
   files, which then have no known id (None).

Kermany file-name rule (``kermany_patient_id``; the stem is matched case-insensitively, any extension):

- ``personN_bacteria_M`` / ``personN_virus_M`` (and the one ``person447_virus_921_1``) → ``personN``.
  Bacteria and virus images with the same N are merged into one patient, as the data set's users
  commonly read it. The data do not prove it: 808 of the 1635 person numbers of train have both
  subtypes, but a 32×32 pixel correlation finds same-number bacteria/virus pairs no more alike than
  random pairs (mean r 0.703 vs 0.702; same-number same-subtype pairs 0.741), so N may be numbered
  per subtype. Merging is the safe direction: a group that is too large only understates the
  privacy, and patient-level DP over merged groups still protects each real patient.
- ``IM-NNNN-MMMM`` and ``IM-NNNN-MMMM-KKKK`` → ``IM-NNNN`` (MMMM is 0001 in every real name; KKKK
  numbers the images of one visit: 0001-0003).
- ``NORMAL2-IM-NNNN-MMMM[-KKKK]`` → ``NORMAL2-IM-NNNN``, kept apart from ``IM-NNNN``: NORMAL2 is a
  second batch numbered on its own (its numbers overlap IM's in 328 cases, whose pairs are no more
  alike than random ones: r 0.734 vs 0.729, same-number within a batch 0.765).
- The class folder is not part of the id: were ``IM-0001`` under NORMAL and PNEUMONIA, it would be
  one patient (over-merging, the safe direction). In the real data IM names occur only in NORMAL
  and person names only in PNEUMONIA, so no such collision exists.

Measured on shared/data/chest_xray as the trainer loads it, ``load_dataset("folder", ...)``
(``tests/test_groups.py`` recomputes and checks each figure below):

- all 5216 train and 624 test file names match (coverage 1.0).
- train: 2846 patients (1635 person, 518 IM, 693 NORMAL2), 1-30 images each (1771 have one image,
  1075 have 2 or more, 21 have 10 or more); the largest, ``person23``, has 30 images (all bacteria).
- test: 427 patients (202 person, 65 IM, 160 NORMAL2), the largest two have 9 images.
- in both folders: 170 ids, all pneumonia ``personN``: 170 of the 202 person ids of test are also
  in train. But every one of the 170 is bacteria on one side and virus on the other; no
  (person, subtype) and no IM/NORMAL2 number is in both. NORMAL numbers are even split by range
  (test IM 1-111 vs train 115-766; NORMAL2 7-381 vs 383-1423). So the official split is most
  likely patient-disjoint, and the 170 are an artefact of merging subtypes (see above).
- of the 30 sets of byte-identical files (SHA256SUMS), 29 lie within one id; one spans two ids,
  test NORMAL2-IM-0095-0001 = NORMAL2-IM-0096-0001 (a test-only duplicate; the train grouping is unaffected).

HAM10000 (all 10015 images, 7470 lesions, 1-6 images per lesion); its lesion-grouped split at
seed 0, test_fraction 0.2 keeps 8011 images of 5975 lesions in train (largest 6 images) and 2004
images of 1495 lesions in test, none shared.

Limitation: DICOM exports also name files ``IM-NNNN-MMMM``, where NNNN is a series, not a patient;
such a folder would pass the 90 % test and be grouped by series. Give a metadata.csv with a
``patient_id`` column to override the file names.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from dpcore.data.base import DataSplits, ImageList

UNITS = ("patient", "lesion")
KERMANY_MIN_MATCH = 0.9  # fraction of a split's file names that must follow the Kermany rule
KERMANY_SOURCE = "patient id from Kermany file names (personN_…, IM-NNNN-…, NORMAL2-IM-NNNN-…)"

_PERSON = re.compile(r"person(\d+)_(?:bacteria|virus)_\d+(?:_\d+)?", re.IGNORECASE)
_IM = re.compile(r"(normal2-)?im-(\d+)-\d+(?:-\d+)?", re.IGNORECASE)


def _stem(filename: str) -> str:
    base = re.split(r"[/\\]", str(filename))[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def kermany_patient_id(filename: str) -> str | None:
    """The patient id in a Kermany chest X-ray file name (a bare name or a path), or None if it has none."""
    stem = _stem(filename)
    m = _PERSON.fullmatch(stem)
    if m:
        return f"person{int(m[1])}"
    m = _IM.fullmatch(stem)
    if m:
        return ("NORMAL2-" if m[1] else "") + f"IM-{m[2]}"
    return None


@dataclass(frozen=True)
class GroupInfo:
    """One owner id per image of a split (None = unknown) and where the ids come from.

    An image with an unknown id is counted as a group of its own: the best one can do, but it may
    hide a larger group, which is why `coverage` goes on every sentence that uses `largest`.
    """

    unit: str  # "patient" or "lesion"
    source: str  # one line: where the ids come from
    ids: list[str | None]
    coverage: float = field(init=False)  # fraction of images with a known id

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"GroupInfo.unit must be one of {UNITS}, got {self.unit!r}")
        if not self.source:
            raise ValueError("GroupInfo.source must say where the ids come from")
        bad = [x for x in self.ids if x is not None and (not isinstance(x, str) or not x)]
        if bad:
            raise ValueError(f"GroupInfo.ids must be non-empty strings or None; got e.g. {bad[0]!r}")
        object.__setattr__(self, "ids", list(self.ids))
        n = len(self.ids)
        object.__setattr__(self, "coverage", (n - self.n_unknown) / n if n else 0.0)

    @property
    def n_images(self) -> int:
        return len(self.ids)

    @property
    def n_unknown(self) -> int:
        return sum(x is None for x in self.ids)

    def sizes(self) -> dict[str, int]:
        """Images per known group id, largest first (unknown images are not in it: see `largest`)."""
        return dict(Counter(x for x in self.ids if x is not None).most_common())

    def size_histogram(self) -> dict[int, int]:
        """{k: number of groups with k images}, unknown images counted as groups of 1."""
        h = Counter(self.sizes().values())
        if self.n_unknown:
            h[1] += self.n_unknown
        return dict(sorted(h.items()))

    @property
    def n_groups(self) -> int:
        """Known groups plus one per image with an unknown id."""
        return len(self.sizes()) + self.n_unknown

    @property
    def largest(self) -> int:
        """k of the largest group; 1 if only unknown images (each its own group), 0 for no images."""
        known = max(self.sizes().values(), default=0)
        return max(known, 1 if self.n_unknown else 0)

    @property
    def largest_id(self) -> str | None:
        s = self.sizes()
        return next(iter(s)) if s else None

    def group_index(self) -> list[int]:
        """A dense group number per image (0, 1, ...), each unknown image its own: for grouped sampling."""
        seen: dict[object, int] = {}
        out = []
        for x in self.ids:
            key = x if x is not None else object()  # a fresh key: its own group
            out.append(seen.setdefault(key, len(seen)))
        return out

    def shared_with(self, other: "GroupInfo") -> set[str]:
        """Known ids in both groupings, e.g. patients with images in train and in test."""
        return {x for x in self.ids if x is not None} & {x for x in other.ids if x is not None}


def _norm_key(k: str) -> str:
    return re.sub(r"[^a-z0-9]", "", k.lower())


def _id_value(v: Any) -> str | None:
    """A metadata cell as an id string; folder.py reads all-number columns as floats, so 17.0 -> '17'."""
    if v is None:
        return None
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if v.is_integer():
            return str(int(v))
    s = str(v).strip()
    return s or None


def _from_metadata(metadata: Sequence[dict], wanted: str) -> tuple[str, list[str | None]] | None:
    """(column name as written, ids) for the first metadata field whose normalised name is `wanted`."""
    for row in metadata:
        col = next((k for k in row if _norm_key(k) == wanted), None)
        if col is not None:
            ids = [_id_value(r.get(col)) for r in metadata]
            return (col, ids) if any(x is not None for x in ids) else None
    return None


def _metadata_file(dataset: str) -> str:
    return {"ham10000": "HAM10000_metadata.csv", "folder": "metadata.csv"}.get(dataset, f"the {dataset} metadata")


def groups_of(images: ImageList, metadata: Sequence[dict] | None, dataset: str) -> GroupInfo | None:
    """The grouping of one split (train, val or test), or None when no owner is known (see module doc)."""
    n = len(images)
    metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
    if len(metadata) != n:
        raise ValueError(f"{dataset}: {n} images but {len(metadata)} metadata rows; they must match one to one")
    for unit in UNITS:
        found = _from_metadata(metadata, unit + "id")
        if found:
            col, ids = found
            return GroupInfo(unit, f"{col} column of {_metadata_file(dataset)}", ids)
    if n == 0:
        return None
    ids = [kermany_patient_id(images.source(i)) for i in range(n)]
    if sum(x is not None for x in ids) / n >= KERMANY_MIN_MATCH:  # 9/10 == 0.9 exactly, no rounding slip
        return GroupInfo("patient", KERMANY_SOURCE, ids)
    return None


def train_groups(splits: DataSplits, dataset: str) -> GroupInfo | None:
    """The grouping of the training split, or None when no owner is known."""
    return groups_of(splits.train, splits.train_metadata, dataset)
