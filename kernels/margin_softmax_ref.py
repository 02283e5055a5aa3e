"""Torch implementations of the margin-softmax statistics: a chunked path and a naive one.

Both compute, for the kept classes of one rank (DESIGN.md sections 1-3),

    c[i, j]     = max_s cos(x_i, normalize(W[class_index[j] * K + s]))
    logit[i, j] = margin.target_logit(c) if j == target_position[i] else scale * c
    lse[i]      = logsumexp_j logit[i, j]
    target[i]   = logit[i, target_position[i]]  (0 where the target lives on another rank)

* ``margin_softmax_stats_torch`` is the CPU production path. It walks the classes in
  tiles of ``chunk_size``, folds each tile into a running max / sum-exp (online
  softmax) and, in backward, recomputes every tile from the saved ``lse``. Peak extra
  memory is about ``B * chunk_size * K`` floats; the ``B x k`` logit matrix never exists.
* ``margin_softmax_stats_naive`` materializes everything with plain autograd. It is the
  baseline for benchmarks and the reference for tests.

Arithmetic is float32 (float64 when the inputs are float64, for reference checks); the
embedding gradient comes back in the embeddings' dtype and the weight gradient is a
coalesced sparse COO tensor over the kept rows only, like ``F.embedding(sparse=True)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "margin_softmax_stats_naive",
    "margin_softmax_stats_torch",
    "validate_margin_softmax_inputs",
    "kept_rows",
    "normalized_rows_backward",
    "sparse_row_grad",
    "NORM_EPS",
]

# Same floor as F.normalize: rows with a smaller norm are divided by NORM_EPS instead.
NORM_EPS = 1e-12
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_margin_softmax_inputs(embeddings, weight, class_index, target_position, num_subcenters, margin):
    """Raise ValueError/TypeError naming the offending argument; returns nothing.

    Index values are range-checked only for CPU tensors: on CUDA that check would be a
    host sync in every step, and the head already validates labels before sampling.
    """
    if not hasattr(margin, "target_logit") or not hasattr(margin, "scale"):
        raise TypeError(f"margin must be a CombinedMargin, got {type(margin).__name__}")
    if isinstance(num_subcenters, bool) or not isinstance(num_subcenters, int) or num_subcenters < 1:
        raise ValueError(f"num_subcenters must be an int >= 1, got {num_subcenters!r}")
    for name, tensor in (("embeddings", embeddings), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {tensor.dtype}")
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings width {embeddings.shape[1]} != weight width {weight.shape[1]}"
        )
    if weight.shape[0] % num_subcenters != 0:
        raise ValueError(
            f"weight has {weight.shape[0]} rows, not a multiple of num_subcenters={num_subcenters}"
        )
    for name, tensor in (("class_index", class_index), ("target_position", target_position)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tensor.dim() != 1:
            got = f"{tensor.dtype} of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be a 1-D int64 tensor, got {got}")
    if target_position.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"target_position has {target_position.shape[0]} entries but embeddings has "
            f"{embeddings.shape[0]} rows"
        )
    devices = {t.device for t in (embeddings, weight, class_index, target_position)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if embeddings.device.type == "cpu":
        num_classes = weight.shape[0] // num_subcenters
        num_kept = class_index.shape[0]
        if num_kept and (int(class_index.min()) < 0 or int(class_index.max()) >= num_classes):
            raise ValueError(
                f"class_index values must be in [0, {num_classes}), got range "
                f"[{int(class_index.min())}, {int(class_index.max())}]"
            )
        if num_kept > 1 and bool((class_index[1:] <= class_index[:-1]).any()):
            raise ValueError("class_index must be sorted and unique")
        if target_position.numel() and (
            int(target_position.min()) < -1 or int(target_position.max()) >= num_kept
        ):
            raise ValueError(
                f"target_position values must be -1 or in [0, {num_kept}), got range "
                f"[{int(target_position.min())}, {int(target_position.max())}]"
            )


def kept_rows(class_index: torch.Tensor, num_subcenters: int) -> torch.Tensor:
    """Flat weight rows ``c*K + s`` of the kept classes, class-major (sorted if class_index is)."""
    offsets = torch.arange(num_subcenters, device=class_index.device, dtype=torch.int64)
    return (class_index[:, None] * num_subcenters + offsets).reshape(-1)


def normalized_rows_backward(rows_fp, inv_norm, grad_normalized):
    """Chain d/d(normalized row) through ``w / max(||w||, eps)`` back to the raw row.

    ``rows_fp`` are raw rows in the compute dtype, ``inv_norm = 1 / max(||w||, eps)``.
    Where the norm is above eps the Jacobian is ``(I - w_hat w_hat^T) / ||w||``; below it
    the division is by the constant eps, so the gradient is just scaled.
    """
    normalized = rows_fp * inv_norm[:, None]
    radial = (normalized * grad_normalized).sum(dim=1, keepdim=True)
    above_eps = (inv_norm < 1.0 / NORM_EPS)[:, None]
    return inv_norm[:, None] * (grad_normalized - torch.where(above_eps, normalized * radial, 0.0))


def sparse_row_grad(rows: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sparse COO gradient of ``weight`` holding ``values`` at sorted unique ``rows``."""
    return torch.sparse_coo_tensor(
        rows[None, :], values.to(weight.dtype), tuple(weight.shape), is_coalesced=True,
        check_invariants=False,  # rows come from kept_rows of a validated class_index
    )


