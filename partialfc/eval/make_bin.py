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

from partialfc.data.decode import checked_image
from partialfc.eval.bin_format import write_bin
from partialfc.eval.cli_errors import run_cli

__all__ = ["parse_pairs", "parse_pair_lines", "build_bin", "main"]

Pair = Tuple[str, int, str, int]
KEPT_FORMATS = ("JPEG", "PNG")
PAIR_FORMATS = "'name n1 n2' (same identity) or 'name1 n1 name2 n2' (different identities)"
LFW_NAMING = "IMAGE_DIR/NAME/NAME_NNNN.EXT, e.g. Aaron_Peirsol/Aaron_Peirsol_0001.jpg"


def _parse_index(token: str, pairs_path: str, line_number: int) -> int:
    try:
        value = int(token)
    except ValueError:
        raise ValueError(
            f"{pairs_path}:{line_number}: image number must be an int, got {token!r}; "
            f"expected {PAIR_FORMATS}, names without spaces"
        ) from None
    if value < 0:
        raise ValueError(f"{pairs_path}:{line_number}: image number must be >= 0, got {value}")
    return value


def _check_name(name: str, pairs_path: str, line_number: int) -> str:
    # The name becomes a folder and a file name prefix: it must not walk out of IMAGE_DIR.
    if name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{pairs_path}:{line_number}: identity name {name!r} is not a folder name; "
                         f"expected {PAIR_FORMATS}")
    return name


def _read_lines(pairs_path: str) -> List[str]:
    try:
        with open(pairs_path, "r", encoding="utf-8") as handle:
            return handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{pairs_path}: not a UTF-8 text pairs list "
                         f"({error.reason} at byte {error.start})") from None


def parse_pair_lines(pairs_path: str) -> List[Tuple[int, Pair]]:
    """``(line number, (name1, n1, name2, n2))`` per pair line of an LFW ``pairs.txt``."""
    pairs: List[Tuple[int, Pair]] = []
    for line_number, line in enumerate(_read_lines(pairs_path), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if line_number == 1 and len(tokens) <= 2 and all(token.isdigit() for token in tokens):
            continue  # LFW header: number of folds and pairs per fold
        if len(tokens) == 3:
            name, first, second = tokens
            name = _check_name(name, pairs_path, line_number)
            pair = (name, _parse_index(first, pairs_path, line_number), name,
                    _parse_index(second, pairs_path, line_number))
        elif len(tokens) == 4:
            name1, first, name2, second = tokens
            pair = (_check_name(name1, pairs_path, line_number), _parse_index(first, pairs_path, line_number),
                    _check_name(name2, pairs_path, line_number), _parse_index(second, pairs_path, line_number))
        else:
            raise ValueError(f"{pairs_path}:{line_number}: expected {PAIR_FORMATS}, got {line.strip()!r:.120}")
        pairs.append((line_number, pair))
    if not pairs:
        raise ValueError(f"{pairs_path}: no pairs found; expected one pair per line, {PAIR_FORMATS}")
    return pairs


def parse_pairs(pairs_path: str) -> List[Pair]:
    """Pairs as ``(name1, n1, name2, n2)``; same-identity lines have ``name1 == name2``."""
    return [pair for _, pair in parse_pair_lines(pairs_path)]


def _image_path(image_dir: str, name: str, number: int, ext: str) -> str:
    return os.path.join(image_dir, name, f"{name}_{number:04d}.{ext}")


def _missing_image_error(image_dir: str, name: str, path: str, where: str) -> ValueError:
    """Name the pairs line, the file looked for and the naming rule; show what the folder holds."""
    folder = os.path.join(image_dir, name)
    if not os.path.isdir(folder):
        seen = f"there is no folder {folder}"
    elif not os.listdir(folder):
        seen = f"{folder} is empty"
    else:
        found = sorted(os.listdir(folder))
        seen = f"{folder} holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}"
    return ValueError(f"{where}: image listed in the pairs file is missing: {path} ({seen}); "
                      f"images must follow the LFW naming {LFW_NAMING} (--ext sets EXT)")


def _encoded_image(path: str) -> bytes:
    """The file's bytes when they are JPEG/PNG; otherwise a JPEG re-encoding.

    Decoded through the training loaders' checks (``partialfc.data.decode``): formats
    and pixel bound, so what goes into the ``.bin`` is what evaluation can decode.
    """
    with open(path, "rb") as handle:
        data = handle.read()

    def keep_or_reencode(image) -> bytes:
        image.load()
        if image.format in KEPT_FORMATS:
            return data
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    return checked_image(data, path, keep_or_reencode)


def build_bin(image_dir: str, pairs_path: str, out_path: str, ext: str = "jpg") -> Tuple[int, int]:
    """Write ``out_path``; returns ``(num_same, num_different)`` pairs."""
    if not os.path.isdir(image_dir):
        raise ValueError(f"image folder not found: {image_dir}")
    out_folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_folder):  # before reading every image, not after
        raise ValueError(f"cannot write {out_path}: output folder does not exist: {out_folder}")
    ext = ext.lstrip(".")
    pairs = parse_pair_lines(pairs_path)
    cache: Dict[str, bytes] = {}  # LFW reuses images across pairs
    bins: List[bytes] = []
    issame: List[bool] = []
    for line_number, (name1, number1, name2, number2) in pairs:
        for name, number in ((name1, number1), (name2, number2)):
            path = _image_path(image_dir, name, number, ext)
            if path not in cache:
                if not os.path.isfile(path):
                    raise _missing_image_error(image_dir, name, path, f"{pairs_path}:{line_number}")
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

    def run() -> int:
        num_same, num_different = build_bin(args.image_dir, args.pairs, args.out, args.ext)
        print(f"wrote {args.out}: {num_same} same and {num_different} different pairs")
        return 0

    return run_cli("make_bin", run)


if __name__ == "__main__":
    sys.exit(main())
