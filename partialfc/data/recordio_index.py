"""The ``.idx`` of a RecordIO file: parse it fast and cache it as a memory-mapped ``.npy``.

An ``.idx`` is text, one ``key<TAB>offset`` line per record. A 42 M-line index (WebFace42M)
takes half a minute to parse even with the vectorized numpy below (27-38 s on a loaded
2-core VM, ``benchmarks/results/loader.md``), on every rank and every run. So where the
directory is writable the parsed (keys, offsets) are written once as ``<idx>.npy`` and
memory-mapped on later runs: under a millisecond, and the pages are shared between the
ranks and loader workers of one machine instead of each holding a 0.66 GB private copy.
The cache's row 0 holds the ``.idx`` size and mtime, so a rewritten index is re-parsed.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np

from partialfc.atomic_io import atomic_output_path


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
            with atomic_output_path(cache) as temp_path, open(temp_path, "wb") as handle:
                np.save(handle, table)
        except OSError:
            pass
    return keys, offsets
