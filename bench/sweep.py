"""Time a 10-point ε sweep of head-only DP runs over 5,000 cached features (goal: ≤ 10 s on 2 CPU cores).

Data: the first 5,000 training images (stratified by the sorted file list) of the real chest X-ray folder
`../shared/data/chest_xray` (Kermany CXR), with `tiny_cnn` random-init features at 32 px; the official test
split is kept. Falls back to sklearn digits repeated ×3 when the folder is absent (says so).
Features are extracted first (timed separately); the sweep then reads them from the cache.

    python -m bench.sweep            # last line: sweep_seconds X.X
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

EPSILONS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8)
N_TRAIN = 5000


def _subset_folder(src: Path, dst: Path, n: int) -> None:
    """Symlink the first n train images (class-proportional, sorted names) and all test images."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    files = {c: sorted((src / "train" / c).iterdir()) for c in classes}
    total = sum(len(v) for v in files.values())
    for c in classes:
        take = round(n * len(files[c]) / total)
        (dst / "train" / c).mkdir(parents=True)
        for f in files[c][:take]:
            os.symlink(f, dst / "train" / c / f.name)
    os.symlink(src / "test", dst / "test")


def main() -> None:
    from dpcore.config import RunConfig
    from dpcore.store.runs import RunStore
    from dpcore.training.sweep import format_header, format_point, run_sweep, sweep_configs
    from dpcore.training.trainer import train

    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    chest = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
    try:
        if (chest / "train").is_dir():
            _subset_folder(chest, work / "data", N_TRAIN)
            base = RunConfig(dataset="folder", data_dir=str(work / "data"), backbone="tiny_cnn", image_size=32,
                             scope="head", epochs=10, batch_size=256, max_physical_batch_size=256, lr=0.01,
                             delta=1e-5, device="cpu", evals_per_epoch=1)
            print(f"data: {chest} (first {N_TRAIN} train images, official test split), tiny_cnn features at 32 px")
        else:
            print("data: ../shared/data/chest_xray is absent; using sklearn digits (1,437 train images)")
            base = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=32, scope="head", epochs=10,
                             batch_size=256, device="cpu")
        store = RunStore(work / "runs")
        t0 = time.time()
        first = train(base.replace(epsilon=None, epochs=1), store)  # extracts and caches the features
        feats = first.card["model"]["features"]
        print(f"extraction (+1 epoch non-private): {time.time() - t0:.1f} s, {first.card['dataset']['n_train']} "
              f"train × {feats['dim']} features → {feats['cache_file']}")
        print(format_header())
        t0 = time.time()
        points = run_sweep(sweep_configs(base, EPSILONS), store, on_point=lambda p: print(format_point(p), flush=True))
        seconds = time.time() - t0
        assert all(p.status == "done" for p in points), points
        print(f"{len(points)} runs × {points and store.card(points[0].run_id)['steps']} steps each")
        print(f"sweep_seconds {seconds:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
