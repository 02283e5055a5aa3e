"""Verification accuracy on the standard pair sets (LFW, CFP-FP, AgeDB-30 ...).

How a run is judged during training: each image and its horizontal flip are
embedded, the two embeddings summed and L2-normalized, pairs scored by cosine, and
the LFW 10-fold protocol picks the threshold. ``evaluate_bin_sets`` is what the
trainer calls; ``load_bin`` keeps decoded sets in memory so a set is read and
decoded once per process, not at every evaluation.

CLI::

    python -m partialfc.eval.verification CHECKPOINT DATA.bin [DATA2.bin ...] [--batch-size N]

CHECKPOINT is anything ``partialfc.models.inference.load_model`` takes (run directory,
checkpoints root, step directory, ``backbone.pt``, consolidated file). A bad input
(checkpoint, ``.bin``, option) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from partialfc.atomic_io import atomic_write_text
from partialfc.eval.bin_format import decode_images, read_bin
from partialfc.eval.metrics_math import format_far, kfold_threshold_accuracy, tar_at_far
from partialfc.data.pixels import normalize_pixels

__all__ = [
    "VerificationSet",
    "load_bin",
    "clear_bin_cache",
    "embed_images",
    "evaluate_embeddings",
    "evaluate_bin_sets",
    "main",
]

DEFAULT_FARS: Tuple[float, ...] = (1e-3, 1e-4)
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class VerificationSet:
    """A decoded pair set: ``images`` uint8 ``(2P, 3, H, W)`` RGB, ``issame`` bool ``(P,)``."""

    name: str
    images: torch.Tensor
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)


_CACHE: Dict[Tuple[str, int, int, Tuple[int, int]], VerificationSet] = {}
_CACHE_LOCK = threading.Lock()


def set_name(path: PathLike) -> str:
    """``/data/lfw.bin`` -> ``lfw``: the key used in logs and result dicts."""
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def load_bin(path: PathLike, image_size: Tuple[int, int] = (112, 112)) -> VerificationSet:
    """Read and decode a ``.bin`` once; later calls return the cached set.

    The cache key includes the file's size and modification time, so a file that
    is rewritten is read again.
    """
    source = os.path.realpath(os.fspath(path))
    try:
        stat = os.stat(source)
    except FileNotFoundError as error:
        raise ValueError(f"verification set not found: {os.fspath(path)}") from error
    key = (source, stat.st_mtime_ns, stat.st_size, tuple(image_size))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    bins, issame = read_bin(source)
    images = torch.from_numpy(decode_images(bins, tuple(image_size), source))
    loaded = VerificationSet(name=set_name(path), images=images, issame=issame)
    with _CACHE_LOCK:
        _CACHE[key] = loaded
    return loaded


def clear_bin_cache() -> None:
    """Drop every cached set (frees the decoded images)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _normalize_pixels(batch_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 RGB -> float ``(x - 127.5) / 128``, the backbone's input convention."""
    return normalize_pixels(batch_uint8.to(device, non_blocking=True))


@torch.inference_mode()
def embed_images(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    device: Optional[Union[str, torch.device]] = None,
) -> np.ndarray:
    """Flip-summed, L2-normalized embeddings ``(N, D)`` float32 of uint8 ``(N, 3, H, W)`` images.

    The model is put in eval mode for the call and returned to its previous mode.
    Pass the bare backbone, not a DDP wrapper: only one rank may be running this.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            batch = _normalize_pixels(images[start : start + batch_size], device)
            # Summing before normalizing weights both views by their norm, as insightface does.
            summed = model(batch).float() + model(torch.flip(batch, dims=[3])).float()
            chunks.append(torch.nn.functional.normalize(summed, dim=1).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("no images to embed")
    return torch.cat(chunks).numpy()


def evaluate_embeddings(
    embeddings: np.ndarray,
    issame: np.ndarray,
    num_folds: int = 10,
    fars: Iterable[float] = DEFAULT_FARS,
) -> Dict[str, float]:
    """Pair metrics from normalized embeddings laid out as pairs ``(2i, 2i+1)``.

    Keys: ``accuracy``, ``std`` (over folds), ``threshold`` (cosine; mean of the
    per-fold choices), and ``tar@far=1e-03`` ... for each FAR the negatives allow.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * len(issame):
        raise ValueError(
            f"expected {2 * len(issame)} embeddings for {len(issame)} pairs, got {embeddings.shape}"
        )
    scores = np.einsum("ij,ij->i", embeddings[0::2], embeddings[1::2])
    folds = kfold_threshold_accuracy(scores, issame, num_folds)
    result: Dict[str, float] = {
        "accuracy": folds.accuracy,
        "std": folds.std,
        "threshold": folds.threshold,
    }
    if np.any(issame) and not np.all(issame):
        for far, point in tar_at_far(scores, issame, fars).items():
            if point is not None:
                result[f"tar@far={format_far(far)}"] = point[0]
    return result


def evaluate_bin_sets(
    model: nn.Module,
    bin_paths: Sequence[PathLike],
    batch_size: int = 64,
    device: Optional[Union[str, torch.device]] = None,
    num_folds: int = 10,
    fars: Iterable[float] = DEFAULT_FARS,
    image_size: Tuple[int, int] = (112, 112),
) -> Dict[str, Dict[str, float]]:
    """Evaluate ``model`` on each ``.bin``: ``{set name: evaluate_embeddings(...)}``.

    Sets are loaded through ``load_bin`` (cached). Runs on the calling process only;
    the caller decides how the other ranks wait.
    """
    names = [set_name(path) for path in bin_paths]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"verification sets share a name {duplicates}: {list(map(os.fspath, bin_paths))}")
    results: Dict[str, Dict[str, float]] = {}
    for path in bin_paths:
        dataset = load_bin(path, image_size)
        embeddings = embed_images(model, dataset.images, batch_size, device)
        results[dataset.name] = evaluate_embeddings(embeddings, dataset.issame, num_folds, fars)
    return results


