"""DALI RecordIO pipeline: the fast loader for web-scale sets.

``fn.readers.mxnet`` reads the ``.rec`` sharded by rank (``shard_id`` / ``num_shards``,
``stick_to_shard``, a seeded shuffle buffer), the decoder runs on ``mixed`` (nvJPEG)
when the source is on CUDA and on ``cpu`` otherwise, and ``crop_mirror_normalize``
applies the random flip and ``(x - 127.5) / 128`` in CHW float.

DALI's reader treats every ``.idx`` entry as an image, and sizes a record as the gap
to the next offset, so the insightface header record (key 0, no image) and the
per-identity records must not be listed. When the set has them, or when
``skip_corrupt`` drops records whose framing is broken or whose payload does not
decode, a filtered index is written to a private temp dir: the input files are never
touched.

Bad payloads: DALI's decoder cannot skip a sample (one undecodable payload fails the
whole batch) and decodes a garbage JPEG body leniently where the torch loader
refuses it. So every image record is first checked on the CPU with the torch
loader's own rule (``image_scan``, cached beside the index): with ``skip_corrupt``
the failures are left out of DALI's index and counted in ``report()`` as the torch
loader counts them; without it the first one is a one-line error naming the record.

Order: DALI shards are contiguous ranges of the index and its shuffle is a buffer
of ``initial_fill`` samples, so the label stream differs from the torch loader's
global shuffle; with ``shuffle=False`` both read each shard in file order. A
pipeline is built per epoch, seeded from ``(seed, epoch, rank)``; resuming at
``start_batch`` replays (and discards) the first ``start_batch`` batches.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Iterator, List, Optional

import numpy as np
import torch

from partialfc.data.base import Batch, BatchSource
from partialfc.data.decode import IMAGE_SIZE
from partialfc.data.image_scan import undecodable_images
from partialfc.data.pixels import PIXEL_MEAN, PIXEL_SCALE
from partialfc.data.recordio import broken_framing
from partialfc.data.recordio_index import load_index
from partialfc.data.recordio_source import RecordDataset


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_error_line(error: BaseException) -> str:
    """The line of a DALI pipeline error that says what failed (it names file and offset).

    The records that do not decode are filtered out beforehand, so this is a safety net
    (a payload Pillow accepts and nvJPEG refuses); it keeps the error to one line.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for marker in ("Failed to decode", "nvImageCodec failure", "Error"):
        for line in lines:
            if marker in line and "pipeline definition" not in line:
                return line
    return lines[0] if lines else type(error).__name__


