"""Named, ready-made run configurations, and plain-language checks of what each still needs here.

A preset's config is always built (RunConfig does not check paths), even when its data are not on
this machine: the app can show it, and `missing_requirements` says what to fetch and where to put it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dpcore.config import DATASETS_NEEDING_DIR, RunConfig
from dpcore.environment import expected_data_root, weights_cached


@dataclass(frozen=True)
class Preset:
    key: str
    title: str
    description: str
    config: RunConfig
    requirements: tuple[str, ...]  # what must be on this machine, in plain words (empty: nothing)
    data_source: str = ""  # where the data come from, for the "put it at …" message
    # an ε sweep: one run of `config` per target ε (plus the non-private baseline when asked), as one job
    sweep_epsilons: tuple[float, ...] = ()
    sweep_non_private: bool = False

    @property
    def is_sweep(self) -> bool:
        return bool(self.sweep_epsilons)


def build_presets(data_root: Path | None = None) -> dict[str, Preset]:
    """The presets, with data folders resolved against `data_root` (default: environment's data root)."""
    root = expected_data_root(data_root)
    chest = root / "chest_xray"
    demo = Preset(
        key="teaching-demo",
        title="Teaching demo: handwritten digits at ε = 2",
        description=("scikit-learn's 8×8 digits with a tiny CNN at 16×16 pixels, (ε=2, δ=1e-5)-DP with the RDP "
                     "accountant, 15 epochs of Adam (lr 0.01, batch 256). Trains in about 15 s on two CPU cores "
                     "and reaches about 0.9 test accuracy. Needs nothing beyond the installed packages."),
        config=RunConfig(dataset="digits", backbone="tiny_cnn", pretrained="none", image_size=16, epsilon=2.0,
                         delta=1e-5, accountant="rdp", epochs=15, batch_size=256, optimizer="adam", lr=0.01),
        requirements=(),
    )
    chest_needs = (f"the Kaggle “Chest X-Ray Images (Pneumonia)” folder chest_xray/ (train/, test/) at {chest}",)
    chest_source = ("the Kaggle “Chest X-Ray Images (Pneumonia)” data set (Kermany et al.), folder chest_xray/ "
                    "with train/ and test/")
    seed = Preset(
        key="seed-pneumonia-beit22k",
        title="Seed study: paediatric pneumonia X-rays, BEiT-B/16 (ImageNet-22k), ε = 0.5",
        description=("The original study's setting: full fine-tuning of BEiT-B/16 pretrained on ImageNet-22k on "
                     "the Kaggle chest X-ray images (5216 training images, official test split) at 224×224, "
                     "(ε=0.5, δ=1e-5)-DP (δ < 1/5216) with RDP, Adam lr 1e-3, clipping 0.5, batch 256 "
                     "(physical 32), 5 epochs. Needs a GPU to finish in reasonable time."),
        config=RunConfig(dataset="folder", data_dir=str(chest), backbone="beit_base_patch16_224.in22k_ft_in22k",
                         pretrained="hub", scope="full", epsilon=0.5, delta=1e-5, accountant="rdp", image_size=224,
                         optimizer="adam", lr=1e-3, clip_norm=0.5, batch_size=256, max_physical_batch_size=32,
                         epochs=5),
        requirements=chest_needs + (("BEiT-B/16 ImageNet-22k weights (timm beit_base_patch16_224.in22k_ft_in22k, ~350 MB) in "
                       "the Hugging Face cache, or internet access to download them once"),),
        data_source=chest_source,
    )
    lite = Preset(
        key="pneumonia-efficientnet-lite0-eps0.5",
        title="Pneumonia X-rays, EfficientNet-Lite0 (ImageNet), ε = 0.5",
        description=(LITE_DESCRIPTION),
        config=RunConfig(dataset="folder", data_dir=str(chest), **LITE_CONFIG),
        requirements=chest_needs,
        data_source=chest_source,
    )
    sweep = Preset(
        key="pneumonia-efficientnet-lite0-head-sweep",
        title="ε sweep: pneumonia X-rays, EfficientNet-Lite0 head only",
        description=(SWEEP_DESCRIPTION),
        config=RunConfig(dataset="folder", data_dir=str(chest), **SWEEP_CONFIG),
        requirements=chest_needs,
        data_source=chest_source,
        sweep_epsilons=SWEEP_EPSILONS,
        sweep_non_private=True,
    )
    return {p.key: p for p in (demo, lite, sweep, seed)}


# The ε = 0.5 preset, chosen from measured runs on a 2-core CPU (experiments/RESULTS.md, "finetune-scopes" and
# "pretrained-vs-random"): at ε = 0.5 on 5,216 images the frozen ImageNet features with a DP-trained head beat
# fine-tuning deeper (more parameters, the same noise per parameter), and at 224 px the whole run, features
# included, takes about 7 minutes here.
LITE_CONFIG = dict(backbone="tf_efficientnet_lite0", pretrained="bundled", scope="head", image_size=224,
                   epsilon=0.5, delta=1e-5, accountant="rdp", epochs=30, batch_size=512, optimizer="adam", lr=0.01,
                   clip_norm=1.0)
LITE_DESCRIPTION = (
    "EfficientNet-Lite0 pretrained on ImageNet-1k (the weights ship with the app) at its native 224×224 px: the "
    "backbone stays frozen, its features of the 5,216 training X-rays are computed once, and a DP classifier head "
    "is trained on them, (ε=0.5, δ=1e-5)-DP per image with RDP (Adam, batch 512, 30 epochs); tested on the "
    "official test split. About 7 minutes on two CPU cores, nearly all of it feature extraction (cached: a second "
    "run takes seconds).")
# the same head recipe at 160 px (features in about 2 minutes); each sweep point sets its own ε
SWEEP_CONFIG = {**{k: v for k, v in LITE_CONFIG.items() if k != "epsilon"}, "image_size": 160}
SWEEP_EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SWEEP_DESCRIPTION = (
    "The privacy–utility frontier in a few minutes: the ImageNet EfficientNet-Lite0 backbone stays frozen, its "
    "features of the chest X-rays are extracted once (about 2 minutes on two CPU cores at 160×160 px) and a DP "
    "classifier head is trained on them at ε = 0.25, 0.5, 1, 2, 4 and 8, plus a non-private baseline (seconds "
    "each). Every point is a stored run; the ledger adds up what all of them spend on the same images.")


PRESETS: dict[str, Preset] = build_presets()

_ONLINE_CACHE: dict[str, tuple[float, bool]] = {}
_ONLINE_TTL_S = 60.0


def _hub_online() -> bool:
    """A quick reachability probe of the Hugging Face Hub, remembered for a minute (the app re-asks often)."""
    hit = _ONLINE_CACHE.get("hub")
    if hit and time.monotonic() - hit[0] < _ONLINE_TTL_S:
        return hit[1]
    from models.factory import _hub_reachable

    ok = _hub_reachable(timeout=2.0)
    _ONLINE_CACHE["hub"] = (time.monotonic(), ok)
    return ok


def missing_requirements(preset: Preset, *, online: bool | None = None) -> list[str]:
    """What this machine lacks to train `preset`, each with how to get it; [] when ready.

    `online`: whether the Hugging Face Hub can be reached; None probes it (≤ 2 s, only when weights
    are not cached).
    """
    cfg = preset.config
    missing: list[str] = []
    if cfg.dataset in DATASETS_NEEDING_DIR or cfg.data_dir:
        where = Path(cfg.data_dir).expanduser() if cfg.data_dir else None
        if where is None:
            missing.append(f"data set {cfg.dataset!r} needs a data folder: set data_dir to it")
        elif not where.exists():
            what = preset.data_source or f"the {cfg.dataset} data"
            missing.append(f"data folder {where} does not exist: put {what} there (or set $DPCORE_DATA_DIR "
                           "to the folder that holds it, or change the run's data_dir)")
    else:
        from dpcore.environment import dataset_availability

        row = next((r for r in dataset_availability() if r["name"] == cfg.dataset), None)
        if row is not None and not row["available"]:
            missing.append(f"data set {cfg.dataset!r}: {row['note']}")
    if cfg.pretrained == "hub" and not weights_cached(cfg.backbone):
        if not (_hub_online() if online is None else online):
            missing.append(f"pretrained weights for {cfg.backbone} are not in the local Hugging Face cache and the "
                           "Hub cannot be reached: run this preset once on a machine with internet (the weights "
                           "are then cached in ~/.cache/huggingface), or pass a local .safetensors file of the "
                           "backbone's weights as pretrained")
    elif cfg.pretrained in ("bundled", "default"):
        from models.weight_sources import WeightsError, get_spec, resolve

        try:
            resolve(get_spec(cfg.backbone), cfg.pretrained)
        except WeightsError as e:
            missing.append(str(e))
    elif cfg.pretrained not in ("none", "hub") and not Path(cfg.pretrained).expanduser().is_file():
        missing.append(f"weights file {cfg.pretrained} does not exist: check the path, or use pretrained 'hub'")
    return missing
