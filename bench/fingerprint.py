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
            if min(copy.size) < F.EXACT_ONLY_SIDE:
                res.setdefault((set_name, t), []).append(None)  # made tiny: exact-only by rule
                continue
            res.setdefault((set_name, t), []).append(int(F.hamming(F.identify_bytes(data)[1], fp0)))
    return res


def tiny_copies() -> dict[str, tuple[int, int, int]]:
    """8x8 digits: copies that match under the exact-only rule, and the largest distance without it."""
    from sklearn.datasets import load_digits

    imgs = np.rint(load_digits().images[:50] * (255 / 16)).clip(0, 255).astype(np.uint8)
    ids = F.identify(ArrayImageList(imgs, np.zeros(len(imgs)), "digits"))
    raw0 = F.hash_canonical(np.stack([F.canonical(Image.fromarray(a)) for a in imgs]))
    out = {}
    for t in ["PNG (lossless re-encode)", "L -> RGB (PNG)", "16-bit grayscale PNG", "JPEG q90", "JPEG q75",
              "resize 64x64 stretched, PNG", "resize short side 224, PNG"]:
        ok, worst = 0, 0
        for i, a in enumerate(imgs):
            data = TRANSFORMS[t](Image.fromarray(a))
            ok += int(F.hamming(F.identify_bytes(data)[1], ids.fp[i]) <= F.MAX_DISTANCE)
            worst = max(worst, int(F.hamming(F.hash_canonical(F.canonical(Image.open(io.BytesIO(data)))), raw0[i])))
        out[t] = (ok, len(imgs), worst)
    rgb = F.identify(ArrayImageList(np.repeat(imgs[..., None], 3, axis=-1), np.zeros(len(imgs)), "rgb"))
    out["same array as (8,8,3) RGB"] = (int((F.hamming(rgb.fp, ids.fp) == 0).sum()), len(imgs), 0)
    return out


def tiny_sizes(data: Path, d: int) -> list[tuple]:
    """Where near-matching stops working: PneumoniaMNIST shrunk to s x s (rule off). Per size: the nearest
    distinct image, and the worst distance of upscaled / JPEG copies."""
    z = np.load(data / "pneumoniamnist/pneumoniamnist.npz")
    pm = np.concatenate([z["train_images"], z["val_images"], z["test_images"]])
    make = {"x4 nearest": lambda im: _save(im.resize((im.width * 4, im.height * 4), Image.NEAREST), "PNG"),
            "224 bicubic+JPEG75": lambda im: _save(im.resize((224, 224), Image.BICUBIC), "JPEG", quality=75),
            "64 bilinear": lambda im: _save(im.resize((64, 64), Image.BILINEAR), "PNG"),
            "JPEG q75": lambda im: _save(im, "JPEG", quality=75)}
    raw = lambda im: F.hash_canonical(F.canonical(im))  # noqa: E731 - the fingerprint without the rule
    rows = []
    for side in (8, 12, 16, 20, 24, 28):
        small = np.stack([np.asarray(Image.fromarray(a).resize((side, side), Image.BICUBIC)) for a in pm])
        fp = np.stack([raw(Image.fromarray(a)) for a in small])
        nn = nn_distinct(fp, [F.sha256_array(a) for a in small])
        worst = {k: max(int(F.hamming(raw(Image.open(io.BytesIO(m(Image.fromarray(small[i]))))), fp[i]))
                        for i in range(0, len(small), 59)) for k, m in make.items()}
        rows.append((side, int(nn.min()), int((nn <= d).sum()), worst))
    half = [int(F.hamming(raw(Image.fromarray(a).resize((14, 14), Image.BICUBIC)), raw(Image.fromarray(a))))
            for a in pm[::10]]
    return rows, half


# -- 3./4. false matches and nearest-neighbour distances ----------------------------------------------

SWEEP = (12, 16, 20, 24, 28, 32, 40)


