"""Embed every image of a RecordIO set with a trained backbone, on one or all ranks.

Cleaning needs one embedding per record, computed once. Under torchrun each rank
embeds a contiguous range of the images (the same split rule as the class shards:
the first ``N % W`` ranks take one image more) and the ranges are gathered on rank 0
in rank order, so the result is row-for-row the same as a single process's. The
gather goes in fixed-size chunks so neither side ever holds a padded copy of the
whole set on the device.

Embeddings can be saved and reused (``--embeddings``): ``FILE`` holds the float32
``(N, D)`` rows and ``FILE``'s ``.index.npy`` sibling the int64 record key of each row.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from partialfc.atomic_io import atomic_output_path
from partialfc.data.decode import decode_face
from partialfc.data.recordio_source import RecordDataset
from partialfc.distributed import collectives
from partialfc.data.pixels import normalize_pixels

GATHER_ROWS = 16384  # rows per gather round: bounds device memory on every rank


def sample_range(num_samples: int, world_size: int, rank: int) -> range:
    """The contiguous sample ids rank ``rank`` embeds (may be empty when N < W)."""
    base, extra = divmod(num_samples, world_size)
    start = base * rank + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class _RecordBatches(Dataset):
    """Item ``i`` = batch ``i`` of a sample-id range: uint8 images, labels, record keys.

    One item per batch so DataLoader workers decode whole batches in parallel.
    """

    def __init__(self, dataset: RecordDataset, sample_ids: range, batch_size: int):
        self.dataset, self.sample_ids, self.batch_size = dataset, sample_ids, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sample_ids) / self.batch_size)

    def __getitem__(self, index: int):
        """(images, labels, keys, None), or (None, None, None, error) for a bad record: the
        error is raised by the caller, as one line (raised in a worker, DataLoader would
        wrap it in the worker's traceback text)."""
        ids = self.sample_ids[index * self.batch_size:(index + 1) * self.batch_size]
        images, labels, keys = [], [], []
        try:
            for sample_id in ids:
                data, label, where = self.dataset.fetch(sample_id)  # errors name file and record
                images.append(decode_face(data, where))
                labels.append(label)
                keys.append(self.dataset.key(sample_id))
        except ValueError as error:
            return None, None, None, error
        return (torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64),
                torch.tensor(keys, dtype=torch.int64), None)