def format_results(results: Dict[str, Dict[str, float]]) -> str:
    """One line per set, e.g. ``lfw: accuracy 0.99683 +- 0.00296 threshold 0.2201 ...``."""
    lines = []
    for name, metrics in results.items():
        parts = [f"accuracy {metrics['accuracy']:.5f} +- {metrics['std']:.5f}",
                 f"threshold {metrics['threshold']:.4f}"]
        parts += [f"{key} {value:.5f}" for key, value in metrics.items() if key.startswith("tar@")]
        lines.append(f"{name}: " + " ".join(parts))
    return "\n".join(lines)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(name: Optional[str]) -> torch.device:
    """``--device``: None -> ``default_device()``; an unknown or unavailable device is a ValueError."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {name!r} is not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def check_output_folder(path: Optional[str], option: str) -> None:
    """Fail before the work, not after it, when a result file cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: output folder does not exist: {folder}")


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.eval.verification",
        description="Verification accuracy (10-fold, flip-summed embeddings) on .bin pair sets.",
    )
    parser.add_argument("checkpoint", help="run dir, checkpoints root, step dir, backbone.pt or "
                                           "consolidated checkpoint file")
    parser.add_argument("bins", nargs="+", help="verification .bin files (lfw.bin, cfp_fp.bin ...)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--folds", type=int, default=10, help="cross-validation folds (default 10)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    from partialfc.models import load_backbone  # deferred: the CLI is the only user

    # Everything that can be checked cheaply is checked before the model runs.
    names = [set_name(path) for path in args.bins]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"verification sets share a name {duplicates}: {args.bins}")
    for path in args.bins:
        if not os.path.exists(path):
            raise ValueError(f"verification set not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: a verification set must be a .bin file, not a directory")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output_folder(args.json, "--json")
    device = parse_device(args.device)
    model = load_backbone(args.checkpoint, map_location=device)
    results: Dict[str, Dict[str, float]] = {}
    for path in args.bins:  # each set's line as soon as it is known: a bad later set loses nothing
        result = evaluate_bin_sets(model, [path], args.batch_size, device, num_folds=args.folds)
        print(format_results(result), flush=True)
        results.update(result)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2, sort_keys=True))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from partialfc.eval.cli_errors import run_cli

    args = _parse_args(argv)
    return run_cli("verification", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
