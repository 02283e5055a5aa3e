"""Build a verification ``.bin`` from an aligned image folder and an LFW-style pairs list.

So users can evaluate on their own identities the same way as on LFW. The pairs file
follows LFW's ``pairs.txt``: an optional header line (``folds pairs_per_fold``), then
one pair per line, either

    name  n1  n2           same identity: images n1 and n2 of ``name``
    name1 n1  name2 n2     different identities

Image ``n`` of ``name`` is ``IMAGE_DIR/name/name_{n:04d}.EXT`` (the LFW naming).
Images are expected aligned (112 x 112 crops); their encoded bytes are stored as
they are when PIL can read them as JPEG or PNG, otherwise re-encoded as JPEG.

CLI::

    python -m partialfc.eval.make_bin IMAGE_DIR PAIRS.txt OUT.bin [--ext jpg]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from partialfc.eval.bin_format import write_bin

__all__ = ["parse_pairs", "build_bin", "main"]

Pair = Tuple[str, int, str, int]
KEPT_FORMATS = ("JPEG", "PNG")


def _parse_index(token: str, pairs_path: str, line_number: int) -> int:
    try:
        value = int(token)
    except ValueError:
        raise ValueError(
            f"{pairs_path}:{line_number}: image number must be an int, got {token!r}"
        ) from None
    if value < 0:
        raise ValueError(f"{pairs_path}:{line_number}: image number must be >= 0, got {value}")
    return value


def parse_pairs(pairs_path: str) -> List[Pair]:
    """Pairs as ``(name1, n1, name2, n2)``; same-identity lines have ``name1 == name2``."""
    pairs: List[Pair] = []
    with open(pairs_path, "r", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for line_number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        if line_number == 1 and len(tokens) <= 2 and all(token.isdigit() for token in tokens):
            continue  # LFW header: number of folds and pairs per fold
        if len(tokens) == 3:
            name, first, second = tokens
            pairs.append((name, _parse_index(first, pairs_path, line_number), name,
                          _parse_index(second, pairs_path, line_number)))
        elif len(tokens) == 4:
            name1, first, name2, second = tokens
            pairs.append((name1, _parse_index(first, pairs_path, line_number), name2,
                          _parse_index(second, pairs_path, line_number)))
        else:
            raise ValueError(
                f"{pairs_path}:{line_number}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {line!r}"
            )
    if not pairs:
        raise ValueError(f"{pairs_path}: no pairs found")
    return pairs


def _image_path(image_dir: str, name: str, number: int, ext: str) -> str:
    return os.path.join(image_dir, name, f"{name}_{number:04d}.{ext}")


def _encoded_image(path: str) -> bytes:
    """The file's bytes when PIL reads them as JPEG/PNG; otherwise a JPEG re-encoding."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ValueError(f"image listed in the pairs file is missing: {path}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in KEPT_FORMATS:
                return data
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
            return buffer.getvalue()
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot decode image ({error})") from error


def build_bin(image_dir: str, pairs_path: str, out_path: str, ext: str = "jpg") -> Tuple[int, int]:
    """Write ``out_path``; returns ``(num_same, num_different)`` pairs."""
    if not os.path.isdir(image_dir):
        raise ValueError(f"image folder not found: {image_dir}")
    ext = ext.lstrip(".")
    pairs = parse_pairs(pairs_path)
    cache: Dict[str, bytes] = {}  # LFW reuses images across pairs
    bins: List[bytes] = []
    issame: List[bool] = []
    for name1, number1, name2, number2 in pairs:
        for name, number in ((name1, number1), (name2, number2)):
            path = _image_path(image_dir, name, number, ext)
            if path not in cache:
                cache[path] = _encoded_image(path)
            bins.append(cache[path])
        issame.append(name1 == name2)
    write_bin(out_path, bins, issame)
    num_same = sum(issame)
    return num_same, len(issame) - num_same


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.eval.make_bin",
        description="Build a verification .bin from aligned images and an LFW-format pairs list.",
    )
    parser.add_argument("image_dir", help="folder per identity: IMAGE_DIR/name/name_0001.jpg")
    parser.add_argument("pairs", help="pairs list in LFW pairs.txt format")
    parser.add_argument("out", help="output .bin path")
    parser.add_argument("--ext", default="jpg", help="image file extension (default jpg)")
    args = parser.parse_args(argv)
    num_same, num_different = build_bin(args.image_dir, args.pairs, args.out, args.ext)
    print(f"wrote {args.out}: {num_same} same and {num_different} different pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
