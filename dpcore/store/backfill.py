"""The ledger from a runs folder: runs stored before the ledger existed (or on another machine's ledger)
recorded afterwards from their cards. It reads the run store, so it sits above the privacy wing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dpcore.data import load_dataset
from dpcore.data.groups import train_groups
from dpcore.privacy.ledger import Ledger
from dpcore.store.runs import RunStore


def backfill(runs_dir: str | Path, ledger: Ledger | None = None, store=None) -> list[str]:
    """Record the stored runs of a runs folder that the ledger does not know (made before it existed, or
    before it was per machine), from their cards and configs; returns the run ids added. Runs without a
    card (queued, or failed before training) are skipped: nothing of theirs can be reconstructed."""
    store = store or RunStore(runs_dir)
    ledger = ledger or Ledger()
    added = []
    loaded: dict[tuple, Any] = {}
    for rec in store.list_runs():
        if ledger.entry(rec.run_id) is not None or not (store.run_dir(rec.run_id) / "card.json").is_file():
            continue
        card = store.card(rec.run_id)
        cfg = rec.config
        split = (cfg.dataset, cfg.data_dir, cfg.seed, cfg.test_fraction, cfg.medmnist_size)
        if split not in loaded:
            loaded[split] = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction,
                                         medmnist_size=cfg.medmnist_size, cache_dir=cfg.cache_dir,
                                         split=cfg.split)
        splits = loaded[split]
        skipped = (card.get("dataset") or {}).get("skipped_unreadable") or {}
        parts, kept = [], {}
        for images, key in ((splits.train, "train"), (splits.test, "test")):
            bad = {s[0] for s in skipped.get(key, [])}
            kept[key] = [i for i in range(len(images)) if images.source(i) not in bad]
            parts.append(images.subset(kept[key]))
        group = train_groups(splits, cfg.dataset)
        owners = [group.ids[i] for i in kept["train"]] if group is not None else None
        privacy = card.get("privacy") or {"private": False, "steps": card.get("steps") or 0}
        private = bool(privacy.get("private"))
        insecure = bool(privacy.get("insecure_reproducible_noise"))
        steps = int(privacy.get("steps") or 0)
        label = f"{cfg.backbone}, " + (f"ε={cfg.epsilon:g}" if cfg.private else "non-private") + " (backfilled)"
        spending = ledger.begin(
            rec.run_id, train=ledger.identify(parts[0]), test=ledger.identify(parts[1]), dataset=cfg.dataset,
            data_dir=cfg.data_dir, kind="backfill", private=private, insecure=insecure,
            noise_multiplier=privacy.get("noise_multiplier"), sample_rate=privacy.get("sample_rate"),
            planned_steps=steps, delta=privacy.get("delta"), accountant=privacy.get("accountant"), label=label,
            runs_dir=str(store.root), note="recorded afterwards from the run's card",
            unit=privacy.get("unit") or "image" if private else "image", owners=owners)
        spending.ensure(steps) if steps else None
        ledger.finish(rec.run_id, card.get("status", rec.status), steps,
                      privacy.get("epsilon") if private and not insecure else None)
        added.append(rec.run_id)
    return added
