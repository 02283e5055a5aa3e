"""Where the inversion targets come from: class centers, aligned images, .npy files.

Every target becomes one unit vector in the backbone's embedding space plus a
label for file names and the report:

- close-set, ``--classes``: the class centers of a checkpoint's head, gathered
  from all its shard files (``partialfc.checkpoint.load_centers``). With K > 1
  sub-centers a class has K directions; by default the target is the normalized
  mean of the normalized sub-centers. Which sub-center is dominant (nearest to
  most of the class's samples) is only known from training data, which inversion
  does not have; the mean is deterministic, lies where the sub-centers agree and
  so favours the majority direction when most sub-centers sit together. An
  explicit sub-center index (e.g. the dominant one reported by cleaning) can be
  chosen instead.
- open-set, ``--images``: the embedding of an aligned face image of the
  backbone's input size, computed as in verification (image plus its horizontal
  flip, summed), since the inversion itself sees flipped views.
- ``--embeddings FILE.npy``: rows of a float array (N, D) or one vector (D,).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PathLike = Union[str, os.PathLike]
SUBCENTER_MEAN = "mean"


@dataclass(frozen=True)
class Target:
    """One embedding to invert: ``vector`` is (D,), L2-normalized, float32 on CPU."""

    label: str
    kind: str  # "class" | "image" | "embedding"
    source: str
    vector: torch.Tensor
    class_id: Optional[int] = None


def parse_subcenter(value: str) -> Union[str, int]:
    """``"mean"`` or a non-negative sub-center index, from a command line string."""
    if value == SUBCENTER_MEAN:
        return SUBCENTER_MEAN
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"subcenter must be 'mean' or a sub-center index >= 0, got {value!r}") from None
    if index < 0:
        raise ValueError(f"subcenter must be 'mean' or a sub-center index >= 0, got {value!r}")
    return index


def pool_subcenters(centers: torch.Tensor, subcenter: Union[str, int] = SUBCENTER_MEAN) -> torch.Tensor:
    """(C, K, D) centers -> (C, D) unit vectors: the mean of normalized sub-centers or one index."""
    if centers.dim() != 3:
        raise ValueError(f"centers must be (num_classes, K, D), got shape {tuple(centers.shape)}")
    unit = F.normalize(centers.float(), dim=2)
    if subcenter == SUBCENTER_MEAN:
        pooled = unit.mean(dim=1)
    elif isinstance(subcenter, int) and not isinstance(subcenter, bool):
        if not 0 <= subcenter < centers.shape[1]:
            raise ValueError(
                f"subcenter index {subcenter} is out of range: the checkpoint has "
                f"K = {centers.shape[1]} sub-centers (valid 0..{centers.shape[1] - 1})"
            )
        pooled = unit[:, subcenter]
    else:
        raise ValueError(f"subcenter must be 'mean' or an int index, got {subcenter!r}")
    return F.normalize(pooled, dim=1)


def class_cosines(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B, D) embeddings vs (C, K, D) centers -> (B, C), max over sub-centers as the head pools."""
    unit_centers = F.normalize(centers.float(), dim=2)
    unit_embeddings = F.normalize(embeddings.float(), dim=1)
    return torch.einsum("bd,ckd->bck", unit_embeddings, unit_centers).amax(dim=2)


def class_targets(centers: torch.Tensor, class_ids: Sequence[int], subcenter: Union[str, int] = SUBCENTER_MEAN,
                  where: str = "checkpoint") -> List[Target]:
    """Targets for ``class_ids`` from the gathered (C, K, D) center matrix."""
    num_classes = centers.shape[0]
    for class_id in class_ids:
        if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < num_classes:
            raise ValueError(
                f"unknown class id {class_id!r}: {where} has {num_classes} classes (valid ids 0..{num_classes - 1})"
            )
    pooled = pool_subcenters(centers, subcenter)
    return [
        Target(label=f"class{class_id}", kind="class", source=f"{where} class {class_id}",
               vector=pooled[class_id].clone(), class_id=class_id)
        for class_id in class_ids
    ]


def read_aligned_image(path: PathLike, size: Tuple[int, int]) -> torch.Tensor:
    """An aligned face image as a uint8 (3, H, W) RGB tensor; its size must be ``size`` (H, W)."""
    from partialfc.data.decode import checked_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file does not exist: {path}")
    # The loaders' decoder rule: a decompression bomb is refused from its header.
    image = checked_image(path.read_bytes(), str(path), lambda opened: opened.convert("RGB"))
    height, width = size
    if image.size != (width, height):
        raise ValueError(
            f"{path}: image is {image.size[0]}x{image.size[1]} (width x height), the backbone expects "
            f"aligned {width}x{height} faces"
        )
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def image_targets(backbone: nn.Module, paths: Sequence[PathLike], size: Tuple[int, int]) -> List[Target]:
    """One target per aligned image file: its flip-summed embedding, exactly as verification embeds."""
    from partialfc.eval.verification import embed_images

    if not paths:
        return []
    images = torch.stack([read_aligned_image(path, size) for path in paths])
    embeddings = torch.from_numpy(embed_images(backbone, images, batch_size=32))
    return [
        Target(label=_safe_label(Path(path).stem), kind="image", source=str(path), vector=embeddings[index])
        for index, path in enumerate(paths)
    ]


def embedding_targets(path: PathLike, embedding_size: int) -> List[Target]:
    """One target per row of a .npy file holding (N, D) or (D,) floats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file does not exist: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a .npy array file: {err}") from err
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric (N, D) or (D,) array, got {array.dtype} {array.shape}")
    if array.shape[1] != embedding_size:
        raise ValueError(
            f"{path}: embeddings have D = {array.shape[1]}, the backbone's embedding size is {embedding_size}"
        )
    array = array.astype(np.float64)
    norms = np.linalg.norm(array, axis=1)
    bad = [int(row) for row in np.flatnonzero(~np.isfinite(norms) | (norms == 0))]
    if bad:
        raise ValueError(f"{path}: rows {bad[:10]} are zero or not finite")
    vectors = F.normalize(torch.from_numpy(array).float(), dim=1)
    stem = _safe_label(path.stem)
    return [
        Target(label=f"{stem}{row}", kind="embedding", source=f"{path} row {row}", vector=vectors[row])
        for row in range(vectors.shape[0])
    ]


def _safe_label(text: str) -> str:
    """A file-name friendly ASCII label."""
    cleaned = "".join(ch if (ch.isascii() and (ch.isalnum() or ch in "-_")) else "_" for ch in text)
    return cleaned[:48] or "target"
