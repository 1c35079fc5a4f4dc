"""Safe decoding of user-uploaded images: size, format and pixel-count limits checked before decoding.

An upload is untrusted input: a few-KB PNG can declare 20000×20000 pixels and exhaust memory when
decoded (a decompression bomb), and a renamed text file or a truncated JPEG must fail with a message
that says which file and what to do, not with a PIL traceback.
"""
from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageOps

from dpcore.data import to_rgb
from dpcore.errors import DPCoreError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
ALLOWED_FORMATS = ("PNG", "JPEG")
_FORMAT_ALIASES = {"MPO": "JPEG"}  # phone cameras write multi-picture JPEGs, which PIL reports as MPO


class UploadError(DPCoreError):
    """An uploaded file was refused; the message names the file, the problem and the fix."""


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def decode_upload(data: bytes, name: str, *, max_bytes: int = MAX_UPLOAD_BYTES,
                  max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an uploaded PNG/JPEG to 8-bit RGB (EXIF rotation applied), or raise UploadError."""
    allowed = " or ".join(ALLOWED_FORMATS)
    if not data:
        raise UploadError(f"{name}: the file is empty. Fix: upload a {allowed} image")
    if len(data) > max_bytes:
        raise UploadError(f"{name}: the file is {_mb(len(data))}, more than the {_mb(max_bytes)} allowed. "
                          "Fix: upload a smaller image (resize or re-save it as JPEG)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own limit, as an error
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb(name, None, max_pixels, e) from e
        except Image.UnidentifiedImageError as e:  # its message names PIL's in-memory buffer, not the file
            raise UploadError(f"{name}: not a readable image (no PNG or JPEG header found). "
                              f"Fix: upload a {allowed} image file") from e
        except Exception as e:  # SyntaxError, ...
            raise UploadError(f"{name}: not a readable image ({type(e).__name__}: "
                              f"{re.sub(r'<_io.BytesIO object at 0x[0-9a-f]+>', 'the file', str(e))}). "
                              f"Fix: upload a {allowed} image file") from e
        with im:
            fmt = _FORMAT_ALIASES.get(im.format or "", im.format)
            if fmt not in ALLOWED_FORMATS:
                raise UploadError(f"{name}: {im.format or 'unknown'} images are not accepted, only {allowed}. "
                                  f"Fix: convert the image to PNG or JPEG and upload it again")
            width, height = im.size
            if width * height > max_pixels:  # checked from the header, before any pixel is decoded
                raise _bomb(name, (width, height), max_pixels, None)
            try:
                im.load()
                if im.getexif().get(0x0112, 1) != 1:
                    im = ImageOps.exif_transpose(im)
                rgb = to_rgb(im)
                return rgb.copy() if rgb is im else rgb  # `with im` closes im on the way out
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise _bomb(name, (width, height), max_pixels, e) from e
            except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, ValueError, ...
                raise UploadError(f"{name}: the {fmt} data are truncated or corrupt ({type(e).__name__}: {e}). "
                                  "Fix: upload the complete file again, or re-save it in an image editor") from e


def _bomb(name: str, size: tuple[int, int] | None, max_pixels: int, exc: Exception | None) -> UploadError:
    if size:
        dims = f"{size[0]}×{size[1]} = {size[0] * size[1]:,} pixels"
    else:  # PIL refused it on opening; its message carries the pixel count
        found = re.search(r"\((\d+) pixels\)", str(exc))
        dims = f"{int(found.group(1)):,} pixels" if found else f"too many pixels ({exc})"
    return UploadError(f"{name}: the image declares {dims}, more than the {max_pixels:,} allowed "
                       "(a file this small with that many pixels may be a decompression bomb). "
                       "Fix: upload an image of at most a few thousand pixels per side")
