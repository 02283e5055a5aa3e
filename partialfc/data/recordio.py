"""Native MXNet RecordIO: read and write ``.rec`` / ``.idx`` without importing mxnet.

Face-recognition training sets (MS1MV3, Glint360K, WebFace42M) ship in this format,
and mxnet is no longer installable on current Python / CUDA stacks. The byte layout
(DESIGN.md section 5) is reproduced exactly, including the writer's trick of cutting a
payload wherever the magic word appears at a 4-byte aligned position (continuation
records), so files written here are read by MXNet and DALI and vice versa.

The ``.idx`` is parsed and cached by ``recordio_index`` (``load_index`` is importable
from here too). Record bytes are read through ``mmap`` so random access costs no
Python-side buffering.
"""
from __future__ import annotations

import mmap
import numbers
import os
import struct
from collections import namedtuple
from typing import List, Optional, Sequence, Tuple

import numpy as np

from partialfc.data.recordio_index import load_index

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
"""Image record header: ``flag`` > 0 means ``flag`` float32 labels follow the header."""


class CorruptRecordError(ValueError):
    """A record that cannot be read; the message names the file, key and offset."""


class MissingRecordError(CorruptRecordError, KeyError):
    """A key the index does not list (a ``KeyError`` too, for lookups by key)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataFileError(ValueError):
    """A data set file that is missing or unreadable; the message names it and the fix.

    A ``ValueError`` so every command line prints it as one line (the trainer turns
    ``ValueError`` into ``error: ...`` and exit 2)."""


class MissingDataFileError(DataFileError, FileNotFoundError):
    """A missing ``.rec`` / ``.idx`` (also a ``FileNotFoundError`` for callers catching that)."""


def missing_index_error(idx_path: str, rec_path: str) -> MissingDataFileError:
    prefix = rec_path[:-4] if rec_path.endswith(".rec") else rec_path
    return MissingDataFileError(
        f"{idx_path} is missing (expected next to {rec_path}); rebuild it with: "
        f"python -m partialfc.data.reindex {prefix}")


def missing_record_file_error(rec_path: str) -> MissingDataFileError:
    return MissingDataFileError(f"{rec_path}: record file is missing")


# ---------------------------------------------------------------------------
# Payload <-> IRHeader (mxnet.recordio.pack / unpack / pack_img / unpack_img)
# ---------------------------------------------------------------------------
def pack(header: Sequence, payload: bytes) -> bytes:
    """Prefix ``payload`` with an IRHeader; a non-scalar label becomes multi-float."""
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
        prefix = b""
    else:
        labels = np.asarray(header.label, dtype=np.float32).ravel()
        header = header._replace(flag=labels.size, label=0.0)
        prefix = labels.tobytes()
    return struct.pack(_IR_FORMAT, *header) + prefix + bytes(payload)


def unpack(record: bytes) -> Tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader and the bytes after the labels."""
    if len(record) < _IR_SIZE:
        raise ValueError(f"record payload of {len(record)} bytes is shorter than the "
                         f"{_IR_SIZE}-byte IRHeader")
    header = IRHeader(*struct.unpack_from(_IR_FORMAT, record, 0))
    body = record[_IR_SIZE:]
    if header.flag > 0:
        if len(body) < 4 * header.flag:
            raise ValueError(f"record declares {header.flag} labels but holds {len(body)} bytes")
        labels = np.frombuffer(body, np.float32, header.flag).copy()
        header = header._replace(label=labels)
        body = body[4 * header.flag:]
    return header, body


