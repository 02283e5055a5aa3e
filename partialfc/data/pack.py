"""``python -m partialfc.data.pack IMAGE_DIR OUT_PREFIX``: images -> MXNet RecordIO.

Input is one folder per identity (labels ``0 .. N-1`` in sorted folder-name order, as
``ImageFolderSource`` assigns them) or an MXNet ``.lst`` (``index<TAB>label..<TAB>path``
relative to IMAGE_DIR). Output is ``OUT_PREFIX.rec``, ``OUT_PREFIX.idx`` (keys
``0 .. N-1``, plain image records, which both DALI and the native reader take as is)
and ``property`` beside them; missing parent folders of OUT_PREFIX are created.

Already-aligned 112x112 JPEGs are stored byte for byte; anything else is decoded,
resized to 112x112 and re-encoded. Files the training loaders would refuse (not an
image, truncated, larger than ``decode.MAX_IMAGE_PIXELS``) are skipped and listed. Everything is written under temporary names and
renamed at the end (``.idx`` last), so an interrupted pack never leaves files that look
complete.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from multiprocessing import Pool
from typing import List, Optional, Sequence, Tuple

from partialfc.atomic_io import atomic_output_path
from partialfc.data.decode import IMAGE_SIZE, CorruptImageError, checked_image
from partialfc.data.image_folder import list_identity_folders
from partialfc.data.recordio import IRHeader, frame, pack
from partialfc.data.recordio_source import write_property

Item = Tuple[int, Sequence[float], str]  # (key, labels, image path)


class PackError(Exception):
    """Bad input for the packer: printed as a message, exit code 2."""


def read_lst(lst_path: str, image_dir: str) -> List[Item]:
    """Items of an MXNet ``.lst``; paths are relative to ``image_dir``."""
    items = []
    try:
        handle = open(lst_path, encoding="utf-8")
    except OSError as error:
        raise PackError(f"{lst_path}: cannot read list file ({error.strerror})") from None
    with handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            if len(fields) < 3:
                raise PackError(f"{lst_path}: line {line_number}: expected "
                                f"'index<TAB>label<TAB>path', got {line.strip()!r}")
            try:
                key = int(fields[0])
                labels = [float(value) for value in fields[1:-1]]
            except ValueError:
                raise PackError(f"{lst_path}: line {line_number}: index and labels must be "
                                f"numbers, got {line.strip()!r}") from None
            items.append((key, labels, os.path.join(image_dir, fields[-1])))
    return items


def _stored_bytes(image, data: bytes, quality: int) -> bytes:
    """``data`` itself for an aligned 112x112 RGB JPEG, else a re-encoded 112x112 JPEG."""
    from PIL import Image

    if image.format == "JPEG" and image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB":
        image.load()  # fail here, not in training, on a truncated JPEG
        return data
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_item(args: Tuple[Item, int]) -> Tuple[int, Optional[bytes], str]:
    """(key, framed record or None when the file is not a readable image, message).

    Decoding goes through ``decode.checked_image``: what the loaders would refuse
    (undecodable, over ``MAX_IMAGE_PIXELS``, a format DALI lacks) is skipped here.
    """
    (key, labels, path), quality = args
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return key, None, f"{path}: cannot read ({error.strerror})"
    try:
        data = checked_image(data, path, lambda image: _stored_bytes(image, data, quality))
    except CorruptImageError as error:
        return key, None, str(error)
    label = labels[0] if len(labels) == 1 else list(labels)
    return key, frame(pack(IRHeader(0, label, key, 0), data)), ""


def pack_dataset(image_dir: str, out_prefix: str, workers: int = 1, quality: int = 95,
                 lst_path: Optional[str] = None, progress: bool = True) -> dict:
    """Pack and return counts ``{num_images, num_classes, skipped}``."""
    if not os.path.isdir(image_dir):
        raise PackError(f"{image_dir}: image directory is missing or not a directory")
    if not 1 <= quality <= 100:
        raise PackError(f"--quality must be in [1, 100], got {quality}")
    if workers < 1:
        raise PackError(f"--workers must be >= 1, got {workers}")
    skipped_files = 0
    if lst_path:
        items = read_lst(lst_path, image_dir)
        num_classes = int(max((labels[0] for _, labels, _ in items), default=-1)) + 1
    else:
        identities, paths, labels, skipped_files = list_identity_folders(image_dir)
        items = [(key, [float(label)], path) for key, (path, label) in enumerate(zip(paths, labels))]
        num_classes = len(identities)
    if not items:
        raise PackError(f"{image_dir}: no images to pack")
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise PackError(f"{out_dir}: cannot create the output directory ({error.strerror})") \
            from None

    from tqdm import tqdm

    messages: List[str] = []
    written = 0
    # The .idx is the mark of a complete pack: the .rec and property go in place first.
    with atomic_output_path(out_prefix + ".idx") as idx_tmp:
        with atomic_output_path(out_prefix + ".rec") as rec_tmp:
            with open(rec_tmp, "wb") as rec, open(idx_tmp, "w", encoding="ascii") as idx, \
                    Pool(workers) if workers > 1 else _SerialPool() as pool:
                jobs = pool.imap(encode_item, [(item, quality) for item in items], chunksize=16)
                for key, record, message in tqdm(jobs, total=len(items), disable=not progress,
                                                 desc="pack", unit="img", file=sys.stderr):
                    if record is None:
                        messages.append(message)
                        continue
                    idx.write(f"{key}\t{rec.tell()}\n")
                    rec.write(record)
                    written += 1
            if written == 0:
                raise PackError(f"{image_dir}: none of {len(items)} files is a readable image")
        write_property(out_dir, num_classes)
    return {"num_images": written, "num_classes": num_classes,
            "skipped": skipped_files + len(messages), "unreadable": messages}


class _SerialPool:
    """Pool stand-in for --workers 1 (no processes)."""

    def imap(self, function, iterable, chunksize=1):
        return map(function, iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.data.pack",
        description="Pack a folder per identity (or an MXNet .lst) into MXNet RecordIO: "
                    "OUT_PREFIX.rec, OUT_PREFIX.idx and a property file beside them.")
    parser.add_argument("image_dir", metavar="IMAGE_DIR", help="root with one folder per identity")
    parser.add_argument("out_prefix", metavar="OUT_PREFIX", help="output path without extension")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel encoder processes (default: all cores)")
    parser.add_argument("--quality", type=int, default=95,
                        help="JPEG quality for re-encoded images (default 95)")
    parser.add_argument("--list", dest="lst", metavar="FILE.lst",
                        help="MXNet .lst (index<TAB>label<TAB>path) instead of folder labels")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        counts = pack_dataset(args.image_dir, args.out_prefix, args.workers, args.quality,
                              args.lst, progress=not args.quiet)
    except PackError as error:
        print(f"pack: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pack: interrupted; no output written", file=sys.stderr)
        return 130
    for message in counts["unreadable"][:10]:
        print(f"pack: skipped {message}", file=sys.stderr)
    print(f"packed {counts['num_images']} images of {counts['num_classes']} identities into "
          f"{args.out_prefix}.rec/.idx; skipped {counts['skipped']} non-image files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
