"""Training data sources behind one small interface (``BatchSource``)."""
from __future__ import annotations

from partialfc.data.base import Batch, BatchSource


def build_source(data, *, rank: int, world_size: int, seed: int, device: str = "cpu") -> BatchSource:
    """The ``BatchSource`` selected by a ``DataConfig`` (``data.format``)."""
    num_classes = data.num_classes or None
    if data.format == "synthetic":
        from partialfc.data.synthetic import SyntheticSource

        # On CUDA the batches are made on the device (counter stream; see synthetic.py).
        return SyntheticSource(data.num_classes, data.batch_size, rank, world_size, seed=seed,
                               num_samples=data.num_samples, noise=data.noise, device=device)
    if not data.path:
        raise ValueError(f"data.path must be set for data.format = {data.format!r}")
    if data.format == "image_folder":
        from partialfc.data.image_folder import ImageFolderSource

        return _pinned(ImageFolderSource(data.path, data.batch_size, rank, world_size, seed, data.num_workers,
                                         num_classes, skip_corrupt=data.skip_corrupt), device)
    if data.format == "recordio":
        from partialfc.data.recordio_source import build_recordio_source

        return _pinned(build_recordio_source(data.path, data.batch_size, rank, world_size, seed, data.num_workers,
                                             data.loader, data.skip_corrupt, num_classes, device), device)
    raise ValueError(f"unknown data.format {data.format!r}")


def _pinned(source: BatchSource, device) -> BatchSource:
    """Torch-loader sources feeding a CUDA trainer hand out pinned batches (async copies)."""
    from partialfc.data.augment import IndexedSampleSource

    if str(device).startswith("cuda") and isinstance(source, IndexedSampleSource):
        source.pin_memory = True
    return source


__all__ = ["Batch", "BatchSource", "build_source"]
