"""Content identity of images (dpcore.privacy.fingerprint), on which the per-image privacy ledger rests.

A missed copy under-counts privacy spending, so resized / re-encoded / re-moded copies must match; a
false match only over-counts, but must stay rare, so distinct images must not. The cache must give the
same identities without decoding again, and the matcher must equal brute force. Generated images and the
bundled sklearn digits always run; real images use the `shared_data` fixture (skipped when absent).
"""
import io
import os
import sqlite3
import threading

import numpy as np
import pytest
from PIL import Image

from dpcore.data.base import ImageList
from dpcore.data.images import ArrayImageList, PathImageList, open_image
from dpcore.errors import UnreadableImagesError
from dpcore.privacy import fingerprint as F


def scene(seed: int, size=(300, 240)) -> Image.Image:
    """A smooth, X-ray-like grayscale image: low-frequency noise plus a few blobs; each seed a distinct one."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.normal(128, 40, (9, 12)).clip(0, 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    a = np.asarray(base, dtype=np.float64)
    yy, xx = np.mgrid[:size[1], :size[0]]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(10, 50)
        a += rng.uniform(-60, 60) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), "L")


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def near(a, b) -> bool:
    return int(F.hamming(a, b)) <= F.MAX_DISTANCE


def write_files(folder, images, fmt="PNG", ext="png"):
    paths = []
    for i, im in enumerate(images):
        p = folder / f"img{i}.{ext}"
        p.write_bytes(save(im, fmt))
        paths.append(str(p))
    return paths


# -- the fingerprint ---------------------------------------------------------------------------------

def test_fingerprint_shape_and_determinism():
    img = scene(0)
    fp = F.fingerprint(img)
    assert fp.dtype == np.uint8 and fp.shape == (F.NBYTES,) and F.NBYTES * 8 == 256
    assert np.array_equal(fp, F.fingerprint(scene(0)))
    assert isinstance(F.FP_VERSION, str) and F.FP_VERSION
    assert 0 < F.MAX_DISTANCE < 64


COPIES = {
    "png": lambda im: save(im, "PNG"),
    "jpeg q90": lambda im: save(im.convert("RGB"), "JPEG", quality=90),
    "jpeg q75": lambda im: save(im.convert("RGB"), "JPEG", quality=75),
    "50%": lambda im: save(im.resize((im.width // 2, im.height // 2), Image.LANCZOS), "PNG"),
    "224 stretched jpeg": lambda im: save(im.convert("RGB").resize((224, 224)), "JPEG", quality=75),
    "64 px": lambda im: save(im.resize((80, 64), Image.BILINEAR), "JPEG", quality=90),
    "rgb": lambda im: save(im.convert("RGB"), "PNG"),
    "16-bit": lambda im: save(Image.fromarray(np.asarray(im).astype(np.uint16) * 257), "PNG"),
}


@pytest.mark.parametrize("name", list(COPIES))
def test_resized_and_reencoded_copies_match(name):
    img = scene(1)
    _, fp0 = F.identify_bytes(save(img, "PNG"))
    sha, fp = F.identify_bytes(COPIES[name](img))
    assert near(fp, fp0), f"{name}: {int(F.hamming(fp, fp0))} bits"


def test_modes_give_the_same_canonical_form():
    img = scene(2)
    i16 = Image.open(io.BytesIO(COPIES["16-bit"](img)))
    assert i16.mode.startswith("I")
    for other in (img.convert("RGB"), img.convert("RGBA"), i16):
        assert int(F.hamming(F.fingerprint(other), F.fingerprint(img))) == 0


def test_exif_rotated_copy_matches():
    img = scene(3).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; displayed upright
    data = save(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    assert near(F.identify_bytes(data)[1], F.fingerprint(img))


def test_distinct_generated_images_do_not_match():
    fps = np.stack([F.fingerprint(scene(s)) for s in range(10, 40)])
    assert len(F.near_matches(fps)) == 0


def test_equal_bytes_equal_identity_and_jpeg_decode_equals_trainers(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(save(scene(4).convert("RGB"), "JPEG", quality=90))
    sha, fp = F.identify_file(p)
    assert sha == F.sha256_bytes(p.read_bytes())
    assert int(F.hamming(fp, F.fingerprint(open_image(p)))) <= 2  # fast luma decode ~ the trainer's RGB decode


# -- arrays and tiny images ------------------------------------------------------------------------

def test_array_images_sha_and_fingerprint():
    arr = np.stack([np.asarray(scene(s, (28, 28))) for s in range(6)])
    arr[5] = arr[0]  # an exact duplicate inside the set
    ids = F.identify(ArrayImageList(arr, np.zeros(6), "x"))
    assert len(ids) == 6 and ids.fp.shape == (6, F.NBYTES)
    assert ids.sha256[5] == ids.sha256[0] and len(set(ids.sha256)) == 5
    assert ids.sha256[0] == F.sha256_array(arr[0]) == F.sha256_array(arr[0][..., None])  # (H,W,1) == (H,W)
    assert ids.sha256[0] != F.sha256_array(arr[0].reshape(-1))  # the shape is part of the content
    pairs = F.near_matches(ids.fp)
    assert pairs.tolist() == [[0, 5]]
    # the same pixels as RGB, and a PNG file upscaled to 224: the same image
    rgb = F.identify(ArrayImageList(np.repeat(arr[..., None], 3, axis=-1), np.zeros(6), "rgb"))
    assert (F.hamming(rgb.fp, ids.fp) == 0).all()
    up = F.identify_bytes(save(Image.fromarray(arr[1]).resize((224, 224), Image.BICUBIC), "JPEG", quality=90))[1]
    assert near(up, ids.fp[1])


def test_digits_tiny_images_match_exact_pixels_only():
    """8x8 digits are under EXACT_ONLY_SIDE: near-matching would merge distinct digits, so they match
    lossless copies (same pixels as array, RGB or PNG) and nothing else."""
    from sklearn.datasets import load_digits

    d = np.rint(load_digits().images * (255 / 16)).clip(0, 255).astype(np.uint8)
    ids = F.identify(ArrayImageList(d, np.zeros(len(d)), "digits"))
    assert len(F.near_matches(ids.fp)) == 0
    png = F.identify_bytes(save(Image.fromarray(d[7]), "PNG"))[1]
    assert int(F.hamming(png, ids.fp[7])) == 0
    assert int(F.hamming(F.fingerprint(Image.fromarray(d[7]).convert("RGB")), ids.fp[7])) == 0
    jpeg = F.identify_bytes(save(Image.fromarray(d[7]), "JPEG", quality=95))[1]
    assert not near(jpeg, ids.fp[7]) or np.array_equal(jpeg, ids.fp[7])
    # without the rule, distinct digits do come within MAX_DISTANCE of one another
    raw = F.hash_canonical(np.stack([F.canonical(Image.fromarray(a)) for a in d]))
    assert len(F.near_matches(raw)) > 0


def test_tiny_rule_is_by_the_shorter_side():
    strip = Image.fromarray(np.tile(np.arange(120, dtype=np.uint8), (10, 1)))  # 120x10: too few rows for the band
    assert np.array_equal(F.fingerprint(strip), F._exact_only_fp(strip))
    ok = Image.fromarray(np.tile(np.arange(120, dtype=np.uint8), (16, 1)))
    assert np.array_equal(F.fingerprint(ok), F.hash_canonical(F.canonical(ok)))


def test_generic_image_list_is_identified_by_decoded_pixels():
    class Gen(ImageList):
        def __init__(self):
            self.labels = np.zeros(3, dtype=np.int64)

        def image(self, i):
            return scene(50 + i % 2).convert("RGB")

        def source(self, i):
            return f"gen[{i}]"

    ids = F.identify(Gen())
    assert ids.sha256[0] == ids.sha256[2] != ids.sha256[1]
    assert F.near_matches(ids.fp).tolist() == [[0, 2]]


# -- identify on files and the cache ------------------------------------------------------------------

@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = F._decode

    def counting(data):
        calls.append(1)
        return real(data)

    monkeypatch.setattr(F, "_decode", counting)
    return calls


def test_cache_gives_same_identities_without_decoding(tmp_path, count_decodes):
    paths = write_files(tmp_path, [scene(s) for s in range(5)])
    images = PathImageList(paths, np.zeros(5))
    db = tmp_path / "cache.sqlite"
    first = F.identify(images, cache=F.FingerprintCache(db))
    assert len(count_decodes) == 5
    again = F.identify(images, cache=F.FingerprintCache(db))  # a new object on the same file
    assert len(count_decodes) == 5
    assert again.sha256 == first.sha256 and np.array_equal(again.fp, first.fp)
    assert first.sha256[0] == F.sha256_bytes(open(paths[0], "rb").read())
    # an edited file is decoded again (new size/mtime), the others are not
    p = paths[2]
    with open(p, "wb") as f:
        f.write(save(scene(99), "PNG"))
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = F.identify(images, cache=F.FingerprintCache(db))
    assert len(count_decodes) == 6
    assert third.sha256[2] != first.sha256[2] and third.sha256[:2] == first.sha256[:2]
    # the same file reached by another path (relative) hits the cache too
    rel = os.path.relpath(paths[0])
    F.identify(PathImageList([rel], [0]), cache=F.FingerprintCache(db))
    assert len(count_decodes) == 6


def test_cache_lives_beside_other_tables_and_in_threads(tmp_path):
    db = tmp_path / "ledger.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        c.execute("INSERT INTO meta VALUES ('k', 'v')")
    c.close()
    paths = write_files(tmp_path, [scene(s) for s in range(8)])
    errors, results = [], []

    def worker(part):
        try:
            results.append(F.identify(PathImageList(part, np.zeros(len(part))), cache=F.FingerprintCache(db),
                                      workers=1))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(paths[i::2] + paths[:2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT value FROM meta").fetchone() == ("v",)
        assert c.execute("SELECT COUNT(*) FROM fingerprint_cache").fetchone()[0] == 8
    c.close()


def test_non_utf8_file_name(tmp_path, count_decodes):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    try:
        with open(raw, "wb") as f:
            f.write(save(scene(7), "PNG"))
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    path = os.fsdecode(raw)  # 'caf\udce9.png': how os.listdir and glob return it
    images = PathImageList([path], [0])
    db = tmp_path / "cache.sqlite"
    first = F.identify(images, cache=F.FingerprintCache(db))
    second = F.identify(images, cache=F.FingerprintCache(db))
    assert len(count_decodes) == 1
    assert first.sha256 == second.sha256 and np.array_equal(first.fp, second.fp)
    assert near(first.fp[0], F.fingerprint(scene(7)))


def test_unreadable_files_are_all_named(tmp_path):
    good = write_files(tmp_path, [scene(8)])
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(save(scene(9).convert("RGB"), "JPEG")[:300])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    missing = tmp_path / "gone.png"
    paths = [good[0], str(trunc), str(text), str(missing)]
    db = tmp_path / "cache.sqlite"
    with pytest.raises(UnreadableImagesError) as e:
        F.identify(PathImageList(paths, np.zeros(4)), cache=F.FingerprintCache(db))
    named = [p for p, _ in e.value.files]
    assert named == paths[1:]
    assert all(p in str(e.value) for p in paths[1:]) and good[0] not in str(e.value)
    with sqlite3.connect(db) as c:  # the good file was still cached
        assert c.execute("SELECT COUNT(*) FROM fingerprint_cache").fetchone()[0] == 1
    c.close()


# -- near_matches ----------------------------------------------------------------------------------

def planted(rng, nq, nk, nbytes, d):
    known = rng.integers(0, 256, (nk, nbytes), dtype=np.uint8)
    bits = np.unpackbits(known[rng.integers(0, nk, nq)], axis=1)
    for row in bits:  # distances spread around d: some just inside, some just outside
        row[rng.choice(bits.shape[1], min(bits.shape[1], int(rng.integers(0, 2 * d + 3))), replace=False)] ^= 1
    return np.packbits(bits, axis=1), known


@pytest.mark.parametrize("nbytes,d", [(32, 0), (32, 1), (32, 3), (32, 7), (32, 16), (32, F.MAX_DISTANCE), (32, 40),
                                      (8, 5), (5, 9)])
def test_near_matches_equals_brute_force(nbytes, d):
    rng = np.random.default_rng(d * 100 + nbytes)
    q, k = planted(rng, 120, 400, nbytes, d)
    got = F.near_matches(q, k, d)
    dist = F.hamming(q[:, None], k[None])
    assert np.array_equal(got, np.argwhere(dist <= d))
    both = np.concatenate([q, k])
    got = F.near_matches(both, None, d)
    dist = F.hamming(both[:, None], both[None])
    assert np.array_equal(got, np.argwhere(np.triu(dist <= d, 1)))
    assert np.array_equal(F.near_matches(both, both, d), got)  # the same array means within one set


def test_near_matches_small_blocks_and_duplicates():
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (30, 32), dtype=np.uint8)
    fps = np.concatenate([base, base, base])  # every fingerprint three times: all candidates in one key run
    got = F.near_matches(fps, None, F.MAX_DISTANCE, block=7)
    dist = F.hamming(fps[:, None], fps[None])
    assert np.array_equal(got, np.argwhere(np.triu(dist <= F.MAX_DISTANCE, 1)))
    assert len(got) == 30 * 3


def test_cache_file_that_is_not_sqlite_is_refused_with_a_fix(tmp_path):
    bad = tmp_path / "cache.sqlite"
    bad.write_text("this is not a database " * 100)
    paths = write_files(tmp_path, [scene(1)])
    from dpcore.errors import DataError
    with pytest.raises(DataError, match="Fix:"):
        F.identify(PathImageList(paths, [0]), cache=F.FingerprintCache(bad))


def test_same_path_twice_in_a_list(tmp_path, count_decodes):
    paths = write_files(tmp_path, [scene(1)]) * 2
    db = tmp_path / "c.sqlite"
    a = F.identify(PathImageList(paths, [0, 0]), cache=F.FingerprintCache(db))
    n = len(count_decodes)
    b = F.identify(PathImageList(paths, [0, 0]), cache=F.FingerprintCache(db))
    assert len(count_decodes) == n and a.sha256 == b.sha256 and a.sha256[0] == a.sha256[1]
    assert F.near_matches(b.fp).tolist() == [[0, 1]]


def test_near_matches_edge_cases():
    empty = np.zeros((0, 32), dtype=np.uint8)
    one = np.zeros((1, 32), dtype=np.uint8)
    assert F.near_matches(empty, one).shape == (0, 2)
    assert F.near_matches(one, empty).shape == (0, 2)
    assert F.near_matches(one).shape == (0, 2)
    with pytest.raises(ValueError, match="same FP_VERSION"):
        F.near_matches(one, np.zeros((1, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="2-d"):
        F.near_matches(np.zeros(32, dtype=np.uint8))
    two = np.array([[0], [255]], dtype=np.uint8)  # max_distance >= the bits: every pair
    assert F.near_matches(two, None, 8).tolist() == [[0, 1]]
    assert F.near_matches(two, two.copy(), 8).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


# -- real images ------------------------------------------------------------------------------------

def test_real_resized_copies_match(shared_data):
    full = sorted((shared_data / "chest_xray_fullres_sample/train").glob("*/*.jpeg"))[::5]
    ham = sorted((shared_data / "ham10000_fullres_sample/images").glob("*.jpg"))[::3]
    assert full and ham
    pairs = [(p, shared_data / "chest_xray/train" / p.parent.name / p.name) for p in full]
    pairs += [(p, shared_data / "ham10000/images" / p.name) for p in ham]
    for orig, copy in pairs:
        a, b = F.identify_file(orig), F.identify_file(copy)
        assert a[0] != b[0]
        assert near(a[1], b[1]), f"{orig.name}: {int(F.hamming(a[1], b[1]))} bits"


def test_real_distinct_images_do_not_match(shared_data):
    paths = sorted((shared_data / "chest_xray/train").glob("*/*.jpeg"))[::20]  # 261 X-rays
    ids = F.identify(PathImageList([str(p) for p in paths], np.zeros(len(paths))))
    sha = np.asarray(ids.sha256)
    pairs = F.near_matches(ids.fp)
    assert all(sha[i] == sha[j] for i, j in pairs)  # only byte-identical duplicates