@torch.inference_mode()
def embed_range(model: nn.Module, dataset: RecordDataset, sample_ids: range, *, batch_size: int,
                device: torch.device, embedding_size: int, num_workers: int = 0, flip: bool = False,
                progress=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeddings (n, D) float32 unit rows, labels (n,), keys (n,)) on the CPU.

    ``flip`` adds the embedding of the mirrored image before normalizing (as the
    verification protocol does). ``progress`` is called with the number of images of
    every finished batch.
    """
    model.eval()
    loader = DataLoader(_RecordBatches(dataset, sample_ids, batch_size), batch_size=None,
                        num_workers=num_workers, prefetch_factor=2 if num_workers else None)
    embeddings, labels, keys = [], [], []
    for images, batch_labels, batch_keys, error in loader:
        if error is not None:
            raise error
        pixels = normalize_pixels(images.to(device, non_blocking=True).permute(0, 3, 1, 2))
        features = model(pixels).float()
        if flip:
            features = features + model(torch.flip(pixels, dims=[3])).float()
        embeddings.append(torch.nn.functional.normalize(features, dim=1).cpu())
        labels.append(batch_labels)
        keys.append(batch_keys)
        if progress is not None:
            progress(len(batch_labels))
    if not embeddings:  # an empty range (fewer images than ranks)
        return torch.zeros(0, embedding_size), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(embeddings), torch.cat(labels), torch.cat(keys)


def gather_rows_to_rank0(local: torch.Tensor, counts, group=None,
                         device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """Concatenate every rank's ``local`` rows in rank order on rank 0 (None elsewhere).

    ``counts[r]`` is the number of rows of rank ``r``. Rows travel in rounds of
    ``GATHER_ROWS``; each rank pads its round to that size.
    """
    if not collectives.is_distributed(group):
        return local
    device = device or torch.device("cpu")
    rank, world = collectives.rank(group), collectives.world_size(group)
    width = local.shape[1:]
    pieces = [[] for _ in range(world)]
    for start in range(0, max(counts), GATHER_ROWS):
        chunk = local.new_zeros((GATHER_ROWS, *width))
        mine = local[start:start + GATHER_ROWS]
        chunk[:mine.shape[0]] = mine
        chunk = chunk.to(device)
        received = [torch.empty_like(chunk) for _ in range(world)] if rank == 0 else None
        dist.gather(chunk, received, dst=_global_rank0(group), group=group)
        if rank == 0:
            for source in range(world):
                rows = max(0, min(GATHER_ROWS, counts[source] - start))
                pieces[source].append(received[source][:rows].cpu())
    if rank != 0:
        return None
    return torch.cat([piece for per_rank in pieces for piece in per_rank])


def _global_rank0(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def embed_dataset(model: nn.Module, dataset: RecordDataset, *, batch_size: int, device: torch.device,
                  embedding_size: int, num_workers: int = 0, flip: bool = False, group=None,
                  collective_device: Optional[torch.device] = None, show_progress: bool = True):
    """Embed all images on every rank of ``group``; rank 0 gets ``(embeddings, labels, keys)``
    as numpy arrays in sample order, the other ranks ``None``."""
    rank, world = collectives.rank(group), collectives.world_size(group)
    counts = [len(sample_range(dataset.num_images, world, r)) for r in range(world)]
    bar = _progress_bar(dataset.num_images, world, enabled=show_progress and rank == 0)
    failure: Optional[ValueError] = None
    try:
        # Rank 0 sees only its own batches; with equal shards that times W is the total.
        update = (lambda images: bar.update(images * world)) if bar is not None else None
        embeddings, labels, keys = embed_range(
            model, dataset, sample_range(dataset.num_images, world, rank), batch_size=batch_size,
            device=device, embedding_size=embedding_size, num_workers=num_workers, flip=flip,
            progress=update)
    except ValueError as error:  # a record that does not read or decode
        failure = error
    finally:
        if bar is not None:
            bar.close()
    _raise_if_any_rank_failed(failure, group, collective_device)
    meta = torch.stack([labels, keys], dim=1)
    embeddings = gather_rows_to_rank0(embeddings, counts, group, collective_device)
    meta = gather_rows_to_rank0(meta, counts, group, collective_device)
    if embeddings is None:
        return None
    return embeddings.numpy(), meta[:, 0].numpy(), meta[:, 1].numpy()


def _raise_if_any_rank_failed(failure: Optional[ValueError], group,
                              device: Optional[torch.device]) -> None:
    """Every rank raises when one failed, instead of the others waiting in the gather
    until the collective timeout; the rank that failed raises its own message."""
    if collectives.is_distributed(group):
        flag = torch.tensor([0 if failure is None else 1], device=device or torch.device("cpu"))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if failure is None and bool(flag.item()):  # host sync: once per job
            raise ValueError("another rank could not read or decode a record (its message "
                             "names it); nothing written")
    if failure is not None:
        raise failure


def _progress_bar(total: int, world: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"embed ({world} rank{'s' if world > 1 else ''})", unit="img",
                unit_scale=True, file=sys.stderr, smoothing=0.1)


# ---------------------------------------------------------------------------- reuse
def index_path_for(embeddings_path: str) -> str:
    """``emb.npy`` -> ``emb.index.npy``: the record key of every embedding row."""
    base = embeddings_path[:-4] if embeddings_path.endswith(".npy") else embeddings_path
    return base + ".index.npy"


def save_embeddings(path: str, embeddings: np.ndarray, keys: np.ndarray) -> None:
    """Write the rows and their record keys, each atomically (index last)."""
    if not path.endswith(".npy"):
        raise ValueError(f"--embeddings file must end in .npy, got {path!r}")
    for target, array in ((path, np.asarray(embeddings, np.float32)),
                          (index_path_for(path), np.asarray(keys, np.int64))):
        with atomic_output_path(target) as temp_path, open(temp_path, "wb") as handle:
            np.save(handle, array)


def load_embeddings(path: str, expected_keys: np.ndarray, embedding_size: int) -> np.ndarray:
    """The saved rows, checked against the data: same record keys in the same order."""
    index_path = index_path_for(path)
    for file in (path, index_path):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: embeddings file is missing")
    try:
        embeddings = np.load(path, mmap_mode="r", allow_pickle=False)
        keys = np.load(index_path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path}: not a saved embeddings array ({error})") from None
    if embeddings.ndim != 2 or embeddings.shape[1] != embedding_size:
        raise ValueError(f"{path}: embeddings have shape {embeddings.shape}, the checkpoint needs "
                         f"(N, {embedding_size})")
    if keys.shape != (embeddings.shape[0],):
        raise ValueError(f"{index_path}: index has shape {keys.shape} for {embeddings.shape[0]} "
                         f"embedding rows")
    if keys.shape != expected_keys.shape or not np.array_equal(keys, expected_keys):
        raise ValueError(f"{index_path}: the {keys.size} saved record keys do not match the "
                         f"{expected_keys.size} image records of the data set")
    return np.asarray(embeddings, dtype=np.float32)
