"""``python -m partialfc.data.inspect PREFIX``: what is in a RecordIO set, and what is broken.

Reports ``num_images`` (image records; the insightface header and identity records
excluded), ``num_classes`` (distinct identities), ``histogram`` (images per identity ->
number of identities) and ``corrupt`` (record keys that cannot be read: bad magic,
truncated, length past the end, broken header; with ``--decode`` also images that do
not decode). Exit 0 when clean, 1 when anything is corrupt, 2 when the files are
missing or unusable. Never a traceback for bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Optional, Sequence

from partialfc.data.augment import decode_face
from partialfc.data.recordio import IndexedRecordReader, label_of, unpack
from partialfc.data.recordio_source import image_key_layout, read_property, split_prefix


def inspect_dataset(prefix: str, decode: bool = False) -> dict:
    rec_path, idx_path, directory = split_prefix(prefix)
    with IndexedRecordReader(idx_path, rec_path) as reader:
        keys, header_range = image_key_layout(reader)
        per_identity: Counter = Counter()
        corrupt, reasons = [], []
        for key in keys:
            key = int(key)
            try:
                header, body = unpack(reader.read_idx(key))
                if decode:
                    decode_face(body, f"{rec_path}: record {key}")
            except (ValueError, KeyError) as error:
                corrupt.append(key)
                reasons.append(str(error).strip("'\""))
                continue
            per_identity[label_of(header)] += 1
    prop = read_property(directory)
    histogram = Counter(per_identity.values())
    return {
        "num_images": int(len(keys)),
        "num_classes": len(per_identity),
        "histogram": {str(count): histogram[count] for count in sorted(histogram)},
        "corrupt": corrupt,
        "corrupt_reasons": reasons,
        "header_range": list(header_range) if header_range else None,
        "property_num_classes": prop[0] if prop else None,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.data.inspect",
        description="Summarize a RecordIO set (PREFIX.rec/.idx) and list corrupt records. "
                    "Exit 0 clean, 1 corrupt records found, 2 missing or unusable files.")
    parser.add_argument("prefix", metavar="PREFIX", help="path without .rec/.idx")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--decode", action="store_true",
                        help="also decode every image (slow) and count failures as corrupt")
    args = parser.parse_args(argv)
    try:
        result = inspect_dataset(args.prefix, args.decode)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"inspect: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"num_images: {result['num_images']}")
        print(f"num_classes: {result['num_classes']}"
              + (f" (property says {result['property_num_classes']})"
                 if result["property_num_classes"] is not None else ""))
        print("images per identity -> identities:")
        for count, identities in result["histogram"].items():
            print(f"  {count:>6}: {identities}")
        print(f"corrupt: {len(result['corrupt'])}")
        for reason in result["corrupt_reasons"][:20]:
            print(f"  {reason}")
    return 1 if result["corrupt"] else 0


if __name__ == "__main__":
    sys.exit(main())
