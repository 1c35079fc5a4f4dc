"""Content identity of images (dpcore.privacy.fingerprint): missed copies, false matches, timings.

    PYTHONPATH=. python -m bench.fingerprint                  # everything (~2-4 min on 2 busy cores)
    PYTHONPATH=. python -m bench.fingerprint --quick          # no HAM10000 (10k files), smaller timing sets
    PYTHONPATH=. python -m bench.fingerprint --data /path/to/shared/data --max-distance 24

Needs the real data in shared/data (DPCORE_SHARED_DATA overrides, as in tests/conftest.py).

1. Real copies: the full-resolution chest X-rays / HAM10000 images against their upstream-resized copies
   (same file name); the CXR copies are also stretched (aspect not kept).
2. Synthetic copies of real images: resized, re-encoded, re-moded, 16-bit, EXIF-rotated.
3. False matches: pairs of distinct images (different sha256) within MAX_DISTANCE, per data set; HAM10000's
   photos of one lesion are counted apart (they are genuine near-duplicates).
4. Nearest-neighbour distances of distinct images against the distances of true copies (why MAX_DISTANCE).
5. Timings: identify cold (new cache; the OS page cache may be warm) and cached, near_matches 10k x 100k.

The last line is the headline.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dpcore.data.images import ArrayImageList, PathImageList, open_image
from dpcore.privacy import fingerprint as F

BINS = [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 48, 64, 257]


def default_data() -> Path:
    here = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("DPCORE_SHARED_DATA", here))


def hist(d) -> str:
    c, _ = np.histogram(np.asarray(d), bins=BINS)
    return " ".join(f"{x:>6d}" for x in c)


def hist_header() -> str:
    return " ".join(f"{f'{a}-{b - 1}' if b < 257 else f'{a}+':>6}" for a, b in zip(BINS[:-1], BINS[1:]))


def nn_distinct(fp: np.ndarray, sha: list[str], group: np.ndarray | None = None, rows: int = 128) -> np.ndarray:
    """Brute force: each image's distance to its nearest image with another sha256 (and another group)."""
    w = F._words(fp)
    sha_id = np.unique(np.asarray(sha), return_inverse=True)[1]
    out = np.empty(len(fp), dtype=np.int64)
    for s in range(0, len(fp), rows):
        d = F.hamming(w[s:s + rows, None], w[None])
        d[sha_id[s:s + rows, None] == sha_id[None]] = 9999
        if group is not None:
            d[group[s:s + rows, None] == group[None]] = 9999
        out[s:s + rows] = d.min(axis=1)
    return out


