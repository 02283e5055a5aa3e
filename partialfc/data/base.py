"""The small interface every training data source implements.

The trainer only needs: a fixed number of equal-size batches per epoch on every rank
(so collectives never see a missing batch), and a way to start an epoch part-way
through, which is how a resumed run continues the exact data order.
"""
from __future__ import annotations

import abc
from typing import Iterator, Tuple

import torch

Batch = Tuple[torch.Tensor, torch.Tensor]
"""``(images, labels)``: float32 ``(B, 3, 112, 112)`` normalized as ``(x - 127.5) / 128``
and int64 global class ids ``(B,)``."""


class BatchSource(abc.ABC):
    """One rank's view of the training set.

    ``epoch(e, start_batch)`` must yield the same batches for the same
    ``(seed, e, rank, world_size)`` every time it is called, starting at
    ``start_batch``; that is what makes resume bit-exact.
    """

    num_classes: int
    batch_size: int

    @abc.abstractmethod
    def __len__(self) -> int:
        """Batches per epoch on this rank; equal on every rank (``drop_last``)."""

    @abc.abstractmethod
    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield this rank's batches of ``epoch`` from ``start_batch`` on."""

    def describe(self) -> str:
        """One phrase for the start-up log: what is read, by which loader, decoded where."""
        return type(self).__name__

    def close(self) -> None:
        """Release workers or pipelines; sources without any need not override."""

    def report(self) -> dict:
        """Counters worth logging at the end of an epoch (e.g. skipped corrupt records)."""
        return {}