def _compute_dtype(embeddings, weight):
    if torch.float64 in (embeddings.dtype, weight.dtype):
        return torch.float64
    return torch.float32


def _target_logit_slope(margin, cos_target):
    """d target_logit / d cos at ``cos_target``, by autograd through margins.py (one formula)."""
    with torch.enable_grad():
        cos_leaf = cos_target.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(margin.target_logit(cos_leaf).sum(), cos_leaf)
    return slope


def _tile_logits(x, weight, class_index_tile, local_target, num_subcenters, margin):
    """Logits of one class tile plus what backward needs to chain through it.

    ``local_target`` is ``target_position - tile_start``; a row owns a target in this
    tile where it lands in ``[0, m)``. The target column is replaced in place (gather /
    scatter, no host sync).
    """
    batch, num_tile = x.shape[0], class_index_tile.shape[0]
    rows = kept_rows(class_index_tile, num_subcenters)
    rows_fp = weight.index_select(0, rows).to(x.dtype)
    inv_norm = 1.0 / torch.linalg.vector_norm(rows_fp, dim=1).clamp_min(NORM_EPS)
    normalized = rows_fp * inv_norm[:, None]
    cos = (x @ normalized.T).view(batch, num_tile, num_subcenters)
    if num_subcenters == 1:
        pooled, best_sub = cos.squeeze(2), None
    else:
        pooled, best_sub = cos.max(dim=2)
    owned = (local_target >= 0) & (local_target < num_tile)
    column = local_target.clamp(0, num_tile - 1)[:, None]
    cos_target = pooled.gather(1, column).squeeze(1)
    target_logit = margin.target_logit(cos_target)
    logits = pooled.mul_(margin.scale) if num_subcenters == 1 else pooled * margin.scale
    if num_subcenters == 1:
        pooled = None  # aliased by logits now
    plain = logits.gather(1, column).squeeze(1)
    logits.scatter_(1, column, torch.where(owned, target_logit, plain)[:, None])
    return {
        "logits": logits, "best_sub": best_sub, "rows": rows, "rows_fp": rows_fp,
        "inv_norm": inv_norm, "normalized": normalized, "owned": owned, "column": column,
        "cos_target": cos_target, "target_logit": target_logit,
    }


