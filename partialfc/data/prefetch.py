"""Copy the next batch to the GPU while the current one computes.

A host batch (from the torch DataLoader, in pinned memory) copied with a plain
``.to(device)`` on the compute stream makes the step wait for the copy, and from
pageable memory the copy also blocks the host. ``DevicePrefetcher`` keeps one batch
in flight: when batch k is handed out, batch k+1 has already been taken from the
loader and its copy issued on a side stream, so the copy runs under step k's
kernels.

Stream rules (what makes the overlap safe):

* the copy only reads host memory, so the side stream does not wait for the compute
  stream: batch k+1's copy may run while step k-1 and step k compute;
* an event is recorded on the side stream after each batch's copy, and before the
  batch is handed out the compute stream waits for *that* event (not for the whole
  side stream, which by then also holds batch k+1's copy): step k's kernels start
  once batch k is on the device, and the host never waits;
* each copied tensor is ``record_stream``-ed on the compute stream: it was allocated
  on the side stream, and without this the caching allocator could give its memory
  to a later copy while the compute stream still reads it.

The host batch stays referenced until its device copy is handed out (see
``_hand_out`` for why it may go then).

Batches whose tensors are already on the device (synthetic data made there, DALI's
GPU output) pass through untouched, and on CPU the prefetcher is a pass-through:
same objects, same order, nothing ahead, so CPU runs behave exactly as without it.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch


def _map_tensors(batch: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tuple / list / dict batch."""
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, tuple):
        return tuple(_map_tensors(item, fn) for item in batch)
    if isinstance(batch, list):
        return [_map_tensors(item, fn) for item in batch]
    if isinstance(batch, dict):
        return {key: _map_tensors(value, fn) for key, value in batch.items()}
    return batch


def _tensors(batch: Any) -> list:
    found: list = []
    _map_tensors(batch, lambda t: found.append(t) or t)
    return found


class DevicePrefetcher:
    """Iterate ``iterable``'s batches on ``device``, the next one copied ahead on CUDA."""

    def __init__(self, iterable: Iterable, device: torch.device | str) -> None:
        self.iterable = iterable
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.overlaps = self.device.type == "cuda"
        self._iterator: Optional[Iterator] = None
        self._stream = torch.cuda.Stream(self.device) if self.overlaps else None

    def __iter__(self) -> Iterator:
        self._iterator = iter(self.iterable)
        if not self.overlaps:
            return self._iterator  # CPU: a pass-through, nothing copied or held ahead
        return self._overlapped(self._iterator)

    def _needs_copy(self, batch: Any) -> bool:
        return any(t.device != self.device for t in _tensors(batch))

    def _issue_copy(self, batch: Any):
        """(batch on the device, its copy's event, host batch kept alive until handed out)."""
        if not self._needs_copy(batch):
            return batch, None, None
        with torch.cuda.stream(self._stream):
            moved = _map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return moved, copied, batch

    def _hand_out(self, moved: Any, copied: Optional[torch.cuda.Event], host: Any) -> Any:
        if copied is None:
            return moved  # was already on the device, on the stream that made it
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        # Dropping the host batch now is safe even if its copy is still running: torch's
        # pinned allocator reuses a block only after the copy's event, and a pageable
        # source was staged by the driver before .to() returned.
        del host
        for tensor in _tensors(moved):
            if tensor.device == self.device:
                tensor.record_stream(compute)
        return moved

    def _overlapped(self, iterator: Iterator) -> Iterator:
        try:
            pending = self._issue_copy(next(iterator))
        except StopIteration:
            return
        for batch in iterator:
            following = self._issue_copy(batch)  # batch k+1's copy, under step k's kernels
            yield self._hand_out(*pending)
            pending = following
        yield self._hand_out(*pending)

    def close(self) -> None:
        """Close the underlying iterator (a generator's ``finally`` runs: DALI pipelines,
        loader workers) when a run stops part-way through an epoch."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def prefetch_to_device(iterable: Iterable, device: torch.device | str) -> DevicePrefetcher:
    """``DevicePrefetcher(iterable, device)``: the trainer wraps ``source.epoch(...)`` in it."""
    return DevicePrefetcher(iterable, device)


__all__ = ["DevicePrefetcher", "prefetch_to_device"]
