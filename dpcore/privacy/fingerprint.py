"""Content identity of images, so the privacy ledger can account per image, wherever a copy lives.

Each image gets two identities:

* ``sha256`` of its content (a file's bytes; an array's pixel bytes with dtype and shape): exact copies.
* ``fp``, a 256-bit perceptual fingerprint that a resized, re-encoded, stretched or re-moded copy shares up
  to a few bits: a DCT hash (pHash) of a *canonical form* = luma, resampled to 32x32. The canonical form
  is square on purpose: a copy squashed to a square (the upstream 224x224 chest X-rays) maps to the same
  32x32 as its original. Nothing of the training preprocessing (crop, size) enters it.

Two images are taken as one when their fingerprints differ in at most ``MAX_DISTANCE`` bits
(`near_matches`). A false match only over-counts privacy spending; a missed match would under-count, so the
threshold sits well above the distances of true copies (measured in ``bench/fingerprint.py``).

Tiny images (a side under ``EXACT_ONLY_SIDE`` = 16 px, e.g. 8x8 digits) cannot hold the hash's 16x16 lowest
frequencies: distinct 8x8 digits come within 16 bits of each other while their upscaled or JPEG copies drift
30-60 bits away. Their ``fp`` is a hash of the exact 8-bit luma pixels instead: lossless copies (PNG, RGB,
array) still match, lossy or resized ones are not found (the bench measures this).

Decoding is the cost, so `identify` decodes in a small thread pool (PIL releases the GIL) and keeps a
`FingerprintCache` keyed by file signature; arrays are hashed directly.
"""
from __future__ import annotations

import hashlib
import io
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dpcore.data.base import ImageList, sha256_array  # noqa: F401 - part of this module's interface
from dpcore.data.images import ArrayImageList, PathImageList, to_rgb
from dpcore.errors import DataError, UnreadableImagesError

FP_VERSION = "phash256-luma-bicubic32-v1"  # stored beside every fingerprint: a changed algorithm must not be compared
CANON = 32  # canonical side: the fingerprint sees only these 32x32 luma values
HASH = 16  # the 16x16 lowest DCT frequencies -> 256 bits
NBYTES = HASH * HASH // 8
MAX_DISTANCE = 28  # copies measured <= 14 bits apart, distinct images >= 34 (40 for X-rays): bench/fingerprint.py
EXACT_ONLY_SIDE = HASH  # a side under 16 px: exact pixels only (measured: near-matching works from 16x16 up)


# -- the fingerprint ---------------------------------------------------------------------------------

