"""What every CPU training source shares: the epoch plan, decoding, flip and normalize.

The image-folder source and the RecordIO torch loader differ only in how one sample's
bytes and label are fetched. The order of samples, the shard of a rank, the flips and
the batch assembly live here once, so both obey the same determinism contract of
``BatchSource``: everything is a function of ``(seed, epoch, rank, world_size)`` and
batch ``b`` can be produced without producing batches ``0 .. b-1`` (resume).
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from partialfc.data.base import Batch, BatchSource
from partialfc.data.decode import decode_face
from partialfc.data.pixels import normalize_pixels


def normalize_batch(images: np.ndarray, flips: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) + bool (B,) -> float32 (B, 3, H, W), flipped, (x-127.5)/128."""
    images = images.copy()
    images[flips] = images[flips, :, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return normalize_pixels(tensor)


def epoch_plan(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int,
               world_size: int, shuffle: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(sample ids, flips) of one rank's epoch, each shaped (batches, batch_size).

    A seeded global permutation shared by all ranks; rank r takes every
    world_size-th entry from r; the tail that does not fill a batch on every rank is
    dropped so all ranks have the same number of batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_samples) if shuffle else np.arange(num_samples)
    num_batches = (num_samples // world_size) // batch_size
    if num_batches == 0:
        raise ValueError(f"empty shard: {num_samples} samples over {world_size} ranks cannot "
                         f"fill one batch of {batch_size}")
    mine = order[rank::world_size][: num_batches * batch_size].reshape(num_batches, batch_size)
    flips = np.random.default_rng([seed, epoch, rank, 1]).random(mine.shape) < 0.5
    return mine, flips


class _BatchDataset(Dataset):
    """One item = one whole batch; lets DataLoader workers decode batches in parallel."""

    def __init__(self, plan, flips, fetch: Callable[[int], Tuple[bytes, int, str]],
                 skip_corrupt: bool, flip: bool):
        self.plan, self.flips, self.fetch = plan, flips, fetch
        self.skip_corrupt, self.flip = skip_corrupt, flip

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, batch_index: int):
        """(images, labels, skipped messages, None) or (None, None, None, error).

        A bad sample's ``ValueError`` is returned, not raised: raised in a worker,
        DataLoader would re-raise it wrapped in the worker's traceback text, and the
        user would get a page instead of the one line naming the record.
        """
        images: List[np.ndarray] = []
        labels: List[int] = []
        skipped: List[str] = []
        for sample in self.plan[batch_index]:
            try:
                data, label, where = self.fetch(int(sample))
                images.append(decode_face(data, where))
                labels.append(label)
            except ValueError as error:  # corrupt record, undecodable image, bad label
                if not self.skip_corrupt:
                    return None, None, None, error
                skipped.append(str(error))
        if not images:
            return None, None, None, ValueError(
                f"batch {batch_index}: every sample is corrupt, first: {skipped[0]}")
        # Keep the batch size: a skipped sample is replaced by a copy of a good one of
        # the same batch (deterministic, and rare by assumption).
        while len(images) < len(self.plan[batch_index]):
            images.append(images[len(images) % len(labels)])
            labels.append(labels[len(labels) % len(labels)])
        flips = self.flips[batch_index] if self.flip else np.zeros(len(images), bool)
        return (normalize_batch(np.stack(images), flips),
                torch.tensor(labels, dtype=torch.int64), skipped, None)


class IndexedSampleSource(BatchSource):
    """A ``BatchSource`` over ``num_samples`` samples fetched by ``fetch(sample_id)``.

    Subclasses set ``num_samples``, ``num_classes`` and implement ``fetch`` returning
    ``(encoded image bytes, label, description for errors)``; ``fetch`` must be
    picklable (it runs in DataLoader workers).
    """

    num_samples: int
    # Set by build_source when the trainer runs on CUDA: the loader hands out batches in
    # pinned memory, so the prefetcher's non_blocking copy to the GPU is truly async.
    pin_memory: bool = False

    def __init__(self, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, skip_corrupt: bool = False, shuffle: bool = True,
                 flip: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.num_workers = seed, num_workers
        self.skip_corrupt, self.shuffle, self.flip = skip_corrupt, shuffle, flip
        self.skipped: List[str] = []

    def fetch(self, sample_id: int) -> Tuple[bytes, int, str]:
        raise NotImplementedError

    def __len__(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size

    def plan(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        return epoch_plan(self.num_samples, self.batch_size, self.seed, epoch, self.rank,
                          self.world_size, self.shuffle)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        plan, flips = self.plan(epoch)
        if not 0 <= start_batch <= len(plan):
            raise ValueError(f"start_batch {start_batch} is not in [0, {len(plan)}]")
        self.skipped = []
        dataset = _BatchDataset(plan[start_batch:], flips[start_batch:], self.fetch,
                                self.skip_corrupt, self.flip)
        loader = DataLoader(dataset, batch_size=None, shuffle=False,
                            num_workers=self.num_workers, collate_fn=_identity,
                            prefetch_factor=2 if self.num_workers else None,
                            pin_memory=self.pin_memory)
        for images, labels, skipped, error in loader:
            if error is not None:
                raise error
            self.skipped.extend(skipped)
            yield images, labels

    def report(self) -> dict:
        return {"skipped_corrupt": len(self.skipped),
                "skipped_examples": self.skipped[:5]}


def _identity(batch):
    return batch

