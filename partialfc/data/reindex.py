"""``python -m partialfc.data.reindex PREFIX``: rebuild a lost ``PREFIX.idx`` from ``PREFIX.rec``.

The ``.idx`` is only a table of record offsets, so it can be recovered by walking the
record headers of the ``.rec`` (magic, length word, continuation flag); payloads are
skipped, not read. Keys are the record numbers in file order, ``0 .. N-1``: MXNet's
``rec2idx`` convention, and what ``pack``, ``clean`` and the insightface sets use (a
face2rec2 header record is record 0). A set packed from an ``.lst`` with other indices
gets renumbered keys; its labels are untouched.

The new index is written atomically; an existing one is kept unless ``--force``.
Exit 0 done, 2 bad input (the message names the file and byte offset).
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
from typing import Iterator, Optional, Sequence

from partialfc.atomic_io import atomic_output_path
from partialfc.data.recordio import DataFileError, framed_parts


def record_offsets(rec_path: str) -> Iterator[int]:
    """Yield the byte offset of every record of ``rec_path`` (headers read, payloads not)."""
    with open(rec_path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            offset, record = 0, 0
            while offset < size:
                end = framed_parts(buffer, offset, f"{rec_path}: record {record}")[1]
                yield offset
                offset, record = end, record + 1


def rebuild_index(prefix: str, force: bool = False) -> int:
    """Write ``PREFIX.idx`` for ``PREFIX.rec``; return the number of records."""
    rec_path, idx_path = prefix + ".rec", prefix + ".idx"
    if not os.path.isfile(rec_path):
        raise DataFileError(f"{rec_path}: record file is missing")
    if os.path.exists(idx_path) and not force:
        raise DataFileError(f"{idx_path} already exists; pass --force to replace it")
    count = 0
    with atomic_output_path(idx_path) as temp_path, \
            open(temp_path, "w", encoding="ascii", newline="\n") as handle:
        for count, offset in enumerate(record_offsets(rec_path), 1):
            handle.write(f"{count - 1}\t{offset}\n")
    return count


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.data.reindex",
        description="Rebuild PREFIX.idx from PREFIX.rec (keys 0..N-1 in file order).")
    parser.add_argument("prefix", metavar="PREFIX", help="path without .rec/.idx")
    parser.add_argument("--force", action="store_true", help="replace an existing PREFIX.idx")
    args = parser.parse_args(argv)
    prefix = args.prefix[:-4] if args.prefix.endswith((".rec", ".idx")) else args.prefix
    try:
        count = rebuild_index(prefix, args.force)
    except (ValueError, OSError) as error:
        print(f"reindex: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {prefix}.idx: {count} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