def _dct_matrix(n: int, k: int) -> np.ndarray:
    """Orthonormal DCT-II rows 0..k-1 for length n (plain numpy: no scipy version can change the bits)."""
    x = np.arange(n)
    m = np.cos(np.pi * (2 * x[None, :] + 1) * np.arange(k)[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(CANON, HASH)


def canonical(img: Image.Image) -> np.ndarray:
    """(32, 32) float64 luma 0..255: the only pixels the fingerprint depends on.

    Any mode is first brought to 8-bit RGB the way the trainer sees it (`to_rgb`: 16-bit scaled, alpha on
    black), then to luma, so an RGB copy of a grayscale image (and back) gives the same canonical form.
    Resampling is PIL's antialiased bicubic (its support widens with the reduction, so it averages every
    source pixel, like an area filter), not BOX: measured, BOX's aliasing put resized copies up to 18 bits
    apart instead of 12, and upscaled copies of 28x28 images 36 bits instead of 12.
    """
    f = Image.fromarray(np.asarray(_luma8(img), dtype=np.float32), "F")
    return np.asarray(f.resize((CANON, CANON), Image.BICUBIC), dtype=np.float64)


def hash_canonical(x: np.ndarray) -> np.ndarray:
    """pHash of canonical forms (..., 32, 32) -> (..., 32) uint8: low DCT frequencies above their median.

    Coefficients are rounded to 1e-6 first so that a flat image's float noise cannot pick its bits.
    """
    c = np.round(_DCT @ np.asarray(x, dtype=np.float64) @ _DCT.T, 6).reshape(*x.shape[:-2], HASH * HASH)
    med = np.median(c[..., 1:], axis=-1, keepdims=True)  # the DC term (brightness) stays out of the median
    return np.packbits(c > med, axis=-1)


def _luma8(img: Image.Image) -> Image.Image:
    return img if img.mode == "L" else to_rgb(img).convert("L")


def _exact_only_fp(img: Image.Image) -> np.ndarray:
    """A tiny image's fp: a hash of its exact 8-bit luma pixels. Lossless copies (PNG, array, RGB) share
    it; anything else lands ~128 bits away from every fingerprint, so it never near-matches."""
    g = _luma8(img)
    h = hashlib.sha256(f"{FP_VERSION} tiny luma {g.width}x{g.height}\0".encode())
    h.update(g.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)[:NBYTES].copy()


def _tiny(img: Image.Image) -> bool:
    return min(img.size) < EXACT_ONLY_SIDE


def fingerprint(img: Image.Image) -> np.ndarray:
    """Perceptual fingerprint (32 uint8 = 256 bits) of a decoded image; resized/re-encoded copies stay near.

    A tiny image (a side < EXACT_ONLY_SIDE) gets a hash of its exact pixels instead (see the module doc).
    """
    return _exact_only_fp(img) if _tiny(img) else hash_canonical(canonical(img))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between fingerprints (broadcasting over leading axes)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)


# -- exact content ---------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(data: bytes) -> Image.Image:
    """Decode file bytes as the trainer would (`open_image`: EXIF rotation applied), at full size.

    A JPEG is decoded straight to luma (libjpeg's Y; 4x faster than RGB, and equal for grayscale X-rays);
    tiny ones are not, their exact-pixel hash must equal that of `fingerprint(open_image(path))`. Not the
    DCT-domain 1/2..1/8 scaling of PIL's draft: measured, it moved fingerprints by 6-14 bits.
    """
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG" and im.mode == "RGB" and not _tiny(im):
        im.draft("L", None)
    im.load()
    if im.getexif().get(0x0112, 1) != 1:  # a camera's rotation flag: the copy someone saved upright is the same image
        im = ImageOps.exif_transpose(im)
    return im


def identify_bytes(data: bytes, name: str = "<bytes>") -> tuple[str, np.ndarray]:
    """(sha256 of the file bytes, fingerprint of its decoded pixels); raises UnreadableImagesError naming `name`."""
    try:
        img = _decode(data)
        fp = fingerprint(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise UnreadableImagesError([(name, f"{type(e).__name__}: {e}")]) from e
    return sha256_bytes(data), fp


def identify_file(path: str | os.PathLike) -> tuple[str, np.ndarray]:
    """`identify_bytes` of one file (read once: the sha256 and the decode see the same bytes)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UnreadableImagesError([(os.fsdecode(path), f"{type(e).__name__}: {e}")]) from e
    return identify_bytes(data, os.fsdecode(path))


# -- the cache -----------------------------------------------------------------------------------------

_CACHE_SCHEMA = """CREATE TABLE IF NOT EXISTS fingerprint_cache (
    path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ino INTEGER NOT NULL,
    fp_version TEXT NOT NULL, sha256 TEXT NOT NULL, fp BLOB NOT NULL) WITHOUT ROWID"""


class FingerprintCache:
    """Identities of files by signature (absolute path, size, mtime_ns, inode) in a table of an SQLite file.

    The file may be shared (e.g. the ledger's own file) and used by several processes: every call opens
    its own short-lived connection, writes are one transaction each, and the table is created if missing.
    Paths are stored as ``os.fsencode`` bytes, so names that are not valid UTF-8 never fail. A row whose
    signature or FP_VERSION differs is ignored and replaced: an edited file is decoded again.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)  # another process's write waits, it does not fail
        if not self._ready:
            with db:
                db.execute(_CACHE_SCHEMA)
            self._ready = True
        return db

    def get(self, keys: list[tuple[bytes, int, int, int]]) -> list[tuple[str, np.ndarray] | None]:
        """(sha256, fp) for each (path, size, mtime_ns, ino) whose stored signature is equal, else None."""
        out: list[tuple[str, np.ndarray] | None] = [None] * len(keys)
        where: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            where.setdefault(k[0], []).append(i)
        paths = list(where)
        try:
            with closing(self._connect()) as db:
                for s in range(0, len(paths), 500):
                    chunk = paths[s:s + 500]
                    rows = db.execute(
                        "SELECT path, size, mtime_ns, ino, sha256, fp FROM fingerprint_cache "
                        f"WHERE fp_version = ? AND path IN ({','.join('?' * len(chunk))})", [FP_VERSION, *chunk])
                    for p, size, mtime, ino, sha, fp in rows:
                        for i in where[bytes(p)]:
                            if keys[i][1:] == (size, mtime, ino) and len(fp) == NBYTES:
                                out[i] = sha, np.frombuffer(fp, dtype=np.uint8).copy()
        except sqlite3.Error as e:
            raise self._error("read", e) from e
        return out

    def put(self, rows: list[tuple[tuple[bytes, int, int, int], str, np.ndarray]]) -> None:
        """Store (signature, sha256, fp) rows in one transaction."""
        if not rows:
            return
        try:
            with closing(self._connect()) as db, db:
                db.executemany("INSERT OR REPLACE INTO fingerprint_cache VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(k[0], k[1], k[2], k[3], FP_VERSION, sha, fp.tobytes()) for k, sha, fp in rows])
        except sqlite3.Error as e:
            raise self._error("written", e) from e

    def _error(self, what: str, e: Exception) -> DataError:
        return DataError(f"the fingerprint cache in {self.path} cannot be {what} ({type(e).__name__}: {e}). "
                         f"Fix: check that the file is a readable, writable SQLite file and not locked by a "
                         f"stuck process; the cache can be emptied with DROP TABLE fingerprint_cache")


def _signature(path: str) -> tuple[bytes, int, int, int]:
    st = os.stat(path)
    return os.fsencode(os.path.abspath(path)), st.st_size, st.st_mtime_ns, st.st_ino


# -- identify ------------------------------------------------------------------------------------------

@dataclass
class Identities:
    """Content identities of an ImageList, in its order: ``sha256[i]`` (hex) and ``fp[i]`` (NBYTES uint8)."""

    sha256: list[str]
    fp: np.ndarray
    fp_version: str = FP_VERSION

    def __len__(self) -> int:
        return len(self.sha256)


def identify(images: ImageList, cache: FingerprintCache | None = None, workers: int = 2) -> Identities:
    """sha256 and fingerprint of every item. Files are decoded in `workers` threads and cached by signature;
    arrays are hashed directly. All unreadable files are reported together (UnreadableImagesError)."""
    if isinstance(images, ArrayImageList):
        return _identify_arrays(images.array)
    if isinstance(images, PathImageList):
        return _identify_paths(images.paths, cache, workers)
    return _identify_decoded(images, workers)


def _identify_arrays(array: np.ndarray) -> Identities:
    a = np.asarray(array)
    n = len(a)
    sha = [sha256_array(a[i]) for i in range(n)]
    fp = np.zeros((n, NBYTES), dtype=np.uint8)
    if n and min(a.shape[1], a.shape[2]) < EXACT_ONLY_SIDE:
        for i in range(n):
            fp[i] = _exact_only_fp(_array_image(a[i]))
    elif n:  # one batched DCT for all
        fp[:] = hash_canonical(np.stack([canonical(_array_image(a[i])) for i in range(n)]))
    return Identities(sha, fp)


def _array_image(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return Image.fromarray(a)


def _identify_paths(paths: list[str], cache: FingerprintCache | None, workers: int) -> Identities:
    n = len(paths)
    sha: list[str | None] = [None] * n
    fp = np.zeros((n, NBYTES), dtype=np.uint8)
    failed: dict[int, str] = {}
    keys: list[tuple | None] = [None] * n
    for i, p in enumerate(paths):
        try:
            keys[i] = _signature(p)
        except OSError as e:
            failed[i] = f"{type(e).__name__}: {e}"
    todo = [i for i in range(n) if keys[i] is not None]
    if cache is not None and todo:
        for i, hit in zip(todo, cache.get([keys[i] for i in todo])):
            if hit is not None:
                sha[i], fp[i] = hit
        todo = [i for i in todo if sha[i] is None]

    def work(i: int):
        try:
            return i, identify_file(paths[i]), None
        except UnreadableImagesError as e:
            return i, None, "; ".join(why for _, why in e.files)

    fresh = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, got, why in pool.map(work, todo):
            if got is None:
                failed[i] = why
            else:
                sha[i], fp[i] = got
                fresh.append((keys[i], *got))
    if cache is not None:
        cache.put(fresh)  # also when some failed: the good ones need not be decoded again after the fix
    if failed:
        raise UnreadableImagesError([(paths[i], failed[i]) for i in sorted(failed)])
    return Identities(sha, fp)


def _identify_decoded(images: ImageList, workers: int) -> Identities:
    """Any other ImageList: identity of the decoded RGB pixels (no file bytes to hash, no cache)."""
    def work(i: int):
        img = images.image(i)
        return sha256_array(np.asarray(img)), fingerprint(img)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        got = list(pool.map(work, range(len(images))))
    fp = np.stack([f for _, f in got]) if got else np.zeros((0, NBYTES), dtype=np.uint8)
    return Identities([s for s, _ in got], fp)


# -- matching ------------------------------------------------------------------------------------------

_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)


def _chunk_keys(bits: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """One uint64 key per row for the bits [lo, hi): exact for <= 64 bits, hashed above (a key collision
    only adds a candidate, which the exact distance check then drops)."""
    by = np.packbits(bits[:, lo:hi], axis=1, bitorder="little")
    if by.shape[1] <= 8:
        v = np.zeros(len(by), dtype=np.uint64)
        for b in range(by.shape[1]):
            v |= by[:, b].astype(np.uint64) << np.uint64(8 * b)
        return v
    by = np.pad(by, ((0, 0), (0, (-by.shape[1]) % 8)))
    v = np.ascontiguousarray(by).view("<u8").astype(np.uint64)
    return (v * _MIX[:v.shape[1]]).sum(axis=1, dtype=np.uint64) ^ v[:, 0]


def _words(a: np.ndarray) -> np.ndarray:
    """Fingerprints as uint64 words (zero-padded): popcount over 4 words instead of 32 bytes."""
    pad = (-a.shape[1]) % 8
    return np.ascontiguousarray(np.pad(a, ((0, 0), (0, pad))) if pad else a).view(np.uint64)


def _as_fps(fp, what: str) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(fp, dtype=np.uint8))
    if a.ndim != 2:
        raise ValueError(f"{what}: fingerprints must be a 2-d uint8 array (N, nbytes), got shape {a.shape}")
    return a


def _plan(nbits: int, d: int, nq: int, nk: int) -> tuple[int, int]:
    """(chunks m, radius r) for multi-index hashing: some chunk of a pair within d bits differs in <= r bits
    when m * (r + 1) > d. r=1 probes each chunk's w one-bit neighbours too, but its chunks are twice as
    wide, so far fewer candidates: the cheaper of the two by a uniform-bits cost estimate (probe ~3 checks)."""
    best = None
    for r in (0, 1):
        m = min(d // (r + 1) + 1, nbits)
        w = nbits / m
        if r and w > 62:  # neighbours are enumerated on exact integer keys
            continue
        probes = nq * m * (1 + r * w)
        cost = 3 * probes + probes * nk / 2.0 ** w
        if best is None or cost < best[0]:
            best = cost, m, r
    return best[1], best[2]


def near_matches(query_fp: np.ndarray, known_fp: np.ndarray | None = None,
                 max_distance: int = MAX_DISTANCE, block: int = 4_000_000) -> np.ndarray:
    """All index pairs (i, j), int64 (K, 2) sorted, with hamming(query[i], known[j]) <= max_distance.

    ``known_fp=None`` (or the very same array object) means within one set: pairs i < j, each once, no (i, i).
    Multi-index hashing: the bits are cut into m chunks with m*(r+1) > max_distance, so a pair within
    max_distance bits differs in at most r bits on some chunk (pigeonhole); only pairs found that way are
    checked with popcount, so nothing is missed. `block` bounds the candidates held at once (memory).
    """
    q = _as_fps(query_fp, "query_fp")
    within = known_fp is None or known_fp is query_fp
    k = q if within else _as_fps(known_fp, "known_fp")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"fingerprints of {q.shape[1]} and {k.shape[1]} bytes cannot be compared. "
                         f"Fix: compute both with the same FP_VERSION")
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    if not len(q) or not len(k) or not q.shape[1]:
        return np.zeros((0, 2), dtype=np.int64)
    nbits = q.shape[1] * 8
    if max_distance >= nbits:  # every pair is within reach
        i, j = np.triu_indices(len(q), 1) if within else np.indices((len(q), len(k))).reshape(2, -1)
        return np.stack([i, j], axis=1).astype(np.int64)
    m, r = _plan(nbits, max_distance, len(q), len(k))
    edges = np.linspace(0, nbits, m + 1).round().astype(int)
    qbits = np.unpackbits(q, axis=1)
    kbits = qbits if within else np.unpackbits(k, axis=1)
    qw = _words(q)
    kw = qw if within else _words(k)
    found = [np.zeros(0, dtype=np.int64)]
    for c in range(m):
        lo_bit, hi_bit = int(edges[c]), int(edges[c + 1])
        qk = _chunk_keys(qbits, lo_bit, hi_bit)
        kk = qk if within else _chunk_keys(kbits, lo_bit, hi_bit)
        if r:  # the key itself and its hi-lo one-bit neighbours
            flips = np.concatenate([[0], np.uint64(1) << np.arange(hi_bit - lo_bit, dtype=np.uint64)])
            probe = (qk[:, None] ^ flips[None, :].astype(np.uint64)).ravel()
            owner = np.repeat(np.arange(len(q)), len(flips))
        else:
            probe, owner = qk, np.arange(len(q))
        if hi_bit - lo_bit <= 22:  # small keys: a direct table of where each key's run starts, no search
            k64 = kk.astype(np.int64)
            order = np.argsort(k64)
            starts = np.zeros((1 << (hi_bit - lo_bit)) + 1, dtype=np.int64)
            np.cumsum(np.bincount(k64, minlength=len(starts) - 1), out=starts[1:])
            p64 = probe.astype(np.int64)
            lo, hi = starts[p64], starts[p64 + 1]
        else:
            order = np.argsort(kk)
            ks = kk[order]
            lo, hi = np.searchsorted(ks, probe, "left"), np.searchsorted(ks, probe, "right")
        has = hi > lo
        owner, lo, counts = owner[has], lo[has], (hi - lo)[has]
        ends = np.cumsum(counts)
        s = 0
        while s < len(counts):  # probes in blocks of about `block` candidates
            e = max(int(np.searchsorted(ends, (ends[s - 1] if s else 0) + block, "right")), s + 1)
            cnt = counts[s:e]
            qi = np.repeat(owner[s:e], cnt)
            offs = np.arange(len(qi)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            kj = order[np.repeat(lo[s:e], cnt) + offs]
            if within:
                keep = qi < kj
                qi, kj = qi[keep], kj[keep]
            ok = hamming(qw[qi], kw[kj]) <= max_distance
            found.append(qi[ok] * len(k) + kj[ok])
            s = e
    flat = np.unique(np.concatenate(found))
    return np.stack([flat // len(k), flat % len(k)], axis=1).astype(np.int64)
