"""Fused margin-softmax statistics in Triton: the B x k logit matrix never exists.

Same contract as ``margin_softmax_ref`` (read its docstring for the math). Layout:

* ``_row_inv_norm_kernel``: ``1 / max(||W[r]||, eps)`` of the kept rows, so the center
  shard is never copied or normalized in memory; cosines are ``(x . w) * inv_norm``.
* ``_forward_kernel``: grid (row blocks, class splits). Each program walks its class
  tiles; per tile it computes ``K`` dot products tiled over D (fp32 accumulate, inputs in
  the embeddings' dtype so fp16/bf16 hit tensor cores), keeps the max over sub-centers,
  applies the combined margin on the owned target column and folds the tile into a
  running row max / sum-exp. Each split writes one partial (max, sum-exp) per row; a
  tiny torch op merges the splits. Splitting the classes keeps the GPU busy when the
  batch has few row blocks but the shard has a million classes.
* ``_backward_kernel``: grid (row blocks, class tiles). Recomputes the tile, forms
  ``d cos = softmax * g_lse + onehot * g_target`` chained through the margin, routes it
  to the argmax sub-center and accumulates ``dX`` and ``d W_hat`` with atomics into
  fp32 buffers (``dW_hat`` holds only the kept rows: it becomes the sparse gradient).
* The ``w -> w / ||w||`` backward is a small chunked torch op on the kept rows.

The margin formula mirrors ``partialfc.head.margins.CombinedMargin`` (kind 0: plain /
CosFace, 1: ArcFace with its linear fallback, 2: SphereFace monotonic extension),
forward and derivative. There is no acos in Triton's core language and libdevice is not
available under TRITON_INTERPRET, so ``_acos`` is the Abramowitz-Stegun 4.4.46
polynomial (absolute error <= 2e-8 rad).

Tests run everything on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math
import os

import torch

from .margin_softmax_ref import (
    NORM_EPS,
    kept_rows,
    normalized_rows_backward,
    sparse_row_grad,
    validate_margin_softmax_inputs,
)

try:  # Triton is optional: without it only the torch paths exist.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["margin_softmax_stats_triton", "triton_available", "MARGIN_KIND"]

# Same clamp as margins.ACOS_EPS: keeps d acos / d cos finite.
_ACOS_EPS = 1e-7
MARGIN_KIND = {"plain": 0, "arcface": 1, "sphereface": 2}


def triton_available() -> bool:
    """True when triton imports (a GPU is still needed unless TRITON_INTERPRET=1)."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _acos(c):
        # Abramowitz-Stegun 4.4.46 on |c|, reflected for negative c.
        a = tl.abs(c)
        poly = -0.0012624911
        poly = poly * a + 0.0066700901
        poly = poly * a - 0.0170881256
        poly = poly * a + 0.0308918810
        poly = poly * a - 0.0501743046
        poly = poly * a + 0.0889789874
        poly = poly * a - 0.2145988016
        poly = poly * a + 1.5707963050
        half = tl.sqrt(1.0 - a) * poly
        return tl.where(c >= 0, half, 3.141592653589793 - half)

    @triton.jit
    def _margin_psi(c, m1, m2, cos_m2, sin_m2, arc_threshold, arc_fallback, MARGIN: tl.constexpr):
        """psi(cos) and d psi / d cos of CombinedMargin (before - m3 and * scale)."""
        if MARGIN == 0:
            psi = c
            slope = tl.full(c.shape, 1.0, tl.float32)
        else:
            lo = -1.0 + 1e-7
            hi = 1.0 - 1e-7
            clamped = tl.minimum(tl.maximum(c, lo), hi)
            # torch.clamp passes the gradient on the closed interval only.
            in_range = (c >= lo) & (c <= hi)
            sin_theta = tl.sqrt(1.0 - clamped * clamped)
            if MARGIN == 1:
                # cos(theta + m2) expanded, linear fallback past theta + m2 > pi.
                shifted = clamped * cos_m2 - sin_theta * sin_m2
                shifted_slope = tl.where(in_range, cos_m2 + clamped / sin_theta * sin_m2, 0.0)
                take = c > arc_threshold
                psi = tl.where(take, shifted, c - arc_fallback)
                slope = tl.where(take, shifted_slope, 1.0)
            else:
                angle = m1 * _acos(clamped) + m2
                k = tl.floor(angle / 3.141592653589793)
                sign = 1.0 - 2.0 * (k - 2.0 * tl.floor(k * 0.5))
                psi = sign * tl.cos(angle) - 2.0 * k
                # d angle / d cos = -m1 / sin(theta); d cos(angle) / d angle = -sin(angle).
                slope = tl.where(in_range, sign * tl.sin(angle) * m1 / sin_theta, 0.0)
        return psi, slope

    @triton.jit
    def _row_inv_norm_kernel(w_ptr, rows_ptr, out_ptr, num_rows, dim, stride_w,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < num_rows
        rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0)
        sq = tl.zeros((BLOCK_R,), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_r[:, None] & (offs_d < dim)[None, :]
            w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0)
            w = w.to(tl.float32)
            sq += tl.sum(w * w, axis=1)
        inv = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
        tl.store(out_ptr + offs_r, inv, mask=mask_r)

    @triton.jit
    def _load_d_slices(x_ptr, w_ptr, offs_b, mask_b, rows, mask_c, d0, dim, stride_x, stride_w,
                       BLOCK_D: tl.constexpr):
        """Columns [d0, d0 + BLOCK_D) of the embedding rows and of the gathered center rows."""
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        x = tl.load(x_ptr + offs_b[:, None] * stride_x + offs_d[None, :],
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :],
                    mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        return x, w, offs_d, mask_d

    @triton.jit
    def _cosine_tile(x_ptr, w_ptr, inv_norm_ptr, offs_b, mask_b, offs_c, mask_c, cls, dim,
                     stride_x, stride_w, NUM_SUB: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
        """Max over sub-centers of cos(x, w_hat) for a (rows x classes) tile, and its argmax."""
        best = tl.full((BLOCK_B, BLOCK_C), float("-inf"), tl.float32)
        best_sub = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
        for s in tl.static_range(NUM_SUB):
            rows = cls * NUM_SUB + s
            acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                x, w, offs_d, mask_d = _load_d_slices(x_ptr, w_ptr, offs_b, mask_b, rows, mask_c, d0, dim,
                                                      stride_x, stride_w, BLOCK_D)
                # W is rounded to the embeddings' dtype (AMP semantics), then fed to the dot.
                acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(x.dtype).to(DOT_DTYPE)), acc,
                             input_precision=DOT_PRECISION)
            inv = tl.load(inv_norm_ptr + offs_c * NUM_SUB + s, mask=mask_c, other=0.0)
            cos = acc * inv[None, :]
            better = cos > best  # strict: ties keep the first sub-center
            best = tl.where(better, cos, best)
            best_sub = tl.where(better, s, best_sub)
        return best, best_sub

    @triton.jit
    def _margined_logits(best, offs_c, mask_c, target, scale, m1, m2, m3, cos_m2, sin_m2,
                         arc_threshold, arc_fallback, MARGIN: tl.constexpr):
        """Scaled logits with the margin on the target column; masked columns are -inf."""
        is_target = (offs_c[None, :] == target[:, None]) & mask_c[None, :]
        cos_target = tl.sum(tl.where(is_target, best, 0.0), axis=1)
        psi, slope = _margin_psi(cos_target, m1, m2, cos_m2, sin_m2, arc_threshold, arc_fallback, MARGIN)
        target_logit = scale * (psi - m3)
        logits = tl.where(is_target, target_logit[:, None], scale * best)
        logits = tl.where(mask_c[None, :], logits, float("-inf"))
        return logits, is_target, target_logit, scale * slope

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, inv_norm_ptr, class_ptr, target_ptr,
                        part_max_ptr, part_sum_ptr, target_out_ptr,
                        batch, num_kept, dim, stride_x, stride_w, tiles_per_split,
                        scale, m1, m2, m3, cos_m2, sin_m2, arc_threshold, arc_fallback,
                        NUM_SUB: tl.constexpr, MARGIN: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
        pid_b = tl.program_id(0)
        split = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < batch
        target = tl.load(target_ptr + offs_b, mask=mask_b, other=-1)
        run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_B,), tl.float32)
        for t in range(0, tiles_per_split):
            offs_c = (split * tiles_per_split + t) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask_c = offs_c < num_kept
            cls = tl.load(class_ptr + offs_c, mask=mask_c, other=0)
            best, best_sub = _cosine_tile(x_ptr, w_ptr, inv_norm_ptr, offs_b, mask_b, offs_c, mask_c,
                                          cls, dim, stride_x, stride_w, NUM_SUB, BLOCK_B, BLOCK_C,
                                          BLOCK_D, DOT_DTYPE, DOT_PRECISION)
            logits, is_target, target_logit, _ = _margined_logits(
                best, offs_c, mask_c, target, scale, m1, m2, m3, cos_m2, sin_m2,
                arc_threshold, arc_fallback, MARGIN)
            # Online softmax. The first tile of a split always has a valid column, so
            # new_max is finite from then on and exp(-inf - new_max) = 0 for padding.
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
            # Exactly one tile of one split holds a row's target: a plain store, no race.
            owns = tl.sum(is_target.to(tl.int32), axis=1) > 0
            tl.store(target_out_ptr + offs_b, target_logit, mask=mask_b & owns)
        tl.store(part_max_ptr + split * batch + offs_b, run_max, mask=mask_b)
        tl.store(part_sum_ptr + split * batch + offs_b, run_sum, mask=mask_b)

    @triton.jit
    def _backward_kernel(x_ptr, w_ptr, inv_norm_ptr, class_ptr, target_ptr, lse_ptr,
                         grad_lse_ptr, grad_target_ptr, grad_x_ptr, grad_w_hat_ptr,
                         batch, num_kept, dim, stride_x, stride_w,
                         scale, m1, m2, m3, cos_m2, sin_m2, arc_threshold, arc_fallback,
                         NUM_SUB: tl.constexpr, MARGIN: tl.constexpr, BLOCK_B: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_b = offs_b < batch
        mask_c = offs_c < num_kept
        target = tl.load(target_ptr + offs_b, mask=mask_b, other=-1)
        lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
        grad_lse = tl.load(grad_lse_ptr + offs_b, mask=mask_b, other=0.0)
        grad_target = tl.load(grad_target_ptr + offs_b, mask=mask_b, other=0.0)
        cls = tl.load(class_ptr + offs_c, mask=mask_c, other=0)
        best, best_sub = _cosine_tile(x_ptr, w_ptr, inv_norm_ptr, offs_b, mask_b, offs_c, mask_c,
                                      cls, dim, stride_x, stride_w, NUM_SUB, BLOCK_B, BLOCK_C,
                                      BLOCK_D, DOT_DTYPE, DOT_PRECISION)
        logits, is_target, _, target_slope = _margined_logits(
            best, offs_c, mask_c, target, scale, m1, m2, m3, cos_m2, sin_m2,
            arc_threshold, arc_fallback, MARGIN)
        # d loss / d logit for an arbitrary upstream (g_lse, g_target).
        grad_logit = grad_lse[:, None] * tl.exp(logits - lse[:, None])
        grad_logit += tl.where(is_target, grad_target[:, None], 0.0)
        grad_cos = tl.where(is_target, grad_logit * target_slope[:, None], grad_logit * scale)
        grad_cos = tl.where(mask_b[:, None] & mask_c[None, :], grad_cos, 0.0)
        for s in tl.static_range(NUM_SUB):
            rows = cls * NUM_SUB + s
            inv = tl.load(inv_norm_ptr + offs_c * NUM_SUB + s, mask=mask_c, other=0.0)
            grad_cos_s = tl.where(best_sub == s, grad_cos, 0.0)  # argmax sub-center only
            for d0 in range(0, dim, BLOCK_D):
                x, w, offs_d, mask_d = _load_d_slices(x_ptr, w_ptr, offs_b, mask_b, rows, mask_c, d0, dim,
                                                      stride_x, stride_w, BLOCK_D)
                # Operands are rounded to the embeddings' dtype (as a tensor-core backward
                # does), then cast to DOT_DTYPE (the same dtype except in the interpreter).
                w = w.to(x.dtype).to(DOT_DTYPE)
                # cos = (x . w) * inv  =>  dX = (g * inv) @ W,  dW_hat = g^T @ X.
                scaled = (grad_cos_s * inv[None, :]).to(x.dtype).to(DOT_DTYPE)
                part_x = tl.dot(scaled, w, input_precision=DOT_PRECISION)
                tl.atomic_add(grad_x_ptr + offs_b[:, None] * dim + offs_d[None, :], part_x,
                              mask=mask_b[:, None] & mask_d[None, :])
                part_w = tl.dot(tl.trans(grad_cos_s).to(x.dtype).to(DOT_DTYPE), x.to(DOT_DTYPE),
                                input_precision=DOT_PRECISION)
                hat_rows = offs_c * NUM_SUB + s
                tl.atomic_add(grad_w_hat_ptr + hat_rows[:, None] * dim + offs_d[None, :], part_w,
                              mask=mask_c[:, None] & mask_d[None, :])


def _margin_args(margin):
    """(kind, scalar args) for the kernels, mirroring CombinedMargin.psi's branches."""
    if not margin.uses_angle:
        kind = MARGIN_KIND["plain"]
    elif margin.m1 == 1.0:
        kind = MARGIN_KIND["arcface"]
    else:
        kind = MARGIN_KIND["sphereface"]
    scalars = dict(
        scale=float(margin.scale), m1=float(margin.m1), m2=float(margin.m2), m3=float(margin.m3),
        cos_m2=math.cos(margin.m2), sin_m2=math.sin(margin.m2),
        arc_threshold=math.cos(math.pi - margin.m2), arc_fallback=margin.m2 * math.sin(margin.m2),
    )
    return kind, scalars


def _tile_config(device, batch, num_kept, dim, chunk_size):
    """Tile sizes and class splits. Interpreter: tiny tiles so tests cover many tiles."""
    if _interpreting() or device.type != "cuda":
        block_b, block_c, block_d, warps, target_programs = 16, 16, 16, 1, 4
    else:
        block_b, block_c, block_d, warps = 64, 128, 64, 8
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
            raise ValueError(f"triton chunk_size (class tile) must be a power of two >= 16, got {chunk_size!r}")
        block_c = chunk_size
    row_blocks = triton.cdiv(batch, block_b)
    num_tiles = max(1, triton.cdiv(num_kept, block_c))
    splits = min(num_tiles, max(1, triton.cdiv(target_programs, row_blocks)))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)  # every split starts on a valid tile
    return dict(block_b=block_b, block_c=block_c, block_d=block_d, warps=warps,
                row_blocks=row_blocks, num_tiles=num_tiles, splits=splits,
                tiles_per_split=tiles_per_split)


