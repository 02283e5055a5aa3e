"""Class-conditional synthetic faces for demos, tests and benchmarks.

Each identity has a smooth random prototype (an 8x8x3 pattern upsampled to
112x112); an image is its prototype plus per-image noise. Everything derives from
``(seed, label)`` and ``(seed, sample index)``, so no data is stored, any class count
works, and a model can actually learn it (the demo's loss falls).

Ordering is defined for the *global* batch: epoch ``e`` shuffles all sample indices
with ``(seed, e)``, global step ``b`` takes the next ``batch_size * world_size`` of
them, and rank ``r`` takes its contiguous slice. The global batch is therefore the
same for any world size with the same global batch size.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from partialfc.data.base import Batch, BatchSource

IMAGE_SIZE = 112
PROTOTYPE_SIZE = 8


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def synthetic_image(seed: int, label: int, index: int, noise: float) -> torch.Tensor:
    """One normalized (3, 112, 112) image of identity ``label``."""
    proto = torch.randn(1, 3, PROTOTYPE_SIZE, PROTOTYPE_SIZE, generator=_generator(seed, 1, label))
    proto = F.interpolate(proto, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[0]
    pixel_noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=_generator(seed, 2, index))
    return (proto + noise * pixel_noise).clamp_(-1.0, 1.0)


class SyntheticSource(BatchSource):
    """Deterministic synthetic identities; sample ``i`` has label ``i % num_classes``."""

    def __init__(self, num_classes: int, batch_size: int, rank: int, world_size: int, seed: int = 0,
                 num_samples: int = 0, noise: float = 0.6) -> None:
        if num_classes <= 0:
            raise ValueError(f"synthetic data needs data.num_classes > 0, got {num_classes}")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be > 0, got {batch_size}")
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.noise = noise
        self.num_samples = num_samples or 32 * num_classes
        global_batch = batch_size * world_size
        if self.num_samples < global_batch:
            raise ValueError(
                f"data.num_samples={self.num_samples} is smaller than one global batch ({global_batch})"
            )
        self._batches = self.num_samples // global_batch

    def __len__(self) -> int:
        return self._batches

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = torch.randperm(self.num_samples, generator=_generator(self.seed, 3, epoch))
        global_batch = self.batch_size * self.world_size
        for batch in range(start_batch, self._batches):
            first = batch * global_batch + self.rank * self.batch_size
            indices = order[first:first + self.batch_size].tolist()
            labels = torch.tensor([i % self.num_classes for i in indices], dtype=torch.long)
            images = torch.stack([
                synthetic_image(self.seed, label, index, self.noise)
                for label, index in zip(labels.tolist(), indices)
            ])
            yield images, labels
