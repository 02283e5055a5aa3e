"""Partial FC class sampling: keep every positive, add random negatives.

With sample rate ``r`` a rank keeps ``max(#positives, round(r * n))`` of its ``n``
local classes: all classes that occur in the gathered labels (their logits carry the
loss) plus uniformly drawn others. Drawing is ``rand`` scores with positives forced
to the top, then ``topk`` -- a partial selection, not a sort of all ``n`` classes, and
unbiased over class ids. The kept ids are returned sorted so the positions of the
targets can be found with ``searchsorted``.
"""
from __future__ import annotations

import torch


def num_sampled(num_local: int, num_positive: int, sample_rate: float) -> int:
    """How many local classes are kept (never fewer than the positives, at least 1)."""
    return min(num_local, max(num_positive, int(round(sample_rate * num_local)), 1))


def sample_classes(
    positive_classes: torch.Tensor,
    num_local: int,
    sample_rate: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sorted int64 local class ids to keep.

    ``positive_classes``: unique local class ids present in the global batch.
    """
    device = positive_classes.device
    # .numel() of a unique() result is known on the host already: no extra sync.
    keep = num_sampled(num_local, positive_classes.numel(), sample_rate)
    if keep >= num_local:
        return torch.arange(num_local, device=device)
    scores = torch.rand(num_local, device=device, generator=generator)
    scores[positive_classes] = 2.0  # rand() < 1, so positives always win
    kept = torch.topk(scores, keep, sorted=False).indices
    return torch.sort(kept).values


def target_positions(
    labels: torch.Tensor, class_start: int, num_local: int, class_index: torch.Tensor
) -> torch.Tensor:
    """Position of each global label inside ``class_index``; -1 where another rank owns it."""
    local = labels - class_start
    owned = (local >= 0) & (local < num_local)
    positions = torch.searchsorted(class_index, local.clamp(0, num_local - 1))
    return torch.where(owned, positions, torch.full_like(positions, -1))