def _kept_inv_norm(weight, rows, block_d):
    inv_norm = torch.empty(rows.shape[0], dtype=torch.float32, device=weight.device)
    block_r = 16
    if rows.shape[0]:
        _row_inv_norm_kernel[(triton.cdiv(rows.shape[0], block_r),)](
            weight, rows, inv_norm, rows.shape[0], weight.shape[1], weight.stride(0),
            BLOCK_R=block_r, BLOCK_D=block_d)
    return inv_norm


def _dot_args(dtype):
    """DOT_DTYPE / DOT_PRECISION constexprs for embeddings of ``dtype``.

    fp32: exact ieee products (no tf32). fp16/bf16: tensor-core dots with fp32
    accumulation. Under TRITON_INTERPRET (triton 3.x, CPU) a bf16 ``tl.dot`` returns
    garbage because numpy has no bfloat16, so there the bf16-rounded operands are fed to
    an fp32 dot: every rounding step is kept, only the dot's own arithmetic is wider.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting()):
        return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    # input_precision only matters for fp32 operands: halves take the backend default.
    return dict(DOT_DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16, DOT_PRECISION=None)


class _TritonMarginSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size):
        x = embeddings.detach().contiguous()
        w = weight.detach()
        if w.stride(1) != 1:
            w = w.contiguous()
        batch, dim = x.shape
        num_kept = class_index.shape[0]
        class_index = class_index.contiguous()
        target_position = target_position.contiguous()
        cfg = _tile_config(x.device, batch, num_kept, dim, chunk_size)
        kind, scalars = _margin_args(margin)
        rows = kept_rows(class_index, num_subcenters)
        inv_norm = _kept_inv_norm(w, rows, cfg["block_d"])
        target_logit = torch.zeros(batch, dtype=torch.float32, device=x.device)
        if num_kept == 0 or batch == 0:
            lse = torch.full((batch,), float("-inf"), dtype=torch.float32, device=x.device)
        else:
            part_max = torch.empty(cfg["splits"], batch, dtype=torch.float32, device=x.device)
            part_sum = torch.empty_like(part_max)
            _forward_kernel[(cfg["row_blocks"], cfg["splits"])](
                x, w, inv_norm, class_index, target_position, part_max, part_sum, target_logit,
                batch, num_kept, dim, x.stride(0), w.stride(0), cfg["tiles_per_split"], **scalars,
                NUM_SUB=num_subcenters, MARGIN=kind, BLOCK_B=cfg["block_b"], BLOCK_C=cfg["block_c"],
                BLOCK_D=cfg["block_d"], **_dot_args(x.dtype), num_warps=cfg["warps"])
            # Merge the splits' partial statistics (every split saw >= 1 real class).
            row_max = part_max.amax(dim=0)
            lse = row_max + torch.log((part_sum * torch.exp(part_max - row_max)).sum(dim=0))
        ctx.save_for_backward(x, w, class_index, target_position, rows, inv_norm, lse)
        ctx.num_subcenters, ctx.margin, ctx.cfg = num_subcenters, margin, cfg
        ctx.embedding_dtype = embeddings.dtype
        return lse, target_logit

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        x, w, class_index, target_position, rows, inv_norm, lse = ctx.saved_tensors
        cfg, num_subcenters = ctx.cfg, ctx.num_subcenters
        batch, dim = x.shape
        num_kept = class_index.shape[0]
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float().contiguous()
        grad_target = torch.zeros_like(lse) if grad_target is None else grad_target.float().contiguous()
        grad_x = torch.zeros(batch, dim, dtype=torch.float32, device=x.device)
        grad_w_hat = torch.zeros(rows.shape[0], dim, dtype=torch.float32, device=x.device)
        if num_kept and batch:
            kind, scalars = _margin_args(ctx.margin)
            _backward_kernel[(cfg["row_blocks"], cfg["num_tiles"])](
                x, w, inv_norm, class_index, target_position, lse, grad_lse, grad_target,
                grad_x, grad_w_hat, batch, num_kept, dim, x.stride(0), w.stride(0), **scalars,
                NUM_SUB=num_subcenters, MARGIN=kind, BLOCK_B=cfg["block_b"], BLOCK_C=cfg["block_c"],
                BLOCK_D=cfg["block_d"], **_dot_args(x.dtype), num_warps=cfg["warps"])
        grad_embeddings = grad_x.to(ctx.embedding_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # Chain through the row normalization in place, in chunks (bounded temporaries).
            step = 65536
            for start in range(0, rows.shape[0], step):
                part = slice(start, start + step)
                grad_w_hat[part] = normalized_rows_backward(
                    w.index_select(0, rows[part]).float(), inv_norm[part], grad_w_hat[part])
            grad_weight = sparse_row_grad(rows, grad_w_hat, w)
        return grad_embeddings, grad_weight, None, None, None, None, None


def margin_softmax_stats_triton(
    embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size=None
):
    """Fused Triton ``(lse, target_logit)``; ``chunk_size`` overrides the class tile (power of 2)."""
    if triton is None:
        raise RuntimeError("margin_softmax_stats_triton needs the 'triton' package (pip install 'triton>=3.0')")
    validate_margin_softmax_inputs(embeddings, weight, class_index, target_position, num_subcenters, margin)
    if embeddings.dtype == torch.float64 or weight.dtype == torch.float64:
        raise TypeError("the Triton path takes float32/float16/bfloat16 inputs, not float64")
    if embeddings.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the Triton path needs CUDA tensors (got {embeddings.device}); set TRITON_INTERPRET=1 "
            "to run it on CPU for testing, or use impl='torch'"
        )
    return _TritonMarginSoftmax.apply(
        embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size
    )
