"""DevicePrefetcher: a pass-through on CPU, one batch copied ahead on CUDA.

On CPU the trainer's behaviour must not change at all: the same batch objects, in
order, and nothing pulled from the loader ahead of time. The look-ahead order of the
CUDA path (batch k+1 issued before batch k is handed out) is checked on CPU with the
copy and hand-out steps replaced by recorders; the real stream handling is checked
on CUDA (skipped here).
"""
from __future__ import annotations

import pytest
import torch

from partialfc.data.prefetch import DevicePrefetcher, prefetch_to_device


def _batches(count, log=None):
    for index in range(count):
        if log is not None:
            log.append(("produced", index))
        yield torch.full((2, 3), float(index)), torch.tensor([index, index + 1])


def test_cpu_is_a_pass_through():
    source = list(_batches(4))
    out = list(prefetch_to_device(source, "cpu"))
    assert len(out) == 4
    for (images, labels), (src_images, src_labels) in zip(out, source):
        assert images is src_images and labels is src_labels  # same objects: no copy


def test_cpu_pulls_nothing_ahead():
    log = []
    iterator = iter(prefetch_to_device(_batches(3, log), torch.device("cpu")))
    next(iterator)
    assert log == [("produced", 0)]  # batch 1 is not taken before the trainer asks


def test_close_closes_the_source_generator():
    closed = []

    def source():
        try:
            yield from _batches(5)
        finally:
            closed.append(True)

    prefetcher = prefetch_to_device(source(), "cpu")
    iterator = iter(prefetcher)
    next(iterator)
    prefetcher.close()
    assert closed == [True]


class _RecordingPrefetcher(DevicePrefetcher):
    """The CUDA look-ahead logic with the stream work replaced by a log."""

    def __init__(self, iterable, log):
        super().__init__(iterable, "cpu")
        self.overlaps, self.log = True, log

    def _issue_copy(self, batch):
        self.log.append(("copy issued", int(batch[1][0])))
        return batch, "event", None

    def _hand_out(self, moved, copied, host):
        self.log.append(("handed out", int(moved[1][0])))
        return moved


@pytest.mark.parametrize("count", [0, 1, 3])
def test_overlapped_path_issues_the_next_copy_before_handing_out(count):
    log = []
    out = []
    for images, labels in _RecordingPrefetcher(_batches(count, log), log):
        log.append(("step", int(labels[0])))
        out.append(int(labels[0]))
    assert out == list(range(count))
    expected = []
    if count:
        expected += [("produced", 0), ("copy issued", 0)]
    for index in range(count):
        if index + 1 < count:  # batch k+1 is taken and its copy issued before step k runs
            expected += [("produced", index + 1), ("copy issued", index + 1)]
        expected += [("handed out", index), ("step", index)]
    assert log == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for streams and pinned memory")
def test_cuda_copies_ahead_and_values_arrive_intact():
    device = torch.device("cuda", torch.cuda.current_device())
    batches = [(torch.randn(64, 3, 112, 112).pin_memory(), torch.arange(64) + i) for i in range(6)]
    prefetcher = DevicePrefetcher(batches, "cuda")
    seen = []
    for (images, labels), (src_images, src_labels) in zip(prefetcher, batches):
        assert images.device == device and labels.device == device
        # Work on the compute stream reads the batch: it must see the copied values.
        checksum = (images * 2).sum()
        seen.append(checksum)
        torch.testing.assert_close(labels.cpu(), src_labels)
        torch.testing.assert_close(images.cpu(), src_images)
    expected = [(2 * b[0]).sum() for b in batches]
    torch.testing.assert_close(torch.stack(seen).cpu(), torch.stack(expected), rtol=1e-4, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_already_on_device_pass_through():
    batch = (torch.ones(2, 3, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda"))
    (images, labels), = list(DevicePrefetcher([batch], "cuda"))
    assert images is batch[0] and labels is batch[1]


@pytest.mark.parametrize("device,pinned", [("cpu", False), ("cuda", True)])
def test_build_source_pins_torch_loader_batches_for_cuda(face_tree, device, pinned):
    """The torch loader pins its batches exactly when the trainer's device is CUDA
    (constructing the source touches no GPU, so this runs on CPU)."""
    from partialfc.config import DataConfig
    from partialfc.data import build_source

    root, _ = face_tree
    data = DataConfig(format="image_folder", path=root, batch_size=4, num_workers=0)
    source = build_source(data, rank=0, world_size=1, seed=0, device=device)
    assert source.pin_memory is pinned
    if not pinned:
        images, labels = next(iter(source.epoch(0)))
        assert not images.is_pinned()
