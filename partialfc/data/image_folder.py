"""A folder of identity folders as a ``BatchSource`` (``data.format = image_folder``).

``root/<identity>/<image>.jpg``: identities get labels ``0 .. N-1`` in sorted folder
name order, the same rule ``partialfc.data.pack`` uses, so a folder trains the same
before and after packing. Meant for small sets and debugging; web-scale sets go
through RecordIO.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

from partialfc.data.augment import IndexedSampleSource
from partialfc.data.recordio import MissingDataFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_identity_folders(root: str) -> Tuple[List[str], List[str], np.ndarray, int]:
    """(identity names, image paths, labels, skipped non-image files) under ``root``."""
    if not os.path.isdir(root):
        raise MissingDataFileError(f"{root}: image folder root is missing or not a directory")
    identities = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    paths: List[str] = []
    labels: List[int] = []
    skipped = 0
    for label, identity in enumerate(identities):
        folder = os.path.join(root, identity)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                paths.append(path)
                labels.append(label)
            else:
                skipped += 1
    return identities, paths, np.asarray(labels, np.int64), skipped


class ImageFolderSource(IndexedSampleSource):
    """One rank's batches of an identity-folder tree, decoded in DataLoader workers."""

    def __init__(self, root: str, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, num_classes: Optional[int] = None,
                 skip_corrupt: bool = False, shuffle: bool = True, flip: bool = True):
        super().__init__(batch_size, rank, world_size, seed, num_workers, skip_corrupt,
                         shuffle, flip)
        self.root = root
        self.identities, self.paths, self.labels, self.skipped_files = list_identity_folders(root)
        if not self.paths:
            raise ValueError(f"{root}: no images found in identity folders")
        if num_classes is None:
            num_classes = len(self.identities)
        if num_classes < len(self.identities):
            raise ValueError(f"{root}: {len(self.identities)} identity folders but num_classes="
                             f"{num_classes}; labels would fall outside [0, num_classes)")
        self.num_classes = int(num_classes)
        self.num_samples = len(self.paths)
        if len(self) == 0:
            raise ValueError(f"{root}: empty shard: {self.num_samples} images over {world_size} "
                             f"ranks cannot fill one batch of {batch_size}")

    def describe(self) -> str:
        return f"image folder {self.root} via torch DataLoader (cpu decode), {self.num_workers} workers"

    def fetch(self, sample_id: int) -> Tuple[bytes, int, str]:
        path = self.paths[sample_id]
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise ValueError(f"{path}: cannot read ({error})") from None
        return data, int(self.labels[sample_id]), path
