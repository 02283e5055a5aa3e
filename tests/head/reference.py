"""An independent float64 full-softmax reference for the Partial FC head.

Written from the formulas in DESIGN.md section 1, without calling the package's
margin code: the margin is evaluated per family (ArcFace branch with its fallback,
SphereFace's psi by explicit interval index k, CosFace), all logits are
materialized, and torch autograd differentiates the plain cross-entropy.
"""
from __future__ import annotations

import math

import torch


def reference_psi(cos: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    if m1 == 1.0 and m2 == 0.0:
        return cos
    if m1 == 1.0:
        threshold = math.cos(math.pi - m2)
        return torch.where(cos > threshold, torch.cos(theta + m2), cos - m2 * math.sin(m2))
    angle = m1 * theta + m2
    out = torch.empty_like(cos)
    k_all = torch.div(angle, math.pi, rounding_mode="floor").detach()
    for k in torch.unique(k_all).tolist():
        mask = k_all == k
        out = torch.where(mask, ((-1) ** int(k)) * torch.cos(angle) - 2 * k, out)
    return out


def reference_loss(embeddings, labels, centers, num_subcenters, scale, m1, m2, m3):
    """Mean loss over the batch; centers is (C*K, D). Everything float64."""
    x = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = centers / centers.norm(dim=1, keepdim=True)
    cos = (x @ w.T).view(x.shape[0], -1, num_subcenters).amax(dim=2)
    rows = torch.arange(x.shape[0])
    target_cos = cos[rows, labels]
    logits = scale * cos
    target = scale * (reference_psi(target_cos, m1, m2) - m3)
    logits = logits.index_put((rows, labels), target)
    return torch.nn.functional.cross_entropy(logits, labels)
