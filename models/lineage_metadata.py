"""How a weights file carries its lineage (the chain of runs that trained it): one JSON metadata entry.

Only the format lives here, so that reading weights (``models.factory``, ``models.weight_sources``) needs
nothing from the privacy wing; what a chain *means* for a guarantee is ``dpcore.privacy.lineage``.
"""
from __future__ import annotations

import json
from typing import Any

METADATA_KEY = "dpcore_lineage"


def to_metadata(chain: list[dict[str, Any]]) -> str:
    return json.dumps(chain, sort_keys=True, default=str, allow_nan=True)


def from_metadata(meta: dict[str, str]) -> list[dict[str, Any]] | None:
    """The chain stored in a weights file's metadata (None: the file has none)."""
    text = meta.get(METADATA_KEY)
    if not text:
        return None
    try:
        chain = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the weights file's lineage metadata is not valid JSON ({exc})") from exc
    if not isinstance(chain, list) or not all(isinstance(r, dict) for r in chain):
        raise ValueError("the weights file's lineage metadata is not a list of records")
    return chain