def pack_img(header: Sequence, image: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode an RGB ``uint8`` HxWx3 array and pack it (MXNet's takes BGR from cv2)."""
    import io

    from PIL import Image

    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(img_fmt.lower())
    if fmt is None:
        raise ValueError(f"img_fmt {img_fmt!r} is not one of .jpg, .jpeg, .png")
    buffer = io.BytesIO()
    kwargs = {"quality": int(quality)} if fmt == "JPEG" else {}
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format=fmt, **kwargs)
    return pack(header, buffer.getvalue())


def unpack_img(record: bytes) -> Tuple[IRHeader, np.ndarray]:
    """Unpack and decode to an RGB ``uint8`` HxWx3 array."""
    import io

    from PIL import Image

    header, body = unpack(record)
    with Image.open(io.BytesIO(body)) as image:
        return header, np.asarray(image.convert("RGB"))


def label_of(header: IRHeader) -> float:
    """The identity label: ``label`` or, for multi-float labels, ``label[0]``."""
    return float(header.label[0]) if header.flag > 0 else float(header.label)


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------
def frame(payload: bytes) -> bytes:
    """The on-disk bytes of one record, split at aligned magic words like dmlc's writer."""
    payload = bytes(payload)
    if len(payload) >= 1 << 29:
        raise ValueError(f"record of {len(payload)} bytes exceeds the 2**29 RecordIO limit")
    parts = []
    start = 0
    # The reader re-inserts the magic word between parts, so each aligned occurrence is
    # dropped from the data and ends a part (flag 1 = first, 2 = middle, 3 = last).
    position = payload.find(_MAGIC_BYTES)
    while position != -1:
        if position % 4 == 0:
            parts.append((1 if start == 0 else 2, payload[start:position]))
            start = position + 4
            position = payload.find(_MAGIC_BYTES, start)
        else:
            position = payload.find(_MAGIC_BYTES, position + 1)
    parts.append((3 if start else 0, payload[start:]))
    out = bytearray()
    for flag, chunk in parts:
        out += struct.pack("<II", MAGIC, (flag << 29) | len(chunk))
        out += chunk
    out += b"\0" * (-len(payload) % 4)
    return bytes(out)


def framed_parts(buffer, offset: int, where: str) -> Tuple[List[Tuple[int, int]], int]:
    """(start, length) of every part of the record at ``offset``, and its end offset.

    Validates the chain without copying payload bytes; ``where`` names the file and
    record for the error message.
    """
    size = len(buffer)
    parts: List[Tuple[int, int]] = []
    while True:
        if offset + 8 > size:
            raise CorruptRecordError(f"{where}: truncated record header at byte {offset} "
                                     f"(file has {size} bytes)")
        magic, lrecord = struct.unpack_from("<II", buffer, offset)
        if magic != MAGIC:
            raise CorruptRecordError(f"{where}: bad magic 0x{magic:08x} at byte {offset}")
        flag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        # A record is flag 0 alone, or 1, (2)*, 3; anything else is a broken chain.
        if flag > 3 or (not parts and flag in (2, 3)) or (parts and flag in (0, 1)):
            raise CorruptRecordError(f"{where}: unexpected continuation flag {flag} "
                                     f"at byte {offset}")
        start = offset + 8
        if start + length > size:
            raise CorruptRecordError(f"{where}: length {length} at byte {offset} runs past "
                                     f"the end of the file ({size} bytes)")
        parts.append((start, length))
        offset = start + ((length + 3) & ~3)
        if flag in (0, 3):
            return parts, offset


def read_framed(buffer, offset: int, where: str) -> Tuple[bytes, int]:
    """Read the record at ``offset`` of ``buffer``; return (payload, end offset)."""
    parts, end = framed_parts(buffer, offset, where)
    return _MAGIC_BYTES.join(buffer[start:start + length] for start, length in parts), end


def broken_framing(rec_path: str, offsets: np.ndarray) -> np.ndarray:
    """Bool mask of offsets whose first record header is unreadable (vectorized).

    Checks magic, the continuation flag and that the length stays inside the file, for
    millions of records in seconds; it does not read payloads (``read_framed`` does).
    """
    size = os.path.getsize(rec_path)
    offsets = np.asarray(offsets, np.int64)
    broken = (offsets < 0) | (offsets + 8 > size)
    if size < 8:
        return broken
    data = np.memmap(rec_path, np.uint8, mode="r")
    for start in range(0, offsets.size, 1 << 20):  # 1 M records at a time: small temporaries
        ok = np.flatnonzero(~broken[start:start + (1 << 20)]) + start
        heads = np.ascontiguousarray(data[offsets[ok, None] + np.arange(8)]).view("<u4")
        flag, length = heads[:, 1] >> 29, heads[:, 1] & _LENGTH_MASK
        bad = (heads[:, 0] != MAGIC) | (flag > 1) | \
            (offsets[ok] + 8 + length.astype(np.int64) > size)
        broken[ok[bad]] = True
    del data
    return broken


# ---------------------------------------------------------------------------
# Reader / writer
# ---------------------------------------------------------------------------
class IndexedRecordReader:
    """Random access to records by key (MXIndexedRecordIO in read mode).

    ``keys`` / ``offsets`` are numpy arrays in ``.idx`` order; ``read_idx(key)``
    returns the joined payload and ``read_at(position)`` the one at an index position.
    """

    def __init__(self, idx_path: str, rec_path: str, use_cache: bool = True):
        self.idx_path, self.rec_path = idx_path, rec_path
        if not os.path.exists(rec_path):
            raise missing_record_file_error(rec_path)
        if not os.path.exists(idx_path):
            raise missing_index_error(idx_path, rec_path)
        try:
            self.keys, self.offsets = load_index(idx_path, use_cache)
            self._file = open(rec_path, "rb")
        except (PermissionError, IsADirectoryError) as error:
            raise DataFileError(f"{error.filename}: cannot read ({error.strerror})") from None
        size = os.fstat(self._file.fileno()).st_size
        self._buffer = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._contiguous = bool(self.keys.size == 0 or (
            self.keys[-1] - self.keys[0] == self.keys.size - 1 and
            np.array_equal(self.keys, np.arange(self.keys[0], self.keys[0] + self.keys.size))))
        self._sorted_order: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.keys.size)

    def position_of(self, key: int) -> int:
        """Index position of ``key``; KeyError naming the file when absent."""
        if self._contiguous:
            position = int(key) - int(self.keys[0]) if self.keys.size else -1
        else:
            if self._sorted_order is None:
                self._sorted_order = np.argsort(self.keys, kind="stable")
            found = int(np.searchsorted(self.keys, key, sorter=self._sorted_order))
            position = int(self._sorted_order[found]) if found < self.keys.size else -1
        if position < 0 or position >= self.keys.size or int(self.keys[position]) != int(key):
            raise MissingRecordError(f"{self.idx_path}: no record with key {key}")
        return position

    def read_at(self, position: int) -> bytes:
        key, offset = int(self.keys[position]), int(self.offsets[position])
        return read_framed(self._buffer, offset, f"{self.rec_path}: record {key}")[0]

    def read_idx(self, key: int) -> bytes:
        return self.read_at(self.position_of(key))

    def read_header(self, key: int) -> IRHeader:
        """Only the IRHeader (and labels) of a record: cheap for label scans."""
        return unpack(self.read_idx(key))[0]

    def close(self) -> None:
        if isinstance(self._buffer, mmap.mmap):
            self._buffer.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # picklable for DataLoader workers: reopen lazily
        return {"idx_path": self.idx_path, "rec_path": self.rec_path}

    def __setstate__(self, state):
        self.__init__(state["idx_path"], state["rec_path"])


class IndexedRecordWriter:
    """Append records and their ``key\\toffset`` lines (MXIndexedRecordIO in write mode)."""

    def __init__(self, idx_path: str, rec_path: str):
        self.idx_path, self.rec_path = idx_path, rec_path
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w", encoding="ascii", newline="\n")

    def write_idx(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{int(key)}\t{self._rec.tell()}\n")
        self._rec.write(frame(payload))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
