"""Image priors and the embedding loss of the inversion objective.

The objective per batch is

    mean_i (1 - cos(f(x_i), t_i))  +  w_bn * BN prior
      + w_tv * mean_i TV(x_i)  +  w_l2 * mean_i ||x_i||_2

The priors are norms over a whole image, not means over pixels (as in
DeepInversion), so their weights keep the familiar scale (TV 1e-3, L2 1e-4) and
stay meaningful next to a cosine loss in [0, 2]. Images here are in the
backbone's normalized space, ``(pixel - 127.5) / 128``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Per-image ``||dx||_2 + ||dy||_2`` of neighbour differences, shape (B,).

    Anisotropic L2 total variation: the L2 norm (over channels and positions) of
    the horizontal differences plus that of the vertical ones. Penalizes the
    high-frequency noise pixel optimization otherwise produces.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    horizontal = images[:, :, :, 1:] - images[:, :, :, :-1]
    vertical = images[:, :, 1:, :] - images[:, :, :-1, :]
    return (
        torch.linalg.vector_norm(horizontal.flatten(1), dim=1)
        + torch.linalg.vector_norm(vertical.flatten(1), dim=1)
    )


def l2_norm(images: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norm of the (normalized) pixels, shape (B,): keeps values bounded."""
    if images.dim() < 2:
        raise ValueError(f"images must have a batch dimension, got shape {tuple(images.shape)}")
    return torch.linalg.vector_norm(images.flatten(1), dim=1)


def cosine_to_targets(embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine between ``embeddings`` (B, D) and ``targets`` (B, D), shape (B,)."""
    if embeddings.shape != targets.shape or embeddings.dim() != 2:
        raise ValueError(
            f"embeddings and targets must both be (B, D), got {tuple(embeddings.shape)} "
            f"and {tuple(targets.shape)}"
        )
    return F.cosine_similarity(embeddings.float(), targets.float(), dim=1, eps=1e-12)


def cosine_matrix(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """All cosines between ``embeddings`` (B, D) and ``references`` (N, D), shape (B, N)."""
    return F.normalize(embeddings.float(), dim=1) @ F.normalize(references.float(), dim=1).t()
