"""Which image records of a ``.rec`` do not decode: checked on the CPU once, cached.

DALI's decoder works a whole batch at a time and has no way to skip a sample: one
payload it cannot decode (text bytes, a truncated JPEG) kills the pipeline, and one it
decodes leniently (a JPEG whose body is garbage: libjpeg-turbo fills in noise) is
trained on, where the torch loader refuses it. So before DALI sees the index, every
image record is put through ``decode.verify_image`` -- the same rule the torch loader's
``decode_face`` applies -- and the failures are left out of the index DALI reads
(``data.skip_corrupt = true``) or reported (false). Both loaders then skip, count or
refuse exactly the same records.

Cost: ``verify_image`` is a 1/8-scale JPEG decode, 70-110 us per 112x112 face on
one core (about half a full decode), so 5.8 M records take ~10 core-minutes: about
a minute on 16 cores. The verdict is therefore cached beside the index as
``<idx>.verified.json`` (like ``<idx>.npy``), keyed by the size and mtime of both
files and by the rule's version, and later runs read it in milliseconds. Every rank
of a run shares the scan (a contiguous 1/W of the records each, all-gathered), and
each rank uses its share of its machine's cores.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
from multiprocessing import get_context
from typing import List, Optional, Tuple

import numpy as np

from partialfc.atomic_io import atomic_output_path
from partialfc.data.decode import IMAGE_FORMATS, MAX_IMAGE_PIXELS, verify_image
from partialfc.data.recordio import read_framed, unpack

log = logging.getLogger(__name__)

RULE_VERSION = 1  # bump when verify_image starts judging differently: old verdicts are stale
_CHUNK = 2048      # records per worker task
_SERIAL_BELOW = 4 * _CHUNK  # a pool costs more than it saves on small sets

Problem = Tuple[int, str]  # (record key, one-line reason naming file and record)


def verdict_path(idx_path: str) -> str:
    return idx_path + ".verified.json"


def _fingerprint(rec_path: str, idx_path: str) -> dict:
    rec, idx = os.stat(rec_path), os.stat(idx_path)
    return {"rule": RULE_VERSION, "max_pixels": MAX_IMAGE_PIXELS, "formats": sorted(IMAGE_FORMATS),
            "rec": [rec.st_size, rec.st_mtime_ns], "idx": [idx.st_size, idx.st_mtime_ns]}


def _check_chunk(args) -> List[Problem]:
    """Problems among the records at ``offsets`` (runs in a pool worker or inline)."""
    rec_path, keys, offsets = args
    problems: List[Problem] = []
    with open(rec_path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return [(int(key), f"{rec_path}: record {int(key)}: file is empty") for key in keys]
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            for key, offset in zip(keys, offsets):
                where = f"{rec_path}: record {int(key)}"
                try:
                    _, body = unpack(read_framed(buffer, int(offset), where)[0])
                    verify_image(body, where)
                except ValueError as error:  # CorruptRecordError, CorruptImageError, short payload
                    message = str(error)
                    problems.append((int(key), message if message.startswith(where)
                                     else f"{where}: {message}"))
    return problems


def scan_images(rec_path: str, keys: np.ndarray, offsets: np.ndarray,
                workers: int = 1) -> List[Problem]:
    """(key, reason) of every record among ``keys`` / ``offsets`` that does not decode."""
    keys, offsets = np.asarray(keys, np.int64), np.asarray(offsets, np.int64)
    tasks = [(rec_path, keys[i:i + _CHUNK], offsets[i:i + _CHUNK])
             for i in range(0, keys.size, _CHUNK)]
    if workers <= 1 or keys.size < _SERIAL_BELOW:
        return [problem for task in tasks for problem in _check_chunk(task)]
    # spawn, not fork: this runs after the process group (gloo/NCCL threads, a CUDA context)
    # exists, and a forked child of a threaded process can deadlock on a lock held at fork.
    with get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        return [problem for chunk in pool.imap(_check_chunk, tasks) for problem in chunk]


def default_scan_workers() -> int:
    """This process's share of the machine's cores (torchrun's ranks of a node split them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _read_verdict(cache: str, fingerprint: dict, count: int) -> Optional[List[Problem]]:
    try:
        with open(cache, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("fingerprint") == fingerprint and saved.get("checked") == count:
            return [(int(key), str(reason)) for key, reason in saved["problems"]]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        pass  # unreadable or foreign: scan again and overwrite
    return None


def _write_verdict(cache: str, fingerprint: dict, count: int, problems: List[Problem]) -> None:
    if not os.access(os.path.dirname(os.path.abspath(cache)), os.W_OK):
        return
    try:
        with atomic_output_path(cache) as temp_path, \
                open(temp_path, "w", encoding="utf-8") as handle:
            json.dump({"fingerprint": fingerprint, "checked": count, "problems": problems}, handle)
    except OSError:
        pass  # a read-only or full disk only costs the next run a rescan


def _process_group_world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def undecodable_images(rec_path: str, idx_path: str, keys: np.ndarray, offsets: np.ndarray,
                       workers: Optional[int] = None, use_cache: bool = True) -> List[Problem]:
    """``scan_images`` over the image records of a set, read from or saved to the cache.

    ``keys`` / ``offsets`` must be the set's image records (header and identity records
    excluded), as every caller derives them the same way from the files.

    Under a process group every rank must call this (the trainer builds its source on
    all ranks at once): the ranks agree whether all of them have a valid cached
    verdict, and if not, each scans a contiguous 1/W of the records and the parts are
    all-gathered, so a first run costs N / (all cores of the job), not N / (one rank's).
    """
    cache = verdict_path(idx_path)
    fingerprint = _fingerprint(rec_path, idx_path)
    count = int(len(keys))
    cached = _read_verdict(cache, fingerprint, count) if use_cache else None
    rank, world = _process_group_world()
    if world > 1:
        import torch.distributed as dist

        # Collective from here on: every rank takes the same branch.
        flags = [None] * world
        dist.all_gather_object(flags, cached is not None)
        if all(flags):
            return cached
    elif cached is not None:
        return cached
    workers = default_scan_workers() if workers is None else workers
    part = np.array_split(np.arange(count), world)[rank]
    if rank == 0:
        log.info("checking that the %d image records of %s decode (once; the verdict is "
                 "cached in %s) on %d ranks x %d processes", count, rec_path, cache, world, workers)
    problems = scan_images(rec_path, np.asarray(keys)[part], np.asarray(offsets)[part], workers)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, problems)
        problems = [problem for rank_part in parts for problem in rank_part]
    if use_cache and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _write_verdict(cache, fingerprint, count, problems)
    return problems