def within(name: str, ids: F.Identities, d: int, group=None, group_name="", labels=None) -> dict:
    """Pairs within max(SWEEP, d) bits by near_matches (timed at d), split into exact duplicates and
    distinct images, cross-checked against a brute-force nearest-neighbour search."""
    t = time.perf_counter()
    F.near_matches(ids.fp, None, d)
    t_match = time.perf_counter() - t
    pairs = F.near_matches(ids.fp, None, max(max(SWEEP), d))
    sha = np.asarray(ids.sha256)
    dist = F.hamming(ids.fp[pairs[:, 0]], ids.fp[pairs[:, 1]]) if len(pairs) else np.zeros(0, int)
    exact = sha[pairs[:, 0]] == sha[pairs[:, 1]] if len(pairs) else np.zeros(0, bool)
    nn = nn_distinct(ids.fp, ids.sha256)
    row = {"name": name, "n": len(sha), "pairs": pairs[~exact], "dist": dist[~exact], "exact_pairs": int(exact.sum()),
           "nn": nn, "t_match": t_match, "group_name": group_name}
    # brute-force check: an image has a distinct neighbour within d iff near_matches found a pair with it
    close = row["pairs"][row["dist"] <= d]
    row["check"] = len(np.unique(close.ravel())) == int((nn <= d).sum())
    if group is not None:
        row["same_group"] = group[row["pairs"][:, 0]] == group[row["pairs"][:, 1]]
        row["nn_other_group"] = nn_distinct(ids.fp, ids.sha256, group)
    if labels is not None:
        row["label_disagree"] = labels[row["pairs"][:, 0]] != labels[row["pairs"][:, 1]]
    return row


