"""What an inversion run leaves on disk: one PNG per target, a grid, a JSON report.

Images are converted from the backbone's normalized space back to pixels with
``pixel = x * 128 + 127.5``, rounded and clamped to [0, 255]. The whole output
directory is first written as a temporary sibling directory and renamed into
place at the end, so a killed run never leaves a half-written result that looks
complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
import torch

from partialfc.data.pixels import denormalize_pixels, normalize_pixels

PathLike = Union[str, os.PathLike]
GRID_FILENAME = "grid.png"
REPORT_FILENAME = "report.json"
GRID_PADDING = 2


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) normalized floats -> (B, H, W, 3) uint8 pixels."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    pixels = denormalize_pixels(images.detach().cpu())
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8_images(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) normalized floats: what a saved PNG feeds the backbone."""
    return normalize_pixels(torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2))


def make_grid(pixels: np.ndarray, columns: int = 8) -> np.ndarray:
    """Tile (B, H, W, 3) uint8 images row-major into one image with white padding."""
    if pixels.ndim != 4 or pixels.shape[0] == 0:
        raise ValueError(f"expected a non-empty (B, H, W, 3) array, got shape {pixels.shape}")
    count, height, width, channels = pixels.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    pad = GRID_PADDING
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = pad + row * (height + pad), pad + column * (width + pad)
        grid[top:top + height, left:left + width] = pixels[index]
    return grid


def image_filenames(labels: Sequence[str]) -> List[str]:
    """``000_class5.png``-style names: index first, so names stay unique and sorted."""
    return [f"{index:03d}_{label}.png" for index, label in enumerate(labels)]


def write_outputs(out_dir: PathLike, pixels: np.ndarray, filenames: Sequence[str], report: dict,
                  overwrite: bool = False) -> Path:
    """Write the PNGs, the grid and ``report.json`` to ``out_dir`` atomically; returns it.

    An existing non-empty ``out_dir`` is an error unless ``overwrite``; then it is
    replaced only after the new directory is complete.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    if len(filenames) != pixels.shape[0]:
        raise ValueError(f"{len(filenames)} file names for {pixels.shape[0]} images")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"--out {out_dir} already exists and is not empty (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name, image in zip(filenames, pixels):
            Image.fromarray(image).save(staging / name, format="PNG")
        Image.fromarray(make_grid(pixels)).save(staging / GRID_FILENAME, format="PNG")
        (staging / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n", encoding="ascii")
        _replace_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _replace_directory(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    # os.replace cannot put a directory over a non-empty one: move the old one aside first.
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, retired / out_dir.name)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)
