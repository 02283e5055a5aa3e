"""``python -m partialfc.data.inspect PREFIX``: what is in a RecordIO set, and what is broken.

Reports ``num_images`` (image records; the insightface header and identity records
excluded), ``num_classes`` (distinct identities), ``histogram`` (images per identity ->
number of identities), ``corrupt`` (record keys that cannot be read: bad magic,
truncated, length past the end, broken header; with ``--decode`` also images that do
not decode or exceed ``decode.MAX_IMAGE_PIXELS``) and ``bad_labels`` (record keys whose
label training refuses: negative, not an integer, or not below the class count that
training takes from ``property`` or the header record). Exit 0 when the set would
train cleanly; 1 when anything is corrupt, a label is refused or there is no image at
all; 2 when the files are missing or unusable. Never a traceback for bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Optional, Sequence

from partialfc.data.decode import decode_face
from partialfc.data.recordio import IndexedRecordReader, label_of, unpack
from partialfc.data.recordio_source import (declared_num_classes, image_key_layout,
                                            label_problem, read_property, split_prefix)

MAX_REASONS = 1000  # reasons listed per kind; the key lists are complete


def inspect_dataset(prefix: str, decode: bool = False) -> dict:
    rec_path, idx_path, directory = split_prefix(prefix)
    prop = read_property(directory)
    with IndexedRecordReader(idx_path, rec_path) as reader:
        keys, header_range = image_key_layout(reader)
        class_bound, bound_source = declared_num_classes(directory, header_range)
        per_identity: Counter = Counter()
        corrupt, reasons, bad_labels, label_reasons = [], [], [], []
        for key in keys:
            key = int(key)
            where = f"{rec_path}: record {key}"
            try:
                header, body = unpack(reader.read_idx(key))
                if decode:
                    decode_face(body, where)
            except (ValueError, KeyError) as error:
                corrupt.append(key)
                if len(reasons) < MAX_REASONS:
                    message = str(error).strip("'\"")
                    reasons.append(message if message.startswith(rec_path) else f"{where}: {message}")
                continue
            label = label_of(header)
            problem = label_problem(label, class_bound, bound_source)
            if problem is not None:
                bad_labels.append(key)
                if len(label_reasons) < MAX_REASONS:
                    label_reasons.append(f"{where}: {problem}")
            per_identity[label] += 1
    histogram = Counter(per_identity.values())
    problems = []
    if not len(keys):
        problems.append(f"{rec_path}: no image records: nothing to train on")
    if corrupt:
        problems.append(f"{len(corrupt)} corrupt records")
    if bad_labels:
        problems.append(f"{len(bad_labels)} records with labels training refuses")
    return {
        "num_images": int(len(keys)),
        "num_classes": len(per_identity),
        "histogram": {str(count): histogram[count] for count in sorted(histogram)},
        "corrupt": corrupt,
        "corrupt_reasons": reasons,
        "bad_labels": bad_labels,
        "bad_label_reasons": label_reasons,
        "num_classes_for_training": class_bound,
        "num_classes_source": bound_source,
        "header_range": list(header_range) if header_range else None,
        "property_num_classes": prop[0] if prop else None,
        "problems": problems,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.data.inspect",
        description="Summarize a RecordIO set (PREFIX.rec/.idx) and list corrupt records and "
                    "labels training refuses. Exit 0 clean, 1 corrupt records, refused labels "
                    "or no image at all, 2 missing or unusable files.")
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
        print(f"labels training refuses: {len(result['bad_labels'])}")
        for reason in result["bad_label_reasons"][:20]:
            print(f"  {reason}")
    for problem in result["problems"]:
        print(f"inspect: problem: {problem}", file=sys.stderr)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
