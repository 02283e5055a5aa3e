"""Stored image bytes -> a face crop, with the checks every decoder of untrusted bytes needs.

Every path that decodes a record or an image file (the torch loader, the DALI
pre-check, ``inspect --decode``, cleaning's embedding pass, ``pack``) goes through
``checked_image``, so one rule decides what is a decodable image:

- the payload must be an image in a format DALI decodes as well (``IMAGE_FORMATS``);
  anything else (text, a GIF) is corrupt for both loaders alike;
- its header may not promise more than ``MAX_IMAGE_PIXELS`` pixels. A 225-megapixel
  PNG of zeros is a few KB on disk and 675 MB once decoded; in a DataLoader worker or
  a DALI thread that is an out-of-memory kill, not an exception. The size is read from
  the header (Pillow opens lazily), so such a file is refused before any pixel is
  decoded;
- the whole entropy-coded body must decode: a JPEG with a valid header and a garbage
  or truncated body is corrupt.

Failures raise ``CorruptImageError`` (a ``ValueError``) naming the record or file.
"""
from __future__ import annotations

import io
import struct
import warnings
from typing import Callable, Tuple

import numpy as np

IMAGE_SIZE = 112

MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest width * height any decoder here accepts (16.8 MP, 50 MB as RGB).

Training crops are 112x112 and unaligned source photos for ``pack`` are a few MP; a
larger header is a broken file or a decompression bomb. Pillow's own guard
(``Image.MAX_IMAGE_PIXELS``, 89 MP warning / 179 MP error) is far too loose for a
loader that runs one decode per worker process."""

IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "PPM", "TIFF", "WEBP", "JPEG2000"})
"""Pillow format names of payloads both loaders decode (DALI's decoder has no GIF etc.)."""

# What Pillow raises on malformed input (its fuzzing harness treats these as expected);
# anything else (MemoryError, KeyboardInterrupt) propagates.
_MALFORMED = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError,
              ZeroDivisionError)


class CorruptImageError(ValueError):
    """Bytes that are not a decodable image within the pixel bound; names the record/file."""


def _open_checked(data: bytes, where: str):
    """Pillow image with only the header parsed, format and size already checked."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns (89 MP) or raises (179 MP) on large headers; our bound is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise CorruptImageError(f"{where}: image exceeds the {MAX_IMAGE_PIXELS}-pixel bound "
                                f"({error})") from None
    except UnidentifiedImageError:
        raise CorruptImageError(f"{where}: cannot decode image (not in any image format)") \
            from None
    except _MALFORMED as error:
        raise CorruptImageError(f"{where}: cannot decode image ({_describe(error)})") from None
    if image.format not in IMAGE_FORMATS:
        image.close()
        raise CorruptImageError(f"{where}: cannot decode image ({image.format} is not one of "
                                f"{', '.join(sorted(IMAGE_FORMATS))})")
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise CorruptImageError(f"{where}: image of {width}x{height} pixels exceeds the "
                                f"{MAX_IMAGE_PIXELS}-pixel bound (decompression bomb or not a "
                                f"face crop)")
    return image


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def checked_image(data: bytes, where: str, use: Callable):
    """``use(image)`` on the header-checked Pillow image; decoder errors become
    ``CorruptImageError`` naming ``where``."""
    image = _open_checked(data, where)
    try:
        with image:
            return use(image)
    except _MALFORMED as error:
        raise CorruptImageError(f"{where}: cannot decode image ({_describe(error)})") from None


def decode_rgb(data: bytes, where: str, size: Tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
    """Image bytes -> RGB uint8 ``(height, width, 3)`` for ``size = (width, height)``;
    other sizes are resized bilinearly."""
    from PIL import Image

    def to_rgb(image) -> np.ndarray:
        image = image.convert("RGB")
        if image.size != tuple(size):
            image = image.resize(tuple(size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    return checked_image(data, where, to_rgb)


def decode_face(data: bytes, where: str) -> np.ndarray:
    """Image bytes -> RGB uint8 (112, 112, 3); other sizes are resized bilinearly."""
    return decode_rgb(data, where)


def _load_reduced(image) -> None:
    # JPEG: libjpeg's 1/8-scale decode still entropy-decodes the whole body (so a
    # truncated or garbage body fails exactly as in a full decode) but skips most of
    # the IDCT and colour work: about half the time of ``decode_face``.
    if image.format in ("JPEG", "MPO"):
        image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
    image.load()
    image.convert("RGB")  # what decode_face does next; cheap at this size


def verify_image(data: bytes, where: str) -> None:
    """Raise ``CorruptImageError`` where ``decode_face`` would; return None otherwise."""
    checked_image(data, where, _load_reduced)
