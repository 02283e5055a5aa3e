"""Class-conditional synthetic faces for demos, tests and benchmarks.

Each identity has a smooth random prototype (an 8x8x3 pattern upsampled to
112x112); an image is its prototype plus per-image noise. Everything derives from
``(seed, label)`` and ``(seed, sample index)``, so no data is stored, any class count
works, and a model can actually learn it (the demo's loss falls).

Ordering is defined for the *global* batch: epoch ``e`` shuffles all sample indices
with ``(seed, e)``, global step ``b`` takes the next ``batch_size * world_size`` of
them, and rank ``r`` takes its contiguous slice. The global batch is therefore the
same for any world size with the same global batch size.

Two pixel streams
-----------------
``generator`` (the default on CPU): one seeded ``torch.Generator`` per prototype and
per image. This is the stream the demo and the tests were recorded with, and it
stays bit-identical. It costs two generator seedings and ~38 k normal draws per image
on the host: ~2,000 images/s on one core, which would starve a GPU.

``counter`` (the default on any other device): a counter-based stream, every value a
hash of ``(seed, sample index or label, element index)``, computed for the whole
batch at once by elementwise integer ops on the device the trainer runs on (a few
kernels, no host work, no copy). It cannot reproduce the generator stream (a
Mersenne-Twister state is sequential by nature), so pixel values differ from the
``generator`` stream's; everything else -- the sample order, the labels, the batch
size, each rank's slice and the resume position -- is the same code and the same
values. It is deterministic and device-independent up to float rounding of
``log``/``cos`` (integer hashing is exact), which is how its tests run on CPU.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from partialfc.data.base import Batch, BatchSource

IMAGE_SIZE = 112
PROTOTYPE_SIZE = 8
STREAMS = ("auto", "generator", "counter")

_MASK32 = 0xFFFFFFFF
# Domain tags of the counter stream: prototypes and noise never share hash inputs.
_TAG_PROTOTYPE = 0x5EED0001
_TAG_NOISE = 0x5EED0002


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def synthetic_image(seed: int, label: int, index: int, noise: float) -> torch.Tensor:
    """One normalized (3, 112, 112) image of identity ``label`` (generator stream)."""
    proto = torch.randn(1, 3, PROTOTYPE_SIZE, PROTOTYPE_SIZE, generator=_generator(seed, 1, label))
    proto = F.interpolate(proto, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[0]
    pixel_noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=_generator(seed, 2, index))
    return (proto + noise * pixel_noise).clamp_(-1.0, 1.0)


# ---------------------------------------------------------------------- counter stream
def mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds with well-mixing odd constants).

    ``x`` is a Python int or an int64 tensor, holding values in [0, 2**32). Both
    multipliers are below 2**31, so every product stays below 2**63: no int64
    overflow, the same bits on every device and in Python.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _key(seed: int, tag: int, ids: torch.Tensor) -> torch.Tensor:
    """Per-id 32-bit keys: hash of (seed, tag, id); ids may exceed 32 bits."""
    # The seed's key is a host int: no tensor (and no host-to-device copy) per batch.
    seed_key = mix32(mix32((int(seed) ^ tag) & _MASK32) ^ ((int(seed) >> 32) & _MASK32))
    ids = ids.to(torch.int64)
    key = mix32((ids & _MASK32) ^ seed_key)
    return mix32(key ^ ((ids >> 32) & _MASK32))


def counter_normals(seed: int, tag: int, ids: torch.Tensor, count: int) -> torch.Tensor:
    """(len(ids), count) float32 standard normals, a pure function of (seed, tag, id, column).

    Box-Muller on two 24-bit uniforms in (0, 1), each the hash of (key, 2j) and
    (key, 2j + 1), so no value depends on how many were drawn before it.
    """
    keys = _key(seed, tag, ids).unsqueeze(1)
    counters = torch.arange(count, device=ids.device, dtype=torch.int64) * 2
    first = mix32(mix32((keys + counters) & _MASK32))
    second = mix32(mix32((keys + counters + 1) & _MASK32))
    scale = 2.0**-24
    u1 = ((first >> 8).to(torch.float32) + 0.5) * scale
    u2 = ((second >> 8).to(torch.float32) + 0.5) * scale
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)


def counter_images(seed: int, labels: torch.Tensor, indices: torch.Tensor, noise: float) -> torch.Tensor:
    """Normalized (B, 3, 112, 112) images of ``labels`` / sample ``indices`` (counter stream),
    on the device of ``indices``."""
    batch = indices.shape[0]
    proto = counter_normals(seed, _TAG_PROTOTYPE, labels, 3 * PROTOTYPE_SIZE * PROTOTYPE_SIZE)
    proto = F.interpolate(proto.view(batch, 3, PROTOTYPE_SIZE, PROTOTYPE_SIZE), size=(IMAGE_SIZE, IMAGE_SIZE),
                          mode="bilinear", align_corners=False)
    pixel_noise = counter_normals(seed, _TAG_NOISE, indices, 3 * IMAGE_SIZE * IMAGE_SIZE)
    return proto.add_(pixel_noise.view(batch, 3, IMAGE_SIZE, IMAGE_SIZE), alpha=noise).clamp_(-1.0, 1.0)


class SyntheticSource(BatchSource):
    """Deterministic synthetic identities; sample ``i`` has label ``i % num_classes``.

    ``device``: where batches are made. ``stream``: ``auto`` (generator on CPU, counter
    elsewhere), ``generator`` or ``counter`` (see the module docstring).
    """

    def __init__(self, num_classes: int, batch_size: int, rank: int, world_size: int, seed: int = 0,
                 num_samples: int = 0, noise: float = 0.6, device: torch.device | str = "cpu",
                 stream: str = "auto") -> None:
        if num_classes <= 0:
            raise ValueError(f"synthetic data needs data.num_classes > 0, got {num_classes}")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be > 0, got {batch_size}")
        if stream not in STREAMS:
            raise ValueError(f"synthetic stream must be one of {STREAMS}, got {stream!r}")
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.noise = noise
        self.device = torch.device(device)
        if stream == "auto":
            stream = "generator" if self.device.type == "cpu" else "counter"
        if stream == "generator" and self.device.type != "cpu":
            raise ValueError("the synthetic generator stream is made on the CPU; use stream='counter' "
                             f"for device {self.device}")
        self.stream = stream
        self.num_samples = num_samples or 32 * num_classes
        global_batch = batch_size * world_size
        if self.num_samples < global_batch:
            raise ValueError(
                f"data.num_samples={self.num_samples} is smaller than one global batch ({global_batch})"
            )
        self._batches = self.num_samples // global_batch

    def __len__(self) -> int:
        return self._batches

    def describe(self) -> str:
        return (f"synthetic, {self.num_classes:,} classes, {self.num_samples:,} images/epoch generated on "
                f"{self.device} ({self.stream} stream)")

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order = torch.randperm(self.num_samples, generator=_generator(self.seed, 3, epoch))
        global_batch = self.batch_size * self.world_size
        if self.stream == "counter":
            # One copy per epoch; each batch is then a slice on the device, without a sync.
            order = order.to(self.device)
            for batch in range(start_batch, self._batches):
                first = batch * global_batch + self.rank * self.batch_size
                indices = order[first:first + self.batch_size]
                labels = indices % self.num_classes
                yield counter_images(self.seed, labels, indices, self.noise), labels
            return
        for batch in range(start_batch, self._batches):
            first = batch * global_batch + self.rank * self.batch_size
            indices = order[first:first + self.batch_size].tolist()
            labels = torch.tensor([i % self.num_classes for i in indices], dtype=torch.long)
            images = torch.stack([
                synthetic_image(self.seed, label, index, self.noise)
                for label, index in zip(labels.tolist(), indices)
            ])
            yield images, labels
