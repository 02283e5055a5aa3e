"""Native MXNet RecordIO: read and write ``.rec`` / ``.idx`` without importing mxnet.

Face-recognition training sets (MS1MV3, Glint360K, WebFace42M) ship in this format,
and mxnet is no longer installable on current Python / CUDA stacks. The byte layout
(DESIGN.md section 5) is reproduced exactly, including the writer's trick of cutting a
payload wherever the magic word appears at a 4-byte aligned position (continuation
records), so files written here are read by MXNet and DALI and vice versa.

The index must scale to 42 M records: it is parsed from the raw bytes with vectorized
numpy (no per-line Python) and, where the directory is writable, cached as a ``.npy``
next to the ``.idx`` that is memory-mapped on later runs. Record bytes are read through
``mmap`` so random access costs no Python-side buffering.
"""
from __future__ import annotations

import mmap
import numbers
import os
import struct
import tempfile
from collections import namedtuple
from typing import Optional, Sequence, Tuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
"""Image record header: ``flag`` > 0 means ``flag`` float32 labels follow the header."""


class CorruptRecordError(ValueError):
    """A record that cannot be read; the message names the file, key and offset."""


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


def read_framed(buffer, offset: int, where: str) -> Tuple[bytes, int]:
    """Read the record at ``offset`` of ``buffer``; return (payload, end offset).

    ``where`` names the file and record for the error message.
    """
    size = len(buffer)
    chunks = []
    while True:
        if offset + 8 > size:
            raise CorruptRecordError(f"{where}: truncated record header at byte {offset} "
                                     f"(file has {size} bytes)")
        magic, lrecord = struct.unpack_from("<II", buffer, offset)
        if magic != MAGIC:
            raise CorruptRecordError(f"{where}: bad magic 0x{magic:08x} at byte {offset}")
        flag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        # A record is flag 0 alone, or 1, (2)*, 3; anything else is a broken chain.
        if flag > 3 or (not chunks and flag in (2, 3)) or (chunks and flag in (0, 1)):
            raise CorruptRecordError(f"{where}: unexpected continuation flag {flag} "
                                     f"at byte {offset}")
        start = offset + 8
        if start + length > size:
            raise CorruptRecordError(f"{where}: length {length} at byte {offset} runs past "
                                     f"the end of the file ({size} bytes)")
        chunks.append(buffer[start:start + length])
        offset = start + ((length + 3) & ~3)
        if flag in (0, 3):
            return _MAGIC_BYTES.join(chunks), offset


# ---------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------
def _parse_int_fields(data: np.ndarray, starts: np.ndarray, ends: np.ndarray, path: str,
                      line_numbers: np.ndarray) -> np.ndarray:
    """Vectorized base-10 parse of ``data[starts[i]:ends[i]]`` for every i.

    Every field is read right-aligned into one (N, width) digit matrix with a single
    gather (positions before the field's start read as '0'), then reduced with powers
    of ten: no per-line Python and no per-digit passes.
    """
    lengths = ends - starts
    if lengths.size and (lengths.min() < 1 or lengths.max() > 18):
        bad = int(np.flatnonzero((lengths < 1) | (lengths > 18))[0])
        raise ValueError(f"{path}: line {line_numbers[bad]}: field of {int(lengths[bad])} "
                         f"characters is not an index or offset")
    if not lengths.size:
        return np.zeros(0, np.int64)
    width = int(lengths.max())
    positions = ends[:, None] - width + np.arange(width)
    digits = data[np.maximum(positions, 0)]
    digits[positions < starts[:, None]] = 48
    digits -= 48  # uint8: anything that was not '0'..'9' is now > 9
    wrong = (digits > 9).any(axis=1)
    if wrong.any():
        raise ValueError(f"{path}: line {line_numbers[np.argmax(wrong)]}: not an integer")
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return digits.astype(np.int64) @ powers


_PARSE_CHUNK = 1 << 23  # bytes of index text parsed at a time: bounds the temporaries