class DaliRecordIOSource(BatchSource):
    """``BatchSource`` over a DALI ``fn.readers.mxnet`` pipeline."""

    def __init__(self, prefix: str, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, skip_corrupt: bool = False,
                 num_classes: Optional[int] = None, device: str = "cpu",
                 shuffle: bool = True, flip: bool = True, initial_fill: int = 32768,
                 scan_workers: Optional[int] = None):
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_threads = max(1, num_workers)
        self.skip_corrupt, self.shuffle, self.flip = skip_corrupt, shuffle, flip
        self.initial_fill = initial_fill
        self.scan_workers = scan_workers
        self.use_gpu = device == "cuda" and torch.cuda.is_available()
        self.skipped: List[str] = []
        self.corrupt_in_index: List[str] = []
        dataset = RecordDataset(prefix, num_classes)
        try:
            self.rec_path, self.num_classes = dataset.rec_path, dataset.num_classes
            self.num_classes_source = dataset.num_classes_source
            self.idx_path, self.num_images = self._image_index(dataset)
        finally:
            dataset.close()
        if len(self) == 0:
            self.close()
            raise ValueError(f"{self.rec_path}: empty shard: {self.num_images} images over "
                             f"{world_size} ranks cannot fill one batch of {batch_size}")

    def _image_index(self, dataset: RecordDataset):
        """Index DALI should read: the original, or a filtered copy in a temp dir."""
        reader = dataset.reader
        if dataset.header_range is None:
            keys, offsets = np.asarray(reader.keys), np.asarray(reader.offsets)
        else:
            all_keys = np.asarray(reader.keys)
            images = (all_keys >= 1) & (all_keys < dataset.header_range[0])
            keys, offsets = all_keys[images], np.asarray(reader.offsets)[images]
        broken = broken_framing(dataset.rec_path, offsets)
        problems = [(int(k), f"{dataset.rec_path}: record {int(k)} at byte {int(o)}: bad framing")
                    for k, o in zip(keys[broken], offsets[broken])]
        undecodable = undecodable_images(dataset.rec_path, dataset.idx_path, keys[~broken],
                                         offsets[~broken], workers=self.scan_workers)
        excluded = broken.copy()
        if undecodable:
            excluded |= np.isin(keys, np.array([key for key, _ in undecodable], np.int64))
            problems = sorted(problems + undecodable)
        if problems:
            if not self.skip_corrupt:
                raise ValueError(problems[0][1] + f" ({len(problems)} such records; set "
                                 "data.skip_corrupt=true to skip them)")
            self.corrupt_in_index = [message for _, message in problems]
            keys, offsets = keys[~excluded], offsets[~excluded]
        self._tmpdir = None
        if dataset.header_range is None and not problems:
            return dataset.idx_path, int(keys.size)
        self._tmpdir = tempfile.mkdtemp(prefix="partialfc-dali-")
        path = os.path.join(self._tmpdir, "images.idx")
        with open(path, "w", encoding="ascii") as handle:
            np.savetxt(handle, np.stack([keys, offsets], 1), fmt="%d\t%d")
        return path, int(keys.size)

    def __len__(self) -> int:
        return (self.num_images // self.world_size) // self.batch_size

    @property
    def shuffle_buffer(self) -> int:
        """``initial_fill`` capped at the shard: a larger buffer re-reads the shard to fill."""
        return max(1, min(self.initial_fill, self.num_images // self.world_size))

    def build_pipeline(self, epoch: int):
        """The DALI pipeline of one epoch; outputs (images CHW float, labels int64)."""
        from nvidia.dali import fn, pipeline_def, types

        device_id = torch.cuda.current_device() if self.use_gpu else None
        pipe_seed = int(np.random.default_rng([self.seed, epoch, self.rank]).integers(2**31))

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=device_id, seed=pipe_seed, prefetch_queue_depth=2)
        def face_pipeline():
            jpegs, labels = fn.readers.mxnet(
                path=[self.rec_path], index_path=[self.idx_path], shard_id=self.rank,
                num_shards=self.world_size, stick_to_shard=True,
                random_shuffle=self.shuffle, initial_fill=self.shuffle_buffer,
                pad_last_batch=False, name="Reader")
            images = fn.decoders.image(jpegs, device="mixed" if self.use_gpu else "cpu",
                                       output_type=types.RGB)
            images = fn.resize(images, resize_x=IMAGE_SIZE, resize_y=IMAGE_SIZE)
            mirror = fn.random.coin_flip(probability=0.5) if self.flip else 0
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", mean=[PIXEL_MEAN] * 3,
                std=[PIXEL_SCALE] * 3, mirror=mirror)
            # Multi-float labels: the identity is the first float.
            class_ids = fn.cast(labels[0:1], dtype=types.INT64)
            return images, class_ids

        pipe = face_pipeline()
        pipe.build()
        return pipe

    @staticmethod
    def _to_torch(tensor_list) -> torch.Tensor:
        """Copy a DALI batch out (DALI reuses its buffers): numpy on CPU, CUDA via feed_ndarray."""
        dense = tensor_list.as_tensor()
        if type(tensor_list).__name__ == "TensorListGPU":
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

            out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device="cuda")
            # Copies on torch's current stream, ordered after DALI's work on the batch.
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
            return out
        return torch.from_numpy(np.array(dense))

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is not in [0, {len(self)}]")
        self.skipped = list(self.corrupt_in_index)
        pipe = self.build_pipeline(epoch)
        try:
            for batch_index in range(len(self)):
                try:
                    images_out, labels_out = pipe.run()
                except RuntimeError as error:
                    raise ValueError(self._describe_failure(error, epoch, batch_index)) from None
                if batch_index < start_batch:
                    continue  # replay to reach the resume point
                images = self._to_torch(images_out)
                # Labels leave DALI on the host: checked there (no device sync), then copied.
                labels = self._check_labels(images, self._to_torch(labels_out).reshape(-1), images_out,
                                            batch_index)
                if images.is_cuda:
                    labels = labels.pin_memory().to(images.device, non_blocking=True)
                yield images, labels
        finally:
            del pipe

    def _describe_failure(self, error: RuntimeError, epoch: int, batch_index: int) -> str:
        """One line for a DALI pipeline error, naming the record when DALI gives its offset."""
        line = dali_error_line(error)
        where = f"{self.rec_path}: batch {batch_index} of epoch {epoch}"
        found = re.search(r" at index (\d+)", line)
        if found:  # DALI names "<file> at index <byte offset>"; the index maps it to a key
            keys, offsets = load_index(self.idx_path, use_cache=False)
            match = np.flatnonzero(offsets == int(found.group(1)))
            if match.size:
                where = f"{self.rec_path}: record {int(keys[match[0]])} at byte {found.group(1)}"
        return (f"{where}: DALI failed to decode ({line}); "
                f"`python -m partialfc.data.inspect {self.rec_path[:-4]} --decode` lists such records")

    def _check_labels(self, images, labels, images_out, batch_index) -> torch.Tensor:
        """Host labels ``labels`` checked against the class range; bad samples replaced
        (``skip_corrupt``) or a one-line error naming the record."""
        bad = (labels < 0) | (labels >= self.num_classes)
        if not bool(bad.any()):  # host tensor: no device sync
            return labels
        bad_index = torch.nonzero(bad).reshape(-1)
        messages = []
        for sample in bad_index.tolist():
            # DALI's reader tags each image "<file> at index <byte offset>".
            info = images_out[sample]
            source = info.source_info() if hasattr(info, "source_info") and info.source_info() \
                else f"{self.rec_path}: batch {batch_index} sample {sample}"
            messages.append(f"{source}: label {int(labels[sample])} is outside [0, num_classes="
                            f"{self.num_classes}) (num_classes from {self.num_classes_source})")
        good = torch.nonzero(~bad).reshape(-1)
        if not self.skip_corrupt or good.numel() == 0:
            raise ValueError(messages[0])
        self.skipped.extend(messages)
        replacement = good[torch.arange(bad_index.numel()) % good.numel()]
        images[bad_index.to(images.device)] = images[replacement.to(images.device)]
        labels = labels.clone()
        labels[bad_index] = labels[replacement]
        return labels

    def report(self) -> dict:
        return {"skipped_corrupt": len(self.skipped), "skipped_examples": self.skipped[:5]}

    def describe(self) -> str:
        decode = f"mixed decode on cuda:{torch.cuda.current_device()}" if self.use_gpu else "cpu decode"
        return f"recordio {self.rec_path} via dali ({decode}), {self.num_threads} threads"

    def close(self) -> None:
        if getattr(self, "_tmpdir", None):
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