class _ChunkedMarginSoftmax(torch.autograd.Function):
    """Online-softmax statistics over class tiles; backward recomputes each tile."""

    @staticmethod
    def forward(ctx, embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size):
        compute_dtype = _compute_dtype(embeddings, weight)
        x = embeddings.detach().to(compute_dtype)
        batch, num_kept = x.shape[0], class_index.shape[0]
        running_max = torch.full((batch,), float("-inf"), dtype=compute_dtype, device=x.device)
        running_sum = torch.zeros(batch, dtype=compute_dtype, device=x.device)
        target_logit = torch.zeros(batch, dtype=compute_dtype, device=x.device)
        for start in range(0, num_kept, chunk_size):
            tile = _tile_logits(
                x, weight.detach(), class_index[start:start + chunk_size],
                target_position - start, num_subcenters, margin,
            )
            logits = tile["logits"]
            new_max = torch.maximum(running_max, logits.amax(dim=1))
            # running_max starts at -inf; new_max is finite after the first (non-empty) tile.
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
                logits.sub_(new_max[:, None])
            ).sum(dim=1)
            running_max = new_max
            target_logit = torch.where(tile["owned"], tile["target_logit"], target_logit)
        lse = running_max + torch.log(running_sum)
        out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        ctx.save_for_backward(embeddings, weight, class_index, target_position, lse)
        ctx.num_subcenters, ctx.margin, ctx.chunk_size = num_subcenters, margin, chunk_size
        return lse.to(out_dtype), target_logit.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        embeddings, weight, class_index, target_position, lse = ctx.saved_tensors
        num_subcenters, margin, chunk_size = ctx.num_subcenters, ctx.margin, ctx.chunk_size
        compute_dtype = lse.dtype
        x = embeddings.detach().to(compute_dtype)
        batch, num_kept = x.shape[0], class_index.shape[0]
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(compute_dtype)
        grad_target = torch.zeros_like(lse) if grad_target is None else grad_target.to(compute_dtype)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if want_x else None
        grad_values = (
            torch.empty(num_kept * num_subcenters, x.shape[1], dtype=weight.dtype, device=x.device)
            if want_w else None
        )
        for start in range(0, num_kept, chunk_size):
            tile = _tile_logits(
                x, weight.detach(), class_index[start:start + chunk_size],
                target_position - start, num_subcenters, margin,
            )
            # d lse / d logit = softmax; d target / d logit = one-hot on the owned target.
            grad_logits = tile["logits"].sub_(lse[:, None]).exp_().mul_(grad_lse[:, None])
            column, owned = tile["column"], tile["owned"]
            grad_at_target = grad_logits.gather(1, column).squeeze(1) + torch.where(owned, grad_target, 0.0)
            slope = _target_logit_slope(margin, tile["cos_target"])
            grad_cos = grad_logits.mul_(margin.scale)
            grad_cos.scatter_(
                1, column,
                torch.where(owned, grad_at_target * slope, grad_at_target * margin.scale)[:, None],
            )
            num_tile = grad_cos.shape[1]
            if num_subcenters > 1:
                # Only the argmax sub-center of each (row, class) receives the gradient.
                grad_cos = torch.zeros(
                    batch, num_tile, num_subcenters, dtype=compute_dtype, device=x.device
                ).scatter_(2, tile["best_sub"][:, :, None], grad_cos[:, :, None])
                grad_cos = grad_cos.view(batch, num_tile * num_subcenters)
            if want_x:
                grad_x.addmm_(grad_cos, tile["normalized"])
            if want_w:
                grad_normalized = grad_cos.T @ x
                stop = start * num_subcenters + tile["rows"].shape[0]
                grad_values[start * num_subcenters:stop] = normalized_rows_backward(
                    tile["rows_fp"], tile["inv_norm"], grad_normalized
                )
        grad_embeddings = grad_x.to(embeddings.dtype) if want_x else None
        grad_weight = (
            sparse_row_grad(kept_rows(class_index, num_subcenters), grad_values, weight) if want_w else None
        )
        return grad_embeddings, grad_weight, None, None, None, None, None


def margin_softmax_stats_torch(
    embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size=8192
):
    """Chunked (online-softmax) ``(lse, target_logit)``; see the module docstring."""
    validate_margin_softmax_inputs(embeddings, weight, class_index, target_position, num_subcenters, margin)
    if chunk_size is None:
        chunk_size = 8192
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _ChunkedMarginSoftmax.apply(
        embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size
    )


def margin_softmax_stats_naive(
    embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size=None
):
    """Full-logit ``(lse, target_logit)`` with plain autograd; ``chunk_size`` is ignored."""
    validate_margin_softmax_inputs(embeddings, weight, class_index, target_position, num_subcenters, margin)
    compute_dtype = _compute_dtype(embeddings, weight)
    batch, num_kept = embeddings.shape[0], class_index.shape[0]
    rows = kept_rows(class_index, num_subcenters)
    centers = F.normalize(F.embedding(rows, weight, sparse=True).to(compute_dtype), dim=1, eps=NORM_EPS)
    cos = (embeddings.to(compute_dtype) @ centers.T).view(batch, num_kept, num_subcenters)
    # max (not amax): its backward routes the gradient to the one argmax sub-center.
    pooled = cos.max(dim=2).values
    owned = target_position >= 0
    column = target_position.clamp_min(0)[:, None]
    if num_kept == 0:
        lse = torch.full((batch,), float("-inf"), dtype=compute_dtype, device=embeddings.device)
        target = torch.zeros(batch, dtype=compute_dtype, device=embeddings.device)
    else:
        target_logit = margin.target_logit(pooled.gather(1, column).squeeze(1))
        logits = margin.scale * pooled
        logits = logits.scatter(
            1, column, torch.where(owned, target_logit, logits.gather(1, column).squeeze(1))[:, None]
        )
        lse = torch.logsumexp(logits, dim=1)
        target = torch.where(owned, target_logit, 0.0)
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    return lse.to(out_dtype), target.to(out_dtype)
