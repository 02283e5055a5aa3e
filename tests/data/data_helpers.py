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