def components(n: int, pairs: np.ndarray) -> list[int]:
    """Sizes (> 1) of the groups that union-find over `pairs` merges, as the ledger does."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = find(int(i)), find(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    sizes: dict[int, int] = {}
    for i in range(n):
        r = find(i)
        sizes[r] = sizes.get(r, 0) + 1
    return sorted((s for s in sizes.values() if s > 1), reverse=True)


# -- 1. real copies ------------------------------------------------------------------------------------

def real_copies(data: Path) -> dict[str, np.ndarray]:
    sets = {
        "CXR full-res -> 224x224 (stretched)": (
            sorted(glob.glob(str(data / "chest_xray_fullres_sample/train/*/*.jpeg"))),
            lambda p: data / "chest_xray/train" / Path(p).parent.name / Path(p).name),
        "HAM10000 600x450 -> 200x150": (
            sorted(glob.glob(str(data / "ham10000_fullres_sample/images/*.jpg"))),
            lambda p: data / "ham10000/images" / Path(p).name),
    }
    out = {}
    for name, (paths, copy_of) in sets.items():
        d = np.array([F.hamming(F.identify_file(p)[1], F.identify_file(copy_of(p))[1]) for p in paths])
        out[name] = d
    return out


# -- 2. synthetic copies -------------------------------------------------------------------------------

def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _short(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    s = side / min(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)


def _exif_rotated(img: Image.Image) -> bytes:
    """Pixels stored rotated, with the EXIF orientation (6 = rotate 90 CW to display) that undoes it."""
    stored = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(stored, "JPEG", quality=95, exif=exif.tobytes())


def _i16(img: Image.Image) -> bytes:
    a = np.asarray(img.convert("L")).astype(np.uint16) * 257
    return _save(Image.fromarray(a), "PNG")  # mode I;16


TRANSFORMS = {
    "PNG (lossless re-encode)": lambda im: _save(im, "PNG"),
    "JPEG q90": lambda im: _save(im, "JPEG", quality=90),
    "JPEG q75": lambda im: _save(im, "JPEG", quality=75),
    "resize 50% bicubic, PNG": lambda im: _save(im.resize((max(1, im.width // 2), max(1, im.height // 2)),
                                                          Image.BICUBIC), "PNG"),
    "resize 50% lanczos, JPEG q90": lambda im: _save(im.resize((max(1, im.width // 2), max(1, im.height // 2)),
                                                               Image.LANCZOS), "JPEG", quality=90),
    "resize 224x224 stretched, JPEG q75": lambda im: _save(im.resize((224, 224)), "JPEG", quality=75),
    "resize short side 224, PNG": lambda im: _save(_short(im, 224), "PNG"),
    "resize 64x64 stretched, PNG": lambda im: _save(im.resize((64, 64), Image.BILINEAR), "PNG"),
    "resize short side 64, JPEG q75": lambda im: _save(_short(im, 64), "JPEG", quality=75),
    "RGB -> L (grayscale PNG)": lambda im: _save(im.convert("L"), "PNG"),
    "L -> RGB (PNG)": lambda im: _save(im.convert("L").convert("RGB"), "PNG"),
    "16-bit grayscale PNG": _i16,
    "rotated pixels + EXIF orientation": _exif_rotated,
}


def synthetic_bases(data: Path, per_set: int) -> list[tuple[str, str, Image.Image, np.ndarray]]:
    """(set, source, decoded RGB image, fingerprint the ledger would store for the original)."""
    rng = np.random.default_rng(0)
    out = []
    file_sets = {
        "CXR 224": sorted(glob.glob(str(data / "chest_xray/train/*/*.jpeg"))),
        "CXR full-res": sorted(glob.glob(str(data / "chest_xray_fullres_sample/train/*/*.jpeg"))),
        "HAM 200x150": sorted(glob.glob(str(data / "ham10000/images/*.jpg"))),
        "HAM 600x450": sorted(glob.glob(str(data / "ham10000_fullres_sample/images/*.jpg"))),
    }
    for name, paths in file_sets.items():
        for j in rng.choice(len(paths), min(per_set, len(paths)), replace=False):
            out.append((name, paths[j], open_image(paths[j]), F.identify_file(paths[j])[1]))
    z = np.load(data / "pneumoniamnist/pneumoniamnist.npz")
    arr = z["test_images"]
    idx = rng.choice(len(arr), per_set, replace=False)
    ids = F.identify(ArrayImageList(arr[idx], np.zeros(len(idx)), "pmnist"))
    for k, j in enumerate(idx):  # the original is the array: its copies are files
        out.append(("PneumoniaMNIST 28x28 (array)", f"test[{j}]", Image.fromarray(arr[j]).convert("RGB"), ids.fp[k]))
    return out


def synthetic(bases) -> dict[tuple[str, str], list]:
    res: dict[tuple[str, str], list] = {}
    for set_name, _, img, fp0 in bases:
        for t, make in TRANSFORMS.items():
            data = make(img)
            copy = Image.open(io.BytesIO(data))
            if copy.width * copy.height < F.EXACT_ONLY_PIXELS:
                res.setdefault((set_name, t), []).append(None)  # made tiny: exact-only by rule
                continue
            res.setdefault((set_name, t), []).append(int(F.hamming(F.identify_bytes(data)[1], fp0)))
    return res


def tiny_copies() -> dict[str, tuple[int, int]]:
    """Digits 8x8 under the exact-only rule: which copies still match (distance 0), out of how many."""
    from sklearn.datasets import load_digits

    imgs = np.rint(load_digits().images[:50] * (255 / 16)).clip(0, 255).astype(np.uint8)
    ids = F.identify(ArrayImageList(imgs, np.zeros(len(imgs)), "digits"))
    out = {}
    for t in ["PNG (lossless re-encode)", "L -> RGB (PNG)", "16-bit grayscale PNG", "JPEG q90",
              "resize 64x64 stretched, PNG"]:
        ok = sum(int(F.hamming(F.identify_bytes(TRANSFORMS[t](Image.fromarray(a)))[1], ids.fp[i])) <= F.MAX_DISTANCE
                 for i, a in enumerate(imgs))
        out[t] = (ok, len(imgs))
    rgb = F.identify(ArrayImageList(np.repeat(imgs[..., None], 3, axis=-1), np.zeros(len(imgs)), "rgb"))
    out["same array as (8,8,3) RGB"] = (int((F.hamming(rgb.fp, ids.fp) == 0).sum()), len(imgs))
    return out


# -- 3./4. false matches and nearest-neighbour distances ----------------------------------------------

def within(name: str, ids: F.Identities, d: int, group=None, group_name="", labels=None) -> dict:
    """Distinct-image pairs within d (near_matches), cross-checked against brute force."""
    t = time.perf_counter()
    pairs = F.near_matches(ids.fp, None, d)
    t_match = time.perf_counter() - t
    sha = np.asarray(ids.sha256)
    exact = pairs[sha[pairs[:, 0]] == sha[pairs[:, 1]]] if len(pairs) else pairs
    distinct = pairs[sha[pairs[:, 0]] != sha[pairs[:, 1]]] if len(pairs) else pairs
    nn = nn_distinct(ids.fp, ids.sha256)
    row = {"name": name, "n": len(sha), "exact_pairs": len(exact), "distinct_pairs": len(distinct),
           "nn": nn, "t_match": t_match, "brute_distinct_within": int((nn <= d).sum())}
    # brute force check: an image has a distinct neighbour within d iff near_matches found a pair with it
    involved = np.unique(distinct.ravel()) if len(distinct) else np.zeros(0, int)
    row["check"] = len(involved) == row["brute_distinct_within"]
    if group is not None and len(distinct):
        same = group[distinct[:, 0]] == group[distinct[:, 1]]
        row["same_group_pairs"], row["other_group_pairs"] = int(same.sum()), int((~same).sum())
        row["other_group_list"] = distinct[~same]
        row["nn_other_group"] = nn_distinct(ids.fp, ids.sha256, group)
    elif group is not None:
        row["same_group_pairs"] = row["other_group_pairs"] = 0
        row["other_group_list"] = distinct
        row["nn_other_group"] = nn_distinct(ids.fp, ids.sha256, group)
    if labels is not None and len(distinct):
        row["label_disagree"] = int((labels[distinct[:, 0]] != labels[distinct[:, 1]]).sum())
    row["group_name"] = group_name
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--max-distance", type=int, default=F.MAX_DISTANCE)
    ap.add_argument("--quick", action="store_true", help="leave out HAM10000 (10k files); smaller samples")
    ap.add_argument("--per-set", type=int, default=None, help="base images per set for synthetic copies")
    args = ap.parse_args(argv)
    data, d = args.data, args.max_distance
    if not (data / "chest_xray").is_dir():
        print(f"no data at {data}. Fix: pass --data pointing to shared/data", file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    print(f"fingerprint {F.FP_VERSION}: {F.NBYTES * 8} bits, MAX_DISTANCE {d}, exact-only below "
          f"{F.EXACT_ONLY_PIXELS} pixels; data {data}\n")

    # 1. real copies
    print("1. Real copies (original vs upstream-resized file of the same name): Hamming distance")
    copy_d = []
    for name, dist in real_copies(data).items():
        copy_d.append(dist)
        print(f"   {name:<38} n={len(dist):>3}  min {dist.min():>2}  median {np.median(dist):>4.1f}  "
              f"max {dist.max():>2}  missed (> {d}) {int((dist > d).sum())}")

    # 2. synthetic copies
    per_set = args.per_set or (6 if args.quick else 12)
    print(f"\n2. Synthetic copies of real images ({per_set} per set): max distance / missed (> {d}); "
          f"'tiny' = the copy is under {F.EXACT_ONLY_PIXELS} px, exact-only by rule")
    res = synthetic(synthetic_bases(data, per_set))
    sets = list(dict.fromkeys(k[0] for k in res))
    short = {"CXR 224": "CXR224", "CXR full-res": "CXRfull", "HAM 200x150": "HAM200", "HAM 600x450": "HAM600",
             "PneumoniaMNIST 28x28 (array)": "PMNIST"}
    print(f"   {'transform':<36}" + "".join(f"{short.get(s, s):>12}" for s in sets))
    synth_all, synth_missed, synth_n = [], 0, 0
    for t in TRANSFORMS:
        cells = []
        for s in sets:
            v = res[(s, t)]
            real = [x for x in v if x is not None]
            synth_all += real
            missed = sum(x > d for x in real)
            synth_missed += missed
            synth_n += len(real)
            cells.append(f"{max(real):>3} / {missed}" if real else "tiny")
        print(f"   {t:<36}" + "".join(f"{c:>12}" for c in cells))
    copy_d.append(np.array(synth_all))
    print("   tiny images (8x8 digits, exact-only rule), copies that still match:")
    for t, (ok, n) in tiny_copies().items():
        print(f"     {t:<36} {ok}/{n}")

    # 3. false matches
    print(f"\n3. False matches: pairs of distinct images (different sha256) within {d} bits")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = F.FingerprintCache(Path(tmp) / "cache.sqlite")
        cxr = sorted(glob.glob(str(data / "chest_xray/*/*/*.jpeg")))
        cxr_list = PathImageList(cxr, np.zeros(len(cxr)))
        t = time.perf_counter()
        ids_cxr = F.identify(cxr_list, cache=cache)
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        ids_again = F.identify(cxr_list, cache=cache)
        t_cached = time.perf_counter() - t
        assert ids_again.sha256 == ids_cxr.sha256 and np.array_equal(ids_again.fp, ids_cxr.fp)
        rows.append(within("chest_xray train+test", ids_cxr, d))
        t_ham = None
        if not args.quick:
            ham_paths = sorted(glob.glob(str(data / "ham10000/images/*.jpg")))
            meta = {r["image_id"]: r for r in csv.DictReader(open(data / "ham10000/HAM10000_metadata.csv"))}
            lesion = np.array([meta[Path(p).stem]["lesion_id"] for p in ham_paths])
            t = time.perf_counter()
            ids_ham = F.identify(PathImageList(ham_paths, np.zeros(len(ham_paths))), cache=cache)
            t_ham = time.perf_counter() - t
            rows.append(within("HAM10000", ids_ham, d, group=lesion, group_name="lesion"))
    from dpcore.data.medmnist import load_medmnist

    pm = load_medmnist("pneumoniamnist", data / "pneumoniamnist")
    pm_ids = [F.identify(x) for x in (pm.train, pm.val, pm.test)]
    split = np.concatenate([np.full(len(x), k) for k, x in enumerate(pm_ids)])
    pm_all = F.Identities(sum((x.sha256 for x in pm_ids), []), np.concatenate([x.fp for x in pm_ids]))
    rows.append(within("PneumoniaMNIST train+val+test", pm_all, d))
    from sklearn.datasets import load_digits

    dg = load_digits()
    dimg = np.rint(dg.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    ids_dg = F.identify(ArrayImageList(dimg, dg.target, "digits"))
    rows.append(within("digits 8x8 (exact-only rule)", ids_dg, d))
    # without the rule: what near-matching would do to 8x8 digits
    nr = F.Identities(ids_dg.sha256, F.hash_canonical(np.stack([F.canonical(Image.fromarray(a)) for a in dimg])))
    rows.append(within("digits 8x8 WITHOUT the rule (pHash)", nr, d, labels=dg.target))

    print(f"   {'set':<38}{'n':>7}{'exact-dup pairs':>17}{'distinct pairs':>16}   notes")
    for r in rows:
        note = ""
        if "same_group_pairs" in r:
            note = (f"same {r['group_name']}: {r['same_group_pairs']}, different {r['group_name']}: "
                    f"{r['other_group_pairs']}")
        if "label_disagree" in r:
            comp = components(r["n"], F.near_matches(nr.fp, None, d))
            note = (f"{r['label_disagree']} pairs of different digits; merged groups: {len(comp)}, "
                    f"{sum(comp)} images, largest {comp[0] if comp else 0}")
        if not r["check"]:
            note += "  BRUTE-FORCE MISMATCH"
        print(f"   {r['name']:<38}{r['n']:>7}{r['exact_pairs']:>17}{r['distinct_pairs']:>16}   {note}")
    for r in rows:
        if r.get("other_group_list") is not None and len(r["other_group_list"]):
            print(f"   {r['name']}: pairs of different {r['group_name']} within {d}:")
            for i, j in r["other_group_list"]:
                print(f"     {Path(ham_paths[i]).stem} ({lesion[i]}) ~ {Path(ham_paths[j]).stem} ({lesion[j]}): "
                      f"{int(F.hamming(ids_ham.fp[i], ids_ham.fp[j]))} bits")
    cross = F.near_matches(pm_all.fp, ids_cxr.fp, d)
    print(f"   PneumoniaMNIST vs chest_xray (its source X-rays, centre-cropped by MedMNIST): {len(cross)} pairs "
          f"within {d} (a crop is not a copy for this fingerprint)")
    split_dups = sum(1 for i, j in F.near_matches(pm_all.fp, None, 0) if split[i] != split[j])
    print(f"   PneumoniaMNIST exact-duplicate pairs across splits: {split_dups}")

    # 4. distributions
    print("\n4. Distances: nearest distinct image of each image vs true copies (counts per bin of bits)")
    print(f"   {'':<38}{hist_header()}")
    allcopies = np.concatenate(copy_d)
    print(f"   {'true copies (1 + 2, all)':<38}{hist(allcopies)}")
    for r in rows:
        if "WITHOUT" in r["name"] or "rule" in r["name"]:
            label = r["name"]
        else:
            label = r["name"] + " NN"
        print(f"   {label[:38]:<38}{hist(r['nn'])}")
        if "nn_other_group" in r:
            print(f"   {(r['name'] + ' NN other ' + r['group_name'])[:38]:<38}{hist(r['nn_other_group'])}")
    print("   quantiles of the NN distance of distinct images:   min   0.1%    1%   median")
    for r in rows:
        nn = r.get("nn_other_group", r["nn"])
        print(f"   {r['name'][:46]:<46}{nn.min():>6}{np.percentile(nn, 0.1):>7.0f}{np.percentile(nn, 1):>6.0f}"
              f"{np.median(nn):>9.0f}")
    print(f"   true copies: max {allcopies.max()}, 99th percentile {np.percentile(allcopies, 99):.0f}, "
          f"median {np.median(allcopies):.0f} (n={len(allcopies)})")

    # 5. timings
    print("\n5. Timings (2 threads)")
    print(f"   identify {len(cxr)} chest X-rays (224x224 JPEG): cold {t_cold:.2f} s "
          f"({len(cxr) / t_cold:.0f} img/s), cached {t_cached:.3f} s")
    if t_ham is not None:
        print(f"   identify {len(ids_ham)} HAM10000 (200x150 JPEG): cold {t_ham:.2f} s")
    full = sorted(glob.glob(str(data / "chest_xray_fullres_sample/train/*/*.jpeg")))
    t = time.perf_counter()
    F.identify(PathImageList(full, np.zeros(len(full))))
    print(f"   identify {len(full)} full-resolution chest X-rays: {time.perf_counter() - t:.2f} s")
    rng = np.random.default_rng(0)
    nq, nk = (2000, 20000) if args.quick else (10000, 100000)
    q = rng.integers(0, 256, (nq, F.NBYTES), dtype=np.uint8)
    k = rng.integers(0, 256, (nk, F.NBYTES), dtype=np.uint8)
    t = time.perf_counter()
    F.near_matches(q, k, d)
    t_nm = time.perf_counter() - t
    print(f"   near_matches {nq} x {nk} random fingerprints: {t_nm:.2f} s")
    for r in rows[:2]:
        print(f"   near_matches within {r['name']} ({r['n']} real fingerprints): {r['t_match']:.2f} s")
    print(f"   bench took {time.perf_counter() - t_all:.0f} s")

    real_missed = int(sum((x > d).sum() for x in copy_d[:2]))
    n_real = int(sum(len(x) for x in copy_d[:2]))
    ham_other = next((r["other_group_pairs"] for r in rows if r["name"] == "HAM10000"), None)
    print(f"\nfingerprint {F.FP_VERSION} MAX_DISTANCE {d}: missed real copies {real_missed}/{n_real} "
          f"(max {max(int(x.max()) for x in copy_d[:2])}), synthetic {synth_missed}/{synth_n} "
          f"(max {max(synth_all)}); false pairs CXR {rows[0]['distinct_pairs']}"
          + (f", HAM other-lesion {ham_other}" if ham_other is not None else "")
          + f", PneumoniaMNIST {next(r['distinct_pairs'] for r in rows if r['name'].startswith('Pneumonia'))}"
          f"; identify CXR cold {t_cold:.1f} s cached {t_cached:.2f} s; near_matches {nq}x{nk} {t_nm:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
