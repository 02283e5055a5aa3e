"""Shared case builders for the margin-softmax tests (imported by the test modules here).

A case is one rank's view: embeddings (B, D) already L2-normalized, a raw center shard
of ``n * K`` rows, a sorted strict subset ``class_index`` of k kept classes, and target
positions with some rows' targets on another rank (-1). A few rows are steered close to
(cos ~ 0.9) or away from (cos ~ -0.9) their target center so every branch of the margin
(ArcFace fallback, SphereFace intervals k >= 2) is exercised, not only cos ~ 0.
"""
from __future__ import annotations

import os

# The Triton tests run under the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from partialfc.head.margins import CombinedMargin

MARGINS = {
    "arcface": CombinedMargin.preset("arcface"),
    "cosface": CombinedMargin.preset("cosface"),
    "sphereface": CombinedMargin.preset("sphereface"),
    "combined": CombinedMargin.preset("combined"),
}


def build_case(batch, num_local, num_kept, dim, num_subcenters, seed=0, all_off_rank=False):
    """Float64 case tensors plus random upstream gradients for (lse, target)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_local * num_subcenters, dim, generator=gen, dtype=torch.float64) * 0.3
    class_index = torch.randperm(num_local, generator=gen)[:num_kept].sort().values
    target_position = torch.randint(0, num_kept, (batch,), generator=gen)
    if all_off_rank:
        target_position.fill_(-1)
    else:
        target_position[torch.rand(batch, generator=gen) < 0.3] = -1
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    # Steer some rows toward (+) or away from (-) one sub-center of their target.
    for row in range(batch):
        if target_position[row] < 0 or row % 3 == 2:
            continue
        center = weight[class_index[target_position[row]] * num_subcenters + row % num_subcenters]
        direction = 1.0 if row % 3 == 0 else -1.0
        x[row] = direction * F.normalize(center, dim=0) * 4.0 + 0.3 * x[row] / dim ** 0.5 * 4.0
    embeddings = F.normalize(x, dim=1)
    grad_lse = torch.randn(batch, generator=gen, dtype=torch.float64)
    grad_target = torch.randn(batch, generator=gen, dtype=torch.float64)
    return dict(embeddings=embeddings, weight=weight, class_index=class_index,
                target_position=target_position, num_subcenters=num_subcenters,
                grad_lse=grad_lse, grad_target=grad_target)


def run_impl(fn, case, margin, dtype=torch.float64, weight_dtype=None, **kwargs):
    """Forward + backward with the case's upstream gradients; returns float64 results."""
    embeddings = case["embeddings"].to(dtype).detach().requires_grad_(True)
    weight = case["weight"].to(weight_dtype or dtype).detach().requires_grad_(True)
    lse, target = fn(embeddings, weight, case["class_index"], case["target_position"],
                     case["num_subcenters"], margin, **kwargs)
    torch.autograd.backward([lse, target], [case["grad_lse"].to(lse.dtype), case["grad_target"].to(target.dtype)])
    return dict(lse=lse.detach().double(), target=target.detach().double(),
                grad_x=embeddings.grad.double(), grad_w=weight.grad.to_dense().double(),
                raw_grad_x=embeddings.grad, raw_grad_w=weight.grad, out_dtype=lse.dtype)


def rounded_case(case, dtype, weight_dtype=None):
    """The case with inputs rounded to the tested dtypes, kept in float64 for the reference."""
    rounded = dict(case)
    rounded["embeddings"] = case["embeddings"].to(dtype).double()
    rounded["weight"] = case["weight"].to(weight_dtype or dtype).double()
    return rounded


def assert_close_scaled(name, got, want, rtol, atol=1e-6):
    """max |got - want| <= atol + rtol * max |want|: error relative to the tensor's scale."""
    err = (got - want).abs().max().item() if want.numel() else 0.0
    bound = atol + rtol * (want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"
