"""Helpers for the data tests: tiny face images and an independent RecordIO writer.

The writer here is deliberately not the project's: it builds MXNet's layout by hand
from the format description (magic, length word, payload, zero pad; IRHeader
``<IfQQ``), so a reader bug cannot be hidden by a matching writer bug.
"""
import io
import struct

import numpy as np
from PIL import Image

MAGIC_WORD = 0xCED7230A


def smooth_face(rng, size=112):
    """A smooth random RGB image (upsampled noise): JPEG-friendly, decoders agree."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def jpeg_bytes(array, quality=90):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def ir_payload(label, image_bytes, record_id=0, flag_labels=None):
    """IRHeader + optional float labels + image, written by hand."""
    if flag_labels is None:
        head = struct.pack("<IfQQ", 0, float(label), record_id, 0)
        return head + image_bytes
    labels = np.asarray(flag_labels, "<f4")
    return struct.pack("<IfQQ", labels.size, 0.0, record_id, 0) + labels.tobytes() + image_bytes


def simple_frame(payload):
    """One-part record; the caller guarantees no aligned magic word in the payload."""
    words = np.frombuffer(payload[: len(payload) // 4 * 4], "<u4")
    assert not (words == MAGIC_WORD).any(), "use a multi-part record for this payload"
    pad = (4 - len(payload) % 4) % 4
    return struct.pack("<II", MAGIC_WORD, len(payload)) + payload + b"\x00" * pad


def write_rec(prefix, records):
    """records: list of (key, framed bytes) -> PREFIX.rec/.idx, offsets counted here."""
    offset = 0
    with open(prefix + ".rec", "wb") as rec, open(prefix + ".idx", "w") as idx:
        for key, framed in records:
            idx.write("%d\t%d\n" % (key, offset))
            rec.write(framed)
            offset += len(framed)


# ---------------------------------------------------------------------------- bad payloads
TEXT_PAYLOAD = b"label,path\n0,faces/0001.jpg\n" * 8  # bytes of no image format


def garbage_body_jpeg(rng):
    """A JPEG whose headers are intact and whose entropy-coded body is random bytes:
    lenient decoders (libjpeg-turbo in DALI) still return an image, Pillow refuses it."""
    data = jpeg_bytes(np.clip(smooth_face(rng) + rng.normal(0, 20, (112, 112, 3)), 0, 255)
                      .astype(np.uint8))
    body = data.index(b"\xff\xda") + 14  # start of scan + its 12-byte header
    noise = rng.integers(0, 256, len(data) - body - 2, dtype=np.uint8).tobytes()
    return data[:body] + noise + b"\xff\xd9"


def truncated_jpeg(rng):
    data = jpeg_bytes(smooth_face(rng))
    return data[: len(data) // 2]


def bomb_png(width=15000, height=15000):
    """A ``width`` x ``height`` 1-bit grey PNG of zeros, written by hand (no pixel buffer is
    ever allocated): 225 megapixels in ~30 KB by default. Never decode it."""
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    row = 1 + (width + 7) // 8  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    zero_rows = b"\x00" * (row * 1000)
    data = b"".join(compressor.compress(zero_rows) for _ in range(height // 1000))
    data += compressor.compress(b"\x00" * (row * (height % 1000))) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))
