"""The synthetic source's on-device (counter) stream, run on CPU through the same code.

The counter stream is what the trainer uses on CUDA. These tests run it with
``device="cpu", stream="counter"``: its integer hashing is exact on any device, so the
values checked here against a numpy float64 reimplementation are the values a GPU
makes, up to float rounding of log/cos. The generator stream (the CPU default) must
stay what it was: the demo and the resume tests were recorded with it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from partialfc.data import build_source
from partialfc.data.synthetic import (
    IMAGE_SIZE,
    PROTOTYPE_SIZE,
    SyntheticSource,
    _TAG_NOISE,
    _TAG_PROTOTYPE,
    counter_images,
    counter_normals,
    synthetic_image,
)

MASK = np.uint64(0xFFFFFFFF)


def _mix32_numpy(x: np.ndarray) -> np.ndarray:
    """The hash in numpy uint64, written from its definition (shifts, odd multipliers, 32-bit mask)."""
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x21F0AAAD)) & MASK
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x735A2D97)) & MASK
    x ^= x >> np.uint64(15)
    return x


def _normals_numpy(seed: int, tag: int, ids, count: int) -> np.ndarray:
    seed64 = np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    seed_key = _mix32_numpy(_mix32_numpy(np.array([(seed64 ^ np.uint64(tag)) & MASK]))
                            ^ ((seed64 >> np.uint64(32)) & MASK))
    ids = np.asarray(ids, dtype=np.uint64)
    key = _mix32_numpy((ids & MASK) ^ seed_key)
    key = _mix32_numpy(key ^ ((ids >> np.uint64(32)) & MASK))[:, None]
    counters = np.arange(count, dtype=np.uint64) * np.uint64(2)
    first = _mix32_numpy(_mix32_numpy((key + counters) & MASK))
    second = _mix32_numpy(_mix32_numpy((key + counters + np.uint64(1)) & MASK))
    u1 = ((first >> np.uint64(8)).astype(np.float64) + 0.5) / 2.0**24
    u2 = ((second >> np.uint64(8)).astype(np.float64) + 0.5) / 2.0**24
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_counter_normals_match_numpy_reference(seed):
    ids = torch.tensor([0, 1, 5, 123_456, 2**33 + 17])  # ids wider than 32 bits too
    got = counter_normals(seed, _TAG_NOISE, ids, 301)
    expected = _normals_numpy(seed, _TAG_NOISE, ids.numpy(), 301)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=2e-5)


def test_counter_normals_are_standard_normal():
    values = counter_normals(11, _TAG_NOISE, torch.arange(64), 4096).double()
    assert abs(values.mean().item()) < 0.01
    assert abs(values.std().item() - 1.0) < 0.01
    # Neighbouring ids and columns are uncorrelated (a weak hash would correlate them).
    assert abs(torch.corrcoef(torch.stack([values[0], values[1]]))[0, 1].item()) < 0.05
    assert abs(torch.corrcoef(torch.stack([values[:, 0], values[:, 1]]))[0, 1].item()) < 0.3


def test_counter_images_compose_prototype_and_noise():
    labels, indices, noise = torch.tensor([3, 3, 8]), torch.tensor([10, 20, 30]), 0.4
    images = counter_images(5, labels, indices, noise)
    proto = torch.from_numpy(_normals_numpy(5, _TAG_PROTOTYPE, labels.numpy(), 3 * PROTOTYPE_SIZE**2)).float()
    proto = F.interpolate(proto.view(3, 3, PROTOTYPE_SIZE, PROTOTYPE_SIZE), size=(IMAGE_SIZE, IMAGE_SIZE),
                          mode="bilinear", align_corners=False)
    pixel = torch.from_numpy(_normals_numpy(5, _TAG_NOISE, indices.numpy(), 3 * IMAGE_SIZE**2)).float()
    expected = (proto + noise * pixel.view(3, 3, IMAGE_SIZE, IMAGE_SIZE)).clamp(-1, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-4)
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32


def _epoch(source, epoch, start=0):
    return list(source.epoch(epoch, start))


def test_counter_stream_keeps_order_labels_and_resume():
    kwargs = dict(num_classes=13, batch_size=3, rank=1, world_size=2, seed=9, num_samples=33, noise=0.5)
    counter = SyntheticSource(**kwargs, stream="counter")
    generator = SyntheticSource(**kwargs)
    assert generator.stream == "generator" and counter.stream == "counter"
    assert len(counter) == len(generator) == 33 // 6
    full = _epoch(counter, 2)
    # Same sample order and labels as the generator stream; only the pixels differ.
    for (images_c, labels_c), (images_g, labels_g) in zip(full, _epoch(generator, 2)):
        assert torch.equal(labels_c, labels_g)
        assert images_c.shape == images_g.shape and not torch.equal(images_c, images_g)
    # Deterministic, and resuming at batch 3 gives exactly the tail.
    again = _epoch(SyntheticSource(**kwargs, stream="counter"), 2)
    resumed = _epoch(counter, 2, start=3)
    assert len(resumed) == len(full) - 3
    for (a_images, a_labels), (b_images, b_labels) in zip(full, again):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    for (a_images, a_labels), (b_images, b_labels) in zip(full[3:], resumed):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    # Other epochs and other seeds draw other batches.
    assert not torch.equal(full[0][1], _epoch(counter, 3)[0][1])
    other_seed = SyntheticSource(**{**kwargs, "seed": 10}, stream="counter")
    assert not torch.equal(full[0][0], _epoch(other_seed, 2)[0][0])


def test_counter_stream_global_batch_independent_of_world_size():
    one = SyntheticSource(17, 6, 0, 1, seed=4, num_samples=20, stream="counter")
    halves = [_epoch(SyntheticSource(17, 3, rank, 2, seed=4, num_samples=20, stream="counter"), 1)
              for rank in range(2)]
    batches = _epoch(one, 1)
    assert len(batches) == len(halves[0]) == 3
    for (images, labels), *parts in zip(batches, *halves):
        assert torch.equal(images, torch.cat([p[0] for p in parts]))
        assert torch.equal(labels, torch.cat([p[1] for p in parts]))


def test_same_identity_shares_its_prototype():
    """Two samples of one class differ by noise only: their mean difference is ~0 and
    their correlation is high (the prototype is what the demo's model learns)."""
    images = counter_images(1, torch.tensor([4, 4, 9]), torch.tensor([4, 17, 9]), 0.3)
    same = torch.corrcoef(torch.stack([images[0].flatten(), images[1].flatten()]))[0, 1]
    other = torch.corrcoef(torch.stack([images[0].flatten(), images[2].flatten()]))[0, 1]
    assert same > 0.6 and abs(other) < 0.5


def test_generator_stream_unchanged():
    """The CPU default is still one torch.Generator per prototype and per image."""
    source = SyntheticSource(5, 3, 0, 1, seed=2, num_samples=9, noise=0.7)
    images, labels = next(iter(source.epoch(0)))
    order = torch.randperm(9, generator=torch.Generator().manual_seed((2 * 1_000_003 + 3) * 1_000_003))
    assert labels.tolist() == [int(i) % 5 for i in order[:3]]
    expected = torch.stack([synthetic_image(2, int(i) % 5, int(i), 0.7) for i in order[:3]])
    assert torch.equal(images, expected)


def test_build_source_picks_the_stream_by_device():
    from partialfc.config import DataConfig

    data = DataConfig(format="synthetic", num_classes=10, batch_size=2, num_samples=20)
    assert build_source(data, rank=0, world_size=1, seed=0).stream == "generator"
    assert build_source(data, rank=0, world_size=1, seed=0, device="cpu").stream == "generator"
    with pytest.raises(ValueError, match="synthetic stream must be one of"):
        SyntheticSource(10, 2, 0, 1, stream="philox")
    with pytest.raises(ValueError, match="generator stream is made on the CPU"):
        SyntheticSource(10, 2, 0, 1, device="meta", stream="generator")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to compare the device stream with CPU")
def test_counter_stream_on_cuda_matches_cpu():
    cuda = SyntheticSource(101, 16, 0, 1, seed=3, num_samples=64, device="cuda")
    cpu = SyntheticSource(101, 16, 0, 1, seed=3, num_samples=64, stream="counter")
    assert cuda.stream == "counter"
    for (images_gpu, labels_gpu), (images_cpu, labels_cpu) in zip(_epoch(cuda, 0, 1), _epoch(cpu, 0, 1)):
        assert images_gpu.is_cuda and labels_gpu.is_cuda
        assert torch.equal(labels_gpu.cpu(), labels_cpu)
        torch.testing.assert_close(images_gpu.cpu(), images_cpu, rtol=0, atol=1e-4)
