"""RecordIO training data as a ``BatchSource``: the torch loader and the DALI switch.

Also the insightface dataset layout on top of the raw format: the ``property`` file
and the face2rec2 header record that separates image records from identity records.

``build_recordio_source`` is what ``data.format = recordio`` calls. The torch loader
reads records through the native reader (``recordio.py``) in DataLoader workers and
shares its order, flips and batch assembly with the image-folder source; the DALI
loader (``dali.py``) is selected with ``loader = "dali"``.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import numpy as np

from partialfc.atomic_io import atomic_write_text
from partialfc.data.augment import IndexedSampleSource
from partialfc.data.base import BatchSource
from partialfc.data.recordio import (CorruptRecordError, DataFileError, IndexedRecordReader,
                                     MissingRecordError, label_of, missing_index_error,
                                     missing_record_file_error, unpack)


def read_property(prefix_dir: str) -> Optional[Tuple[int, int, int]]:
    """``(num_classes, height, width)`` from ``<dir>/property``, or None if absent."""
    path = os.path.join(prefix_dir, "property")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read().strip()
    except OSError as error:
        raise DataFileError(f"{path}: cannot read ({error.strerror})") from None
    try:
        values = tuple(int(float(part)) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,112,112', got {text!r}") from None
    if len(values) != 3 or values[0] <= 0:
        raise ValueError(f"{path}: expected 'num_classes,112,112', got {text!r}")
    return values


def write_property(prefix_dir: str, num_classes: int, height: int = 112, width: int = 112) -> None:
    atomic_write_text(os.path.join(prefix_dir, "property"), f"{num_classes},{height},{width}\n")


def image_key_layout(reader: IndexedRecordReader) -> Tuple[np.ndarray, Optional[Tuple[int, int]]]:
    """Keys of image records and the face2rec2 header range ``(A, B)`` if there is one.

    With a header record at key 0 (``flag > 0``, ``label[:2] = (A, B)``) the images are
    keys ``1 .. A-1``; otherwise every key in the index is an image record.
    """
    if len(reader) and int(reader.keys[0]) == 0:
        try:
            header = reader.read_header(0)
        except (CorruptRecordError, ValueError):
            header = None
        if header is not None and header.flag >= 2 and int(header.label[0]) > 0:
            first_non_image, end = int(header.label[0]), int(header.label[1])
            keys = np.arange(1, first_non_image, dtype=np.int64)
            return keys, (first_non_image, end)
    return np.asarray(reader.keys, dtype=np.int64), None


def declared_num_classes(directory: str,
                         header_range: Optional[Tuple[int, int]]) -> Tuple[Optional[int], str]:
    """(class count, where it came from) as training resolves it without an argument:
    ``<directory>/property`` first, then the face2rec2 header's identity range;
    (None, "label scan") when the set declares neither (training then takes the
    largest label + 1)."""
    property_values = read_property(directory)
    if property_values is not None:
        return property_values[0], os.path.join(directory, "property")
    if header_range is not None:
        return header_range[1] - header_range[0], "header record"
    return None, "label scan"


def label_problem(label: float, num_classes: Optional[int], source: str) -> Optional[str]:
    """Why training refuses ``label`` (None when it is fine): the one rule for every tool."""
    if math.isfinite(label) and label == int(label) and label >= 0 and \
            (num_classes is None or label < num_classes):
        return None
    if num_classes is None:
        return f"label {label:g} is not a class id (a non-negative integer)"
    return (f"label {label:g} is outside [0, num_classes={num_classes}) "
            f"(num_classes from {source})")


def split_prefix(prefix: str) -> Tuple[str, str, str]:
    """``PREFIX`` (or ``PREFIX.rec`` / ``PREFIX.idx``) -> (rec path, idx path, directory)."""
    base, ext = os.path.splitext(prefix)
    if ext in (".rec", ".idx"):
        prefix = base
    rec_path, idx_path = prefix + ".rec", prefix + ".idx"
    if not os.path.exists(rec_path):
        raise missing_record_file_error(rec_path)
    if not os.path.exists(idx_path):
        raise missing_index_error(idx_path, rec_path)
    return rec_path, idx_path, os.path.dirname(os.path.abspath(prefix))


class RecordDataset:
    """Image records of one ``.rec/.idx`` pair, the face2rec2 header handled.

    ``num_images`` image records addressed by sample id ``0 .. num_images-1``;
    ``num_classes`` from the argument, else ``property``, else the header's identity
    range, else a scan of every label (small sets only).
    """

    def __init__(self, prefix: str, num_classes: Optional[int] = None):
        self.rec_path, self.idx_path, directory = split_prefix(prefix)
        self.reader = IndexedRecordReader(self.idx_path, self.rec_path)
        keys, self.header_range = image_key_layout(self.reader)
        # With a header the image keys are 1..A-1: keep them as arithmetic, not an array
        # (a 42 M-entry array would be copied into every worker).
        self.num_images = int(keys.size)
        self.first_key = 1 if self.header_range else None
        self.num_classes_source = "argument"
        if num_classes is None:
            num_classes, self.num_classes_source = declared_num_classes(directory,
                                                                        self.header_range)
            if num_classes is None:
                num_classes = self._scan_max_label() + 1
        if num_classes <= 0:
            raise ValueError(f"{self.rec_path}: num_classes must be positive, got {num_classes} "
                             f"(from {self.num_classes_source})")
        self.num_classes = int(num_classes)

    def position(self, sample_id: int) -> int:
        if self.first_key is None:
            return int(sample_id)
        return self.reader.position_of(self.first_key + int(sample_id))

    def image_positions(self) -> np.ndarray:
        """Index positions of every image record in sample order (vectorized: no per-key
        Python for the 5.8 M records of a web-scale set)."""
        if self.first_key is None:
            return np.arange(self.num_images, dtype=np.int64)
        keys = np.asarray(self.reader.keys, np.int64)
        wanted = np.arange(self.first_key, self.first_key + self.num_images, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        found = np.minimum(np.searchsorted(keys, wanted, sorter=order), max(keys.size - 1, 0))
        positions = order[found] if keys.size else np.zeros(0, np.int64)
        missing = keys[positions] != wanted if keys.size else np.ones(wanted.size, bool)
        if missing.any():
            raise MissingRecordError(f"{self.idx_path}: no record with key "
                                     f"{int(wanted[np.argmax(missing)])}")
        return positions

    def key(self, sample_id: int) -> int:
        return int(self.reader.keys[self.position(sample_id)])

    def label_at(self, sample_id: int) -> float:
        return label_of(unpack(self.reader.read_at(self.position(sample_id)))[0])

    def _scan_max_label(self) -> int:
        """Largest label over all readable records (unreadable ones fail later, at use)."""
        largest = -1
        for sample_id in range(self.num_images):
            try:
                largest = max(largest, int(self.label_at(sample_id)))
            except (ValueError, OverflowError):  # unreadable, NaN or infinite: fails at use
                continue
        return largest

    def fetch(self, sample_id: int) -> Tuple[bytes, int, str]:
        """(JPEG bytes, class id, 'file: record key') with the label range checked."""
        position = self.position(sample_id)
        where = f"{self.rec_path}: record {int(self.reader.keys[position])}"
        raw = self.reader.read_at(position)  # CorruptRecordError names file and record
        try:
            header, body = unpack(raw)
        except ValueError as error:
            raise CorruptRecordError(f"{where}: {error}") from None
        label = label_of(header)
        problem = label_problem(label, self.num_classes, self.num_classes_source)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        return body, int(label), where

    def close(self) -> None:
        self.reader.close()


class RecordIOSource(IndexedSampleSource):
    """The torch loader: DataLoader workers over the native reader."""

    def __init__(self, prefix: str, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, skip_corrupt: bool = False,
                 num_classes: Optional[int] = None, shuffle: bool = True, flip: bool = True):
        super().__init__(batch_size, rank, world_size, seed, num_workers, skip_corrupt,
                         shuffle, flip)
        self.dataset = RecordDataset(prefix, num_classes)
        self.num_samples = self.dataset.num_images
        self.num_classes = self.dataset.num_classes
        if len(self) == 0:
            raise ValueError(f"{self.dataset.rec_path}: empty shard: {self.num_samples} images "
                             f"over {world_size} ranks cannot fill one batch of {batch_size}")

    def fetch(self, sample_id: int) -> Tuple[bytes, int, str]:
        return self.dataset.fetch(sample_id)

    def describe(self) -> str:
        return f"recordio {self.dataset.rec_path} via torch DataLoader (cpu decode), {self.num_workers} workers"

    def labels_of_epoch(self, epoch: int) -> np.ndarray:
        """The label stream of an epoch without decoding images (tests, debugging)."""
        plan, _ = self.plan(epoch)
        return np.array([[self.dataset.fetch(int(s))[1] for s in row] for row in plan])

    def close(self) -> None:
        self.dataset.close()


def build_recordio_source(prefix: str, batch_size: int, rank: int, world_size: int, seed: int,
                          num_workers: int, loader: str, skip_corrupt: bool,
                          num_classes: Optional[int], device: str, **kwargs) -> BatchSource:
    """The ``data.format = recordio`` source; ``loader`` is ``"dali"`` or ``"torch"``.

    Extra keyword args (``shuffle``, ``flip``, and for DALI ``initial_fill``) go to the
    source class.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"data device must be 'cpu' or 'cuda', got {device!r}")
    if loader == "torch":
        return RecordIOSource(prefix, batch_size, rank, world_size, seed, num_workers,
                              skip_corrupt, num_classes, **kwargs)
    if loader == "dali":
        from partialfc.data.dali import DaliRecordIOSource, dali_available

        if not dali_available():
            raise RuntimeError("data.loader = 'dali' but nvidia-dali is not installed; "
                               "pip install nvidia-dali-cuda120, or set data.loader=torch")
        return DaliRecordIOSource(prefix, batch_size, rank, world_size, seed, num_workers,
                                  skip_corrupt, num_classes, device, **kwargs)
    raise ValueError(f"data.loader must be 'dali' or 'torch', got {loader!r}")
