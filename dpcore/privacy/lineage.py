"""Weights lineage: which uses of which images a weights file descends from, and the guarantee that follows.

A run that starts from weights trained on some of its own private images releases a model that depends
on those images twice: the guarantee for them is the composition of both trainings (void if the earlier
one was not private). So every weights file DP Explorer writes carries its chain — one record per
training, oldest first, in its safetensors metadata — and a new run composes over every ancestor that
shares images with its training split.

The records say how each ancestor trained (σ, q, T, δ, or "not private"), on how many images, and which
ledger knows its images (the ledger's random id and the run id): never a hash of the images themselves,
which would let anyone holding candidate data test membership. Overlap is therefore only known for
ancestors in this machine's ledger; an ancestor from another ledger is assumed to share every image
(over-counting), unless it was a pretraining on data its user declared public. Weights with no chain
(timm's hub, a bundled or local file) are public by the user's declaration, and the card says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from models.lineage_metadata import METADATA_KEY, from_metadata, to_metadata  # noqa: F401 - the file format

LINEAGE_VERSION = 1


def run_record(*, run_id: str, ledger_id: str, kind: str, config, privacy: dict[str, Any], n_train: int,
               dataset_name: str, guarantee: "LineageGuarantee | None") -> dict[str, Any]:
    """This run's own record, appended to its weights' chain."""
    private = bool(privacy.get("private")) and not bool(privacy.get("insecure_reproducible_noise"))
    mech = None
    if private:
        mech = {k: privacy[k] for k in ("noise_multiplier", "sample_rate", "steps", "delta", "accountant")}
    return {
        "lineage_version": LINEAGE_VERSION, "kind": kind, "run_id": run_id, "ledger_id": ledger_id,
        "private": private, "mechanism": mech, "epsilon": privacy.get("epsilon") if private else None,
        "privacy_unit": privacy.get("unit") or "image", "dataset": dataset_name, "n_train": int(n_train),
        "declared_public": kind == "pretrain",
        "insecure_reproducible_noise": bool(privacy.get("insecure_reproducible_noise")),
        "guarantee_epsilon": guarantee.epsilon if guarantee is not None else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class LineageGuarantee:
    """The guarantee of a run for its training images, composed over its ancestors that share them."""

    epsilon: float | None  # None: the run itself is not private (nothing to compose); inf: void
    delta: float | None
    own_epsilon: float | None  # this run's mechanism alone
    void: bool
    origin: str  # where the chain starts, in words
    ancestors: list[dict[str, Any]] = field(default_factory=list)  # each with overlap / assumed / used
    chain: list[dict[str, Any]] = field(default_factory=list)  # the inherited records, oldest first
    sentence: str = ""

    @property
    def composed(self) -> bool:
        return any(a.get("composed") for a in self.ancestors)

    def to_dict(self) -> dict[str, Any]:
        def clean(v):
            return None if isinstance(v, float) and math.isinf(v) else v

        return {"epsilon": clean(self.epsilon), "void": self.void, "delta": self.delta,
                "own_epsilon": self.own_epsilon, "composed_over_ancestors": self.composed, "origin": self.origin,
                "ancestors": self.ancestors, "sentence": self.sentence}


def origin_of(weights: dict[str, Any]) -> str:
    source = (weights or {}).get("source")
    if source in (None, "none"):
        return "random initialisation"
    if source == "hub":
        return f"{weights.get('name')} from the timm hub: public pretraining, as declared by choosing it"
    digest = (weights.get("sha256") or "")[:12]
    if source == "bundled":
        return (f"ImageNet-1k weights shipped with the app ({weights.get('name')}"
                + (f", sha256 {digest}…" if digest else "") + "): public pretraining, as declared by choosing them")
    digest = (weights.get("sha256") or "")[:12]
    return (f"the weights file {weights.get('name')}" + (f" (sha256 {digest}…)" if digest else "")
            + ", declared public by the user (it carries no DP Explorer lineage)")


def assess(weights: dict[str, Any], *, ledger, train_ids, mechanism: tuple[float, float, int] | None,
           delta: float, accountant: str) -> LineageGuarantee:
    """The guarantee for this run's training images over the starting weights' chain.

    ``mechanism``: this run's (σ, q, T), or None when it is not private (then nothing is guaranteed and the
    chain only matters for the record). ``train_ids``: the training images' content identities.
    """
    from dpcore.privacy.accounting import epsilon as run_epsilon

    chain = list((weights or {}).get("lineage") or [])
    origin = origin_of(weights)
    legacy = (weights or {}).get("legacy_run")
    if legacy and not chain:  # a DP Explorer run's weights from before lineage was recorded
        entry = ledger.entry(legacy)
        if entry is not None:
            chain = [{"kind": entry.kind, "run_id": legacy, "ledger_id": ledger.ledger_id,
                      "private": entry.guaranteed, "mechanism": None, "declared_public": entry.kind == "pretrain",
                      "dataset": entry.label, "n_train": entry.n_train, "legacy": True}]
        else:
            chain = [{"kind": "train", "run_id": legacy, "ledger_id": None, "private": False, "mechanism": None,
                      "declared_public": False, "dataset": None, "legacy": True}]
    own = None
    if mechanism is not None:
        own = run_epsilon(mechanism[0], mechanism[1], mechanism[2], delta, accountant)
    if not chain:
        sentence = (f"Starting weights: {origin}; no earlier training on these images, so the guarantee is this "
                    "run's own." if mechanism is not None else f"Starting weights: {origin}.")
        return LineageGuarantee(own, delta if own is not None else None, own, False, origin, [], [], sentence)

    matches, _ = ledger.lookup(train_ids)
    current = sorted({i for m in matches for i in m})
    known_runs, assumed, ancestors = [], [], []
    for rec in chain:
        if rec.get("kind") not in ("train", "pretrain"):
            continue
        info = {k: rec.get(k) for k in ("run_id", "kind", "private", "dataset", "n_train", "epsilon",
                                        "declared_public")}
        in_ledger = rec.get("ledger_id") == ledger.ledger_id and ledger.entry(rec.get("run_id", "")) is not None
        if in_ledger:
            import numpy as np

            overlap = int(np.isin(ledger.run_image_ids(rec["run_id"]), current).sum()) if current else 0
            info.update(checked=True, overlap=overlap, composed=overlap > 0)
            if overlap:
                known_runs.append(rec["run_id"])
        elif rec.get("declared_public") and rec.get("kind") == "pretrain":
            info.update(checked=False, overlap=None, composed=False,
                        note="pretraining on data its user declared public, in another ledger: not checked")
        else:
            info.update(checked=False, overlap=None, composed=True,
                        note="not in this machine's ledger: assumed to share every image (over-counting)")
            assumed.append(rec)
        ancestors.append(info)

    void_assumed = any(not r.get("private") or not r.get("mechanism") for r in assumed)
    extra = [] if mechanism is None else [tuple(mechanism)]
    extra += [(r["mechanism"]["noise_multiplier"], r["mechanism"]["sample_rate"], r["mechanism"]["steps"])
              for r in assumed if r.get("mechanism")]
    if mechanism is None:
        eps, void = None, False
    elif void_assumed:
        eps, void = math.inf, True
    elif known_runs or assumed:
        # composed under the run's own accountant, so the card's "(RDP accountant, …)" names what computed it
        exposure = ledger.exposure_of(current, delta, runs=known_runs, extra=extra)
        per_image = exposure.epsilon_rdp if accountant == "rdp" else exposure.epsilon_pld
        eps = float(per_image.max()) if len(per_image) else 0.0
        if assumed and any(not m for m in matches):  # images new to this ledger: this run + assumed ancestors
            from dpcore.privacy.ledger import compose

            eps = max(eps, compose(extra, delta, accountant))
        eps = max(eps, own)
        void = math.isinf(eps)
    else:
        eps, void = own, False
    sentence = _sentence(origin, ancestors, eps, own, void, mechanism is not None)
    return LineageGuarantee(eps, delta if mechanism is not None else None, own, void, origin, ancestors, chain,
                            sentence)


def _sentence(origin: str, ancestors: list[dict], eps, own, void: bool, private: bool) -> str:
    sharing = [a for a in ancestors if a.get("composed")]
    if not sharing:
        names = ", ".join(a["run_id"] for a in ancestors) or "none"
        tail = "so the guarantee is this run's own." if private else ""
        return (f"Starting weights descend from {origin} and run(s) {names}, none of which trained on this run's "
                f"images; {tail}").strip()
    parts = []
    for a in sharing:
        what = ("WITHOUT differential privacy" if not a.get("private") else
                f"with DP (ε = {a['epsilon']:.3g} on its own)" if a.get("epsilon") is not None else "with DP")
        n = f"{a['overlap']:,} of these images" if a.get("overlap") is not None else "possibly all of these images"
        parts.append(f"run {a['run_id']} trained on {n} {what}")
    if not private:
        return "Starting weights: " + "; ".join(parts) + "."
    if void:
        return ("NO DP GUARANTEE for the images that the earlier trainings used: " + "; ".join(parts)
                + ". A model that descends from a non-private training on the same images protects none of them.")
    return ("Starting weights: " + "; ".join(parts) + f". The guarantee for those images composes every training "
            f"that used them: ε = {eps:.3g} (this run alone: {own:.3g}).")


__all__ = ["LineageGuarantee", "METADATA_KEY", "assess", "from_metadata", "origin_of", "run_record", "to_metadata"]