def distinct_within(r: dict, d: int, which=None) -> int:
    keep = r["dist"] <= d
    return int((keep & which).sum() if which is not None else keep.sum())


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
          f"a side of {F.EXACT_ONLY_SIDE} px; data {data}\n")

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
          f"'tiny' = the copy has a side under {F.EXACT_ONLY_SIDE} px, exact-only by rule")
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
    print(f"   tiny images (8x8 digits): copies that match with the exact-only rule / worst distance without it")
    for t, (ok, n, worst) in tiny_copies().items():
        print(f"     {t:<36} {ok:>2}/{n}   {worst:>4}")
    print(f"   where near-matching stops working (rule off): PneumoniaMNIST shrunk to s x s; distinct images with a "
          f"neighbour within {d}; worst copy distance")
    tiny_rows, half = tiny_sizes(data, d)
    print(f"     {'s':>3} {'NN min':>7} {'within d':>9}" + "".join(f"{k:>20}" for k in tiny_rows[0][3]))
    for side, nnmin, close, worst in tiny_rows:
        print(f"     {side:>3} {nnmin:>7} {close:>9}" + "".join(f"{v:>20}" for v in worst.values()))
    print(f"     PneumoniaMNIST halved to 14x14 vs its 28x28 original (rule off): median {np.median(half):.0f}, "
          f"max {max(half)} bits: a copy below 16 px loses the hash's band, so no rule could match it")
    print("   decode path: identify_file (JPEG straight to luma) vs fingerprint(open_image(path)), the trainer's "
          "decode:")
    for name, pat in [("CXR 224", "chest_xray/test/*/*.jpeg"), ("CXR full-res", "chest_xray_fullres_sample/*/*/*"),
                      ("HAM 200x150", "ham10000/images/*.jpg"), ("HAM 600x450", "ham10000_fullres_sample/images/*")]:
        ps = sorted(glob.glob(str(data / pat)))[:100]
        dd = [int(F.hamming(F.identify_file(p)[1], F.fingerprint(open_image(p)))) for p in ps]
        print(f"     {name:<14} n={len(dd):>3} max distance {max(dd)}")

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
        if "same_group" in r:
            note = (f"same {r['group_name']}: {distinct_within(r, d, r['same_group'])}, other {r['group_name']}: "
                    f"{distinct_within(r, d, ~r['same_group'])}")
        if "label_disagree" in r:
            comp = components(r["n"], r["pairs"][r["dist"] <= d])
            note = (f"{distinct_within(r, d, r['label_disagree'])} pairs of different digits; merged into "
                    f"{len(comp)} groups of {sum(comp)} images, largest {comp[0] if comp else 0}")
        if not r["check"]:
            note += "  BRUTE-FORCE MISMATCH"
        print(f"   {r['name']:<38}{r['n']:>7}{r['exact_pairs']:>17}{distinct_within(r, d):>16}   {note}")
    ham_row = next((r for r in rows if r["name"] == "HAM10000"), None)
    if ham_row is not None:
        other = ham_row["pairs"][(ham_row["dist"] <= max(SWEEP)) & ~ham_row["same_group"]]
        print(f"   HAM10000 pairs of different lesion_id within {max(SWEEP)} bits (r = pixel correlation of the "
              f"canonical forms):")
        for i, j in other:
            r_pix = np.corrcoef(F.canonical(open_image(ham_paths[i])).ravel(),
                                F.canonical(open_image(ham_paths[j])).ravel())[0, 1]
            print(f"     {Path(ham_paths[i]).stem} ({lesion[i]}) ~ {Path(ham_paths[j]).stem} ({lesion[j]}): "
                  f"{int(F.hamming(ids_ham.fp[i], ids_ham.fp[j]))} bits, r={r_pix:.3f}")
    cross = F.near_matches(pm_all.fp, ids_cxr.fp, d)
    cxr_split = np.array(["test" if "/test/" in p else "train" for p in cxr])
    cxr_label = np.array([0 if "/NORMAL/" in p else 1 for p in cxr])
    pm_label = np.concatenate([pm.train.labels, pm.val.labels, pm.test.labels])
    consistent = sum(1 for i, j in cross if (cxr_split[j] == "test") == (split[i] == 2) and pm_label[i] == cxr_label[j])
    print(f"   PneumoniaMNIST vs chest_xray (MedMNIST made it from these X-rays: centre crop + 28x28): "
          f"{len(cross)} pairs within {d}, {consistent} with the matching split and label (true sources); "
          f"the other ~{len(pm_all) - len(cross)} are not found (a crop is not a copy for this fingerprint)")
    if ham_row is not None:
        print(f"   unrelated sets: HAM10000 ~ chest_xray {len(F.near_matches(ids_ham.fp, ids_cxr.fp, d))} pairs, "
              f"HAM10000 ~ PneumoniaMNIST {len(F.near_matches(ids_ham.fp, pm_all.fp, d))} pairs within {d}")
    split_dups = sum(1 for i, j in F.near_matches(pm_all.fp, None, 0) if split[i] != split[j])
    print(f"   PneumoniaMNIST exact-duplicate pairs across splits: {split_dups}")

    print("\n   Threshold sweep: copies missed, and pairs of distinct images within the threshold")
    allcopies = np.concatenate(copy_d)
    cols = ["copies missed"] + [r["name"].split(" (")[0].replace(" train+test", "").replace(" train+val+test", "")
                                for r in rows]
    extra = []
    if ham_row is not None:
        extra = ["HAM same lesion", "HAM other lesion"]
    print(f"   {'d':>4}" + "".join(f"{c[:22]:>24}" for c in cols + extra))
    for t in sorted(set(SWEEP) | {d}):
        cells = [f"{int((allcopies > t).sum())}/{len(allcopies)}"] + [str(distinct_within(r, t)) for r in rows]
        if ham_row is not None:
            cells += [str(distinct_within(ham_row, t, ham_row["same_group"])),
                      str(distinct_within(ham_row, t, ~ham_row["same_group"]))]
        print(f"   {t:>4}" + "".join(f"{c:>24}" for c in cells) + ("   <- MAX_DISTANCE" if t == d else ""))

    # 4. distributions
    print("\n4. Distances: nearest distinct image of each image vs true copies (counts per bin of bits)")
    print(f"   {'':<38}{hist_header()}")
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
    ham_other = None if ham_row is None else distinct_within(ham_row, d, ~ham_row["same_group"])
    print(f"\nfingerprint {F.FP_VERSION} MAX_DISTANCE {d}: missed real copies {real_missed}/{n_real} "
          f"(max {max(int(x.max()) for x in copy_d[:2])}), synthetic {synth_missed}/{synth_n} "
          f"(max {max(synth_all)}); false pairs CXR {distinct_within(rows[0], d)}"
          + (f", HAM other-lesion {ham_other}" if ham_other is not None else "")
          + f", PneumoniaMNIST {distinct_within(next(r for r in rows if r['name'].startswith('Pneumonia')), d)}"
          f"; identify CXR cold {t_cold:.1f} s cached {t_cached:.2f} s; near_matches {nq}x{nk} {t_nm:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
