"""Uploads: real PNG/JPEG decode to RGB; oversize, non-images, GIF, bombs and truncated files are refused."""
import io

import pytest
from PIL import Image

from dpcore.errors import DPCoreError
from dpcore.analysis.uploads import ALLOWED_FORMATS, MAX_PIXELS, MAX_UPLOAD_BYTES, UploadError, decode_upload


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_constants():
    assert MAX_UPLOAD_BYTES == 10 * 1024 * 1024 and MAX_PIXELS == 40_000_000
    assert ALLOWED_FORMATS == ("PNG", "JPEG") and issubclass(UploadError, DPCoreError)


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"),
                                      ("RGB", "JPEG"), ("L", "JPEG")])
def test_valid_images_decode_to_rgb(mode, fmt):
    img = Image.new(mode, (30, 20), color=200 if mode != "RGB" and mode != "RGBA" else (10, 120, 200, 255)[:len(mode)])
    out = decode_upload(_bytes(img, fmt), "x." + fmt.lower())
    assert out.mode == "RGB" and out.size == (30, 20)
    out.load()  # still usable after decode_upload returned


def test_too_many_bytes():
    data = _bytes(Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(UploadError, match=r"scan\.png.*more than"):
        decode_upload(data, "scan.png", max_bytes=len(data) - 1)


@pytest.mark.parametrize("data", [b"", b"\x00\x01garbage" * 50, b"just some notes\n" * 20])
def test_not_an_image(data):
    with pytest.raises(UploadError, match=r"notes\.png"):
        decode_upload(data, "notes.png")


def test_gif_is_not_accepted():
    data = _bytes(Image.new("P", (10, 10)), "GIF")
    with pytest.raises(UploadError, match=r"anim\.gif: GIF images are not accepted, only PNG or JPEG"):
        decode_upload(data, "anim.gif")


def test_decompression_bomb_refused_by_pil_on_open():
    data = _bytes(Image.new("1", (20000, 20000)), "PNG", optimize=True)
    assert len(data) < 100_000  # tiny on disk, 400 Mpx declared: PIL itself refuses to open it
    with pytest.raises(UploadError, match=r"bomb\.png.*400,000,000 pixels.*decompression bomb"):
        decode_upload(data, "bomb.png")


def test_decompression_bomb_refused_from_header_before_decoding(monkeypatch):
    data = _bytes(Image.new("1", (7000, 7000)), "PNG", optimize=True)  # 49 Mpx: under PIL's limit, over ours
    assert len(data) < 50_000

    def no_decoding(self):
        raise AssertionError("decoded despite the pixel limit")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(UploadError, match=r"bomb\.png.*7000×7000 = 49,000,000 pixels.*40,000,000 allowed"):
        decode_upload(data, "bomb.png")


def test_pil_bomb_limit_also_caught(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own guard fires on open
    data = _bytes(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(UploadError, match=r"big\.png.*decompression bomb"):
        decode_upload(data, "big.png")


def test_lower_pixel_limit():
    data = _bytes(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(UploadError, match="100×100"):
        decode_upload(data, "a.png", max_pixels=9_999)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(fmt):
    img = Image.effect_noise((64, 64), 40).convert("RGB")
    data = _bytes(img, fmt)
    with pytest.raises(UploadError, match=r"cut\.\w+: the .* truncated or corrupt"):
        decode_upload(data[: len(data) // 2], f"cut.{fmt.lower()}")