def parse_idx_bytes(raw, path: str = "<idx>") -> Tuple[np.ndarray, np.ndarray]:
    """Parse ``key\toffset`` lines (bytes or a uint8 array) into int64 (keys, offsets).

    Works through the text in chunks cut at newlines, so the temporaries stay small
    whatever the size of the index. Each chunk takes numpy's C text reader when its
    bytes are only digits and whitespace with two numbers per line; anything else goes
    through a vectorized parser that names the offending line.
    """
    data = np.frombuffer(raw, np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    # Pass 1: chunk boundaries at newlines and an upper bound on the line count, so the
    # results are written in place instead of concatenated (which would double the peak).
    bounds, capacity, start = [], 0, 0
    while start < data.size:
        end = min(start + _PARSE_CHUNK, data.size)
        piece = bytes(data[start:end])
        if end < data.size:
            cut = piece.rfind(b"\n")
            if cut >= 0:
                end, piece = start + cut + 1, piece[:cut + 1]
            else:
                end = data.size
                piece = bytes(data[start:end])
        bounds.append((start, end))
        capacity += piece.count(b"\n") + 1
        start = end
    keys, offsets = np.empty(capacity, np.int64), np.empty(capacity, np.int64)
    filled, line_number = 0, 0
    for start, end in bounds:
        chunk = np.array(data[start:end])
        fast = _parse_idx_chunk_fast(chunk)
        chunk_keys, chunk_offsets, lines = fast if fast is not None else \
            _parse_idx_chunk(chunk, path, line_number)
        keys[filled:filled + chunk_keys.size] = chunk_keys
        offsets[filled:filled + chunk_keys.size] = chunk_offsets
        filled, line_number = filled + chunk_keys.size, line_number + lines
    if filled < capacity // 2:  # many blank lines: do not keep the slack
        return keys[:filled].copy(), offsets[:filled].copy()
    return keys[:filled], offsets[:filled]


def _parse_idx_chunk_fast(chunk: np.ndarray):
    """(keys, offsets, lines) via np.fromstring, or None when the chunk is not plain."""
    digit = (chunk >= 48) & (chunk <= 57)
    space = (chunk == 9) | (chunk == 10) | (chunk == 13) | (chunk == 32)
    if not (digit | space).all():
        return None
    newlines = np.flatnonzero(chunk == 10)
    lines = int(newlines.size) + int(chunk.size > 0 and chunk[-1] != 10)
    # Exactly two numbers on every line (no blank lines), else the slow path judges.
    token_starts = np.flatnonzero(digit[1:] & ~digit[:-1]) + 1
    if chunk.size and digit[0]:
        token_starts = np.concatenate([[0], token_starts])
    line_of_byte = np.cumsum(chunk == 10, dtype=np.int32)
    per_line = np.bincount(line_of_byte[token_starts], minlength=lines)
    if per_line.size != lines or (per_line != 2).any():
        return None
    # Whitespace in ``sep`` matches any run of whitespace, tabs and newlines included.
    values = np.fromstring(chunk.tobytes(), dtype=np.int64, sep=" ")
    if values.size != 2 * lines:
        return None
    pairs = values.reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy(), lines


def _parse_idx_chunk(data: np.ndarray, path: str, first_line: int):
    """(keys, offsets, number of lines) of a chunk of whole lines; errors name the line."""
    if data.size and data[-1] != 10:
        data = np.concatenate([data, np.array([10], np.uint8)])
    data[data == 13] = 32  # tolerate CRLF: CR becomes trailing space
    newlines = np.flatnonzero(data == 10)
    line_starts = np.concatenate([[0], newlines[:-1] + 1]).astype(np.int64)
    line_numbers = np.arange(first_line + 1, first_line + 1 + newlines.size)
    keep = newlines > line_starts  # blank lines are ignored
    line_starts, newlines, line_numbers = line_starts[keep], newlines[keep], line_numbers[keep]
    separators = np.flatnonzero((data == 9) | (data == 32))
    # The separator of a line is the first tab/space after its start.
    first_sep = np.searchsorted(separators, line_starts)
    tabs = separators[np.minimum(first_sep, max(separators.size - 1, 0))] if separators.size \
        else np.full(line_starts.size, -1)
    broken = (first_sep >= separators.size) | (tabs >= newlines) | (tabs <= line_starts)
    if broken.any():
        raise ValueError(f"{path}: line {line_numbers[np.argmax(broken)]}: "
                         f"expected 'key<TAB>offset'")
    value_ends = newlines.copy()
    while True:  # strip trailing spaces
        trailing = (data[value_ends - 1] == 32) & (value_ends - 1 > tabs)
        if not trailing.any():
            break
        value_ends[trailing] -= 1
    keys = _parse_int_fields(data, line_starts, tabs, path, line_numbers)
    offsets = _parse_int_fields(data, tabs + 1, value_ends, path, line_numbers)
    return keys, offsets, int(np.count_nonzero(data == 10))


def _cache_path(idx_path: str) -> str:
    return idx_path + ".npy"


def load_index(idx_path: str, use_cache: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of an ``.idx``; uses or writes a fresh memory-mapped ``.npy`` cache.

    Cache row 0 holds the ``.idx`` size and mtime, so any rewrite of the index
    invalidates it. An unwritable directory just means no cache.
    """
    try:
        stat = os.stat(idx_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{idx_path}: index file is missing") from None
    cache = _cache_path(idx_path)
    if use_cache and os.path.exists(cache):
        try:
            table = np.load(cache, mmap_mode="r")
            if table.ndim == 2 and table.shape[1] == 2 and \
                    int(table[0, 0]) == stat.st_size and int(table[0, 1]) == stat.st_mtime_ns:
                return table[1:, 0], table[1:, 1]
        except (ValueError, OSError):
            pass  # a stale or broken cache is rebuilt below
    if stat.st_size == 0:
        keys = offsets = np.zeros(0, np.int64)
    else:
        text = np.memmap(idx_path, np.uint8, mode="r")
        keys, offsets = parse_idx_bytes(text, idx_path)
        del text
    if use_cache and os.access(os.path.dirname(os.path.abspath(idx_path)), os.W_OK):
        table = np.empty((keys.size + 1, 2), np.int64)
        table[0] = (stat.st_size, stat.st_mtime_ns)
        table[1:, 0], table[1:, 1] = keys, offsets
        try:
            atomic_write(cache, lambda handle: np.save(handle, table))
        except OSError:
            pass
    return keys, offsets


def atomic_write(path: str, write) -> None:
    """Call ``write(binary_file)`` on a temp file in the same dir, then os.replace it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
            raise FileNotFoundError(f"{rec_path}: record file is missing")
        self.keys, self.offsets = load_index(idx_path, use_cache)
        self._file = open(rec_path, "rb")
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
            raise KeyError(f"{self.idx_path}: no record with key {key}")
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
