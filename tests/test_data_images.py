"""Decoding every image mode to RGB, and materialize's handling of unreadable files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dpcore.data import ArrayImageList, PathImageList, materialize, open_image, to_rgb
from dpcore.errors import DataError, UnreadableImagesError


def _px(img: Image.Image, xy=(0, 0)) -> tuple:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def to_uint8_8x8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 200, (200, 200, 200)),
    ("1", 1, (255, 255, 255)),
    ("RGB", (1, 2, 3), (1, 2, 3)),
    ("RGBA", (200, 100, 50, 255), (200, 100, 50)),
    ("RGBA", (200, 100, 50, 0), (0, 0, 0)),  # fully transparent -> black
    ("RGBA", (200, 100, 50, 128), (100, 50, 25)),
    ("LA", (200, 255), (200, 200, 200)),
    ("LA", (200, 0), (0, 0, 0)),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("I;16", 65535, (255, 255, 255)),
    ("I;16", 257 * 100, (100, 100, 100)),
    ("I;16B", 65535, (255, 255, 255)),
    ("F", 0.5, (128, 128, 128)),  # a [0, 1] float image
    ("F", 1000.0, (255, 255, 255)),
])
def test_to_rgb_modes(mode, value, expected):
    assert _px(to_rgb(Image.new(mode, (4, 3), value))) == expected


def test_to_rgb_32bit_int_scaled_by_max():
    a = np.array([[0, 1000, 4000]], dtype=np.int32)
    out = to_rgb(Image.fromarray(a, "I"))
    assert [_px(out, (x, 0))[0] for x in range(3)] == [0, 64, 255]
    small = to_rgb(Image.fromarray(np.array([[7, 200]], dtype=np.int32), "I"))  # already 8-bit range: unchanged
    assert _px(small, (1, 0)) == (200, 200, 200)


def test_to_rgb_palette_with_and_without_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    assert _px(to_rgb(p), (0, 0)) == (255, 0, 0) and _px(to_rgb(p), (1, 0)) == (0, 255, 0)
    p.info["transparency"] = 0  # palette index 0 is transparent
    assert _px(to_rgb(p), (0, 0)) == (0, 0, 0) and _px(to_rgb(p), (1, 0)) == (0, 255, 0)
    pa = Image.new("PA", (1, 1))
    pa.putpalette([10, 20, 30] + [0] * 765)
    pa.putpixel((0, 0), (0, 255))
    assert _px(to_rgb(pa)) == (10, 20, 30)


@pytest.fixture
def mixed_files(tmp_path):
    """Real files in the modes medical images come in: 8-bit gray, RGBA, palette, 16-bit PNG, CMYK JPEG."""
    files = {}
    Image.new("L", (10, 6), 77).save(files.setdefault("gray.png", tmp_path / "gray.png"))
    Image.new("RGBA", (10, 6), (10, 20, 30, 255)).save(files.setdefault("rgba.png", tmp_path / "rgba.png"))
    Image.new("RGB", (10, 6), (0, 0, 255)).convert("P").save(files.setdefault("pal.gif", tmp_path / "pal.gif"))
    Image.fromarray(np.full((6, 10), 65535, dtype=np.uint16)).save(files.setdefault("x16.png", tmp_path / "x16.png"))
    Image.new("CMYK", (10, 6), (0, 0, 0, 0)).save(files.setdefault("cmyk.jpg", tmp_path / "cmyk.jpg"))
    Image.new("RGB", (10, 6), (40, 50, 60)).save(files.setdefault("rgb.JPEG", tmp_path / "rgb.JPEG"))
    return files


def test_open_image_mixed_modes(mixed_files):
    on_disk = {k: Image.open(p).mode for k, p in mixed_files.items()}
    assert on_disk == {"gray.png": "L", "rgba.png": "RGBA", "pal.gif": "P", "x16.png": "I;16",
                       "cmyk.jpg": "CMYK", "rgb.JPEG": "RGB"}
    got = {k: open_image(p) for k, p in mixed_files.items()}
    assert all(im.mode == "RGB" and im.size == (10, 6) for im in got.values())
    assert _px(got["gray.png"]) == (77, 77, 77)
    assert _px(got["rgba.png"]) == (10, 20, 30)
    assert _px(got["pal.gif"]) == (0, 0, 255)
    assert _px(got["x16.png"]) == (255, 255, 255)  # 16-bit white stays white, not clipped garbage
    assert all(abs(c - 255) <= 2 for c in _px(got["cmyk.jpg"]))
    assert all(abs(a - b) <= 3 for a, b in zip(_px(got["rgb.JPEG"]), (40, 50, 60)))


def test_open_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(UnreadableImagesError, match="broken.png") as e:
        open_image(bad)
    assert e.value.files[0][0] == str(bad)
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.jpg")
    truncated.write_bytes((tmp_path / "ok.jpg").read_bytes()[:200])
    with pytest.raises(UnreadableImagesError, match="truncated.jpg"):
        open_image(truncated)  # fails here because the pixels are decoded, not only the header


def test_materialize_decodes_all_and_reports_all_failures(mixed_files, tmp_path):
    paths = list(mixed_files.values())
    bad1, bad2 = tmp_path / "bad1.png", tmp_path / "bad2.jpg"
    bad1.write_bytes(b"garbage")
    bad2.write_bytes(b"")
    images = PathImageList(paths + [bad1, bad2], list(range(len(paths))) + [0, 1])
    with pytest.raises(UnreadableImagesError) as e:
        materialize(images, to_uint8_8x8)
    assert [f for f, _ in e.value.files] == [str(bad1), str(bad2)]  # all failures, not just the first
    assert "bad1.png" in str(e.value) and "bad2.jpg" in str(e.value)

    m = materialize(images, to_uint8_8x8, skip_unreadable=True)
    assert m.images.shape == (len(paths), 3, 8, 8) and m.images.dtype == torch.uint8
    assert m.labels.dtype == torch.int64 and m.labels.tolist() == list(range(len(paths)))
    assert m.kept == list(range(len(paths)))
    assert [s for s, _ in m.skipped] == [str(bad1), str(bad2)]
    assert m.images[0, :, 0, 0].tolist() == [77, 77, 77]


def test_materialize_single_worker_matches_pool():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(20, 5, 7), dtype=np.uint8)
    imgs = ArrayImageList(arr, np.arange(20) % 3, "toy")
    a = materialize(imgs, to_uint8_8x8, workers=1)
    b = materialize(imgs, to_uint8_8x8, workers=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_materialize_rejects_bad_transform_output():
    imgs = ArrayImageList(np.zeros((3, 4, 4), np.uint8), [0, 1, 0], "toy")
    with pytest.raises(DataError, match="uint8"):
        materialize(imgs, lambda im: torch.zeros(3, 4, 4))  # float
    sizes = iter([4, 5, 4])
    with pytest.raises(DataError, match="fixed shape"):
        materialize(imgs, lambda im: torch.zeros(3, next(sizes), 4, dtype=torch.uint8), workers=1)


def test_array_image_list_subset_keeps_original_index():
    arr = np.stack([np.full((3, 3, 3), i, np.uint8) for i in range(5)])
    lst = ArrayImageList(arr, [0, 1, 0, 1, 0], "toy").subset([4, 2])
    assert len(lst) == 2 and lst.labels.tolist() == [0, 0]
    assert lst.source(0) == "toy[4]" and _px(lst.image(1)) == (2, 2, 2)
    gray = ArrayImageList(np.full((1, 2, 2), 9, np.uint8), [0], "g")
    assert _px(gray.image(0)) == (9, 9, 9)
    with pytest.raises(DataError, match="uint8"):
        ArrayImageList(np.zeros((1, 2, 2), np.float32), [0], "f")
    with pytest.raises(DataError, match="labels"):
        ArrayImageList(np.zeros((2, 2, 2), np.uint8), [0], "n")
