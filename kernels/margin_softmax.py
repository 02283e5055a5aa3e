"""Fused margin-softmax statistics in Triton: the B x k logit matrix never exists.

Same contract as ``margin_softmax_ref`` (read its docstring for the math). Layout:

* A tile is ``BLOCK_R`` center rows: ``BLOCK_C = BLOCK_R // K_PAD`` kept classes times
  their sub-centers (``K_PAD`` = K rounded up to a power of two; padded rows are masked),
  so a tile's operands and accumulators are the same size for K = 1 and K = 3. The max
  over sub-centers is a reshape of the (rows x center rows) cosines to
  (rows, classes, K_PAD) and a reduction over the last axis.
* ``_row_inv_norm_kernel``: ``1 / max(||W[r]||, eps)`` of the kept rows, so the center
  shard is never copied or normalized in memory; cosines are ``(x . w) * inv_norm``,
  with the dot tiled over D (``BLOCK_D``) and accumulated in fp32.
* ``_forward_kernel``: grid (row blocks, class splits). A program walks the tiles of
  its split, takes the max over sub-centers, applies the combined margin on the owned
  target column and folds the tile into a running row max / sum-exp. Each split writes
  one partial (max, sum-exp) per row, merged by a tiny torch op. Splits are contiguous
  class ranges chosen so (row blocks x splits) fills the GPU.
* Backward: two kernels and no atomics (the split of dQ and dK/dV in flash-attention-2's
  Triton tutorial). Both recompute the tile from the saved ``lse`` and form
  ``d cos = softmax * g_lse + onehot * g_target`` chained through the margin, routed to
  the argmax sub-center.
  - ``_backward_dx_kernel``: same grid as the forward. dX of the row block accumulates
    in registers over the split's tiles at full width (``D_PAD``, the next power of two
    of D, masked; like flash-attention's HEAD_DIM) and is stored once into a
    ``[splits, B, D]`` fp32 buffer that torch sums. The writes into dX no longer grow
    with the class count (the previous kernel atomically added a ``B x D`` block per
    class tile), and the buffer is capped at ``margin_softmax_tiles.DX_PARTIAL_BYTES``.
  - ``_backward_dw_kernel``: grid (class tiles). A program loops over all row blocks
    accumulating ``G = g^T X`` for its center rows in registers, then chains through
    the row normalization in place (``d w = inv * G - inv^2 * (sum_b g * cos) * w``)
    and stores the gradient rows once, in the weight's dtype: no dW atomics and no
    fp32 copy of the gradient rows.
  The price: the tile logits are recomputed twice in backward (4 GEMM-equivalents
  instead of 3 for a one-pass kernel with atomics), so at most 3/5 of the GEMM work of
  forward + backward is "useful" in the TFLOP/s the benchmark reports.
* Tile sizes (``margin_softmax_tiles.py``): on CUDA ``triton.autotune`` over short
  candidate lists (keyed on D, K and the dtypes), pruned by a register estimate
  calibrated with ptxas (``benchmarks/kernel.py --compile-check sm_90``); an explicit
  ``chunk_size`` (classes per tile) pins the tile instead. Under TRITON_INTERPRET the tiles are fixed and tiny
  (16 rows, 16 columns of D) so the CPU tests cover many tiles, splits and partial blocks.

The margin formula mirrors ``partialfc.head.margins.CombinedMargin`` (kind 0: plain /
CosFace, 1: ArcFace with its linear fallback, 2: SphereFace monotonic extension),
forward and derivative. There is no acos in Triton's core language and libdevice is not
available under TRITON_INTERPRET, so acos is the Abramowitz-Stegun 4.4.46 polynomial
(absolute error <= 2e-8 rad).

Tests run everything on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from . import margin_softmax_tiles as tiles
from .margin_softmax_ref import kept_rows, sparse_row_grad, validate_margin_softmax_inputs

try:  # Triton is optional: without it only the torch paths exist.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["margin_softmax_stats_triton", "triton_available", "MARGIN_KIND"]

MARGIN_KIND = {"plain": 0, "arcface": 1, "sphereface": 2}


def triton_available() -> bool:
    """True when triton imports (a GPU is still needed unless TRITON_INTERPRET=1)."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

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
    def _center_rows(class_ptr, inv_norm_ptr, tile_start, tile_stop, NUM_SUB: tl.constexpr,
                     K_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
        """The center rows of kept classes [tile_start, tile_stop), class-major.

        Row ``i`` of the tile is sub-center ``i % K_PAD`` of kept class ``tile_start + i // K_PAD``;
        padding rows (sub-center >= K or class >= tile_stop) are masked, with inv 0.
        Returns the weight row, the kept row (gradient row), 1/||w|| and the row mask.
        """
        offs_r = tl.arange(0, BLOCK_R)
        position = tile_start + offs_r // K_PAD
        sub = offs_r % K_PAD
        valid = (position < tile_stop) & (sub < NUM_SUB)
        cls = tl.load(class_ptr + position, mask=valid, other=0)
        kept_row = position.to(tl.int64) * NUM_SUB + sub
        inv = tl.load(inv_norm_ptr + kept_row, mask=valid, other=0.0)
        return cls * NUM_SUB + sub, kept_row, inv, valid

    @triton.jit
    def _tile_dots(x_ptr, offs_b, mask_b, stride_x, w_ptr, w_row, valid_r, stride_w, dim,
                   BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """x . w for a (rows x center rows) tile, fp32, tiled over D (0 on padding)."""
        acc = tl.zeros((BLOCK_B, BLOCK_R), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < dim
            x = tl.load(x_ptr + offs_b[:, None] * stride_x + offs_d[None, :],
                        mask=mask_b[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(w_ptr + w_row[:, None] * stride_w + offs_d[None, :],
                        mask=valid_r[:, None] & mask_d[None, :], other=0.0)
            # W is rounded to the embeddings' dtype (AMP semantics), then fed to the dot.
            acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(x.dtype).to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _pool_subcenters(cos, valid_r, NUM_SUB: tl.constexpr, K_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
                         BLOCK_R: tl.constexpr):
        """Max over each class's sub-centers [BLOCK_B, BLOCK_C] and the first argmax."""
        BLOCK_C: tl.constexpr = BLOCK_R // K_PAD
        if NUM_SUB == 1:
            return cos, tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
        grouped = tl.reshape(tl.where(valid_r[None, :], cos, float("-inf")), (BLOCK_B, BLOCK_C, K_PAD))
        best = tl.max(grouped, axis=2)
        sub = tl.arange(0, K_PAD)[None, None, :]
        # Ties keep the first sub-center (like torch.max), so the gradient has one target.
        best_sub = tl.min(tl.where(grouped == best[:, :, None], sub, K_PAD), axis=2)
        return best, best_sub

    @triton.jit
    def _margined_logits(best, position, mask_c, target, scale, m1, m2, m3, cos_m2, sin_m2,
                         arc_threshold, arc_fallback, MARGIN: tl.constexpr):
        """Scaled logits with the margin on the target column (masked columns are -inf),
        the target mask and logit, and d target_logit / d cos.

        psi(cos) and its slope mirror CombinedMargin.psi (before - m3 and * scale). The
        margin math is written inline rather than in helpers: under TRITON_INTERPRET every
        device-function call re-patches triton.language (~ms each), per tile.
        """
        is_target = (position[None, :] == target[:, None]) & mask_c[None, :]
        c = tl.sum(tl.where(is_target, best, 0.0), axis=1)
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
                # acos by Abramowitz-Stegun 4.4.46 on |c|, reflected for negative c.
                a = tl.abs(clamped)
                poly = -0.0012624911
                poly = poly * a + 0.0066700901
                poly = poly * a - 0.0170881256
                poly = poly * a + 0.0308918810
                poly = poly * a - 0.0501743046
                poly = poly * a + 0.0889789874
                poly = poly * a - 0.2145988016
                poly = poly * a + 1.5707963050
                half = tl.sqrt(1.0 - a) * poly
                theta = tl.where(clamped >= 0, half, 3.141592653589793 - half)
                angle = m1 * theta + m2
                k = tl.floor(angle / 3.141592653589793)
                sign = 1.0 - 2.0 * (k - 2.0 * tl.floor(k * 0.5))
                psi = sign * tl.cos(angle) - 2.0 * k
                # d angle / d cos = -m1 / sin(theta); d cos(angle) / d angle = -sin(angle).
                slope = tl.where(in_range, sign * tl.sin(angle) * m1 / sin_theta, 0.0)
        target_logit = scale * (psi - m3)
        logits = tl.where(is_target, target_logit[:, None], scale * best)
        logits = tl.where(mask_c[None, :], logits, float("-inf"))
        return logits, is_target, target_logit, scale * slope

    @triton.jit
    def _tile_grad(x_ptr, offs_b, mask_b, stride_x, w_ptr, w_row, inv, valid_r, stride_w, dim,
                   tile_start, tile_stop, target, lse, grad_lse, grad_target,
                   scale, m1, m2, m3, cos_m2, sin_m2, arc_threshold, arc_fallback,
                   NUM_SUB: tl.constexpr, K_PAD: tl.constexpr, MARGIN: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
        """d loss / d cos of every center row of the tile [BLOCK_B, BLOCK_R], and the cosines."""
        BLOCK_C: tl.constexpr = BLOCK_R // K_PAD
        cos = _tile_dots(x_ptr, offs_b, mask_b, stride_x, w_ptr, w_row, valid_r, stride_w, dim,
                         BLOCK_B, BLOCK_R, BLOCK_D, DOT_DTYPE, DOT_PRECISION) * inv[None, :]
        best, best_sub = _pool_subcenters(cos, valid_r, NUM_SUB, K_PAD, BLOCK_B, BLOCK_R)
        position = tile_start + tl.arange(0, BLOCK_C)
        mask_c = position < tile_stop
        logits, is_target, _, target_slope = _margined_logits(
            best, position, mask_c, target, scale, m1, m2, m3, cos_m2, sin_m2,
            arc_threshold, arc_fallback, MARGIN)
        # d loss / d logit for an arbitrary upstream (g_lse, g_target).
        grad_logit = grad_lse[:, None] * tl.exp(logits - lse[:, None])
        grad_logit += tl.where(is_target, grad_target[:, None], 0.0)
        grad_cos = tl.where(is_target, grad_logit * target_slope[:, None], grad_logit * scale)
        grad_cos = tl.where(mask_b[:, None] & mask_c[None, :], grad_cos, 0.0)
        if NUM_SUB > 1:
            # Only the argmax sub-center of each (row, class) receives the gradient.
            sub = tl.arange(0, K_PAD)[None, None, :]
            grad_cos = tl.reshape(tl.where(sub == best_sub[:, :, None], grad_cos[:, :, None], 0.0),
                                  (BLOCK_B, BLOCK_R))
        return grad_cos, cos

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, inv_norm_ptr, class_ptr, target_ptr,
                        part_max_ptr, part_sum_ptr, target_out_ptr,
                        batch, num_kept, dim, stride_x, stride_w, classes_per_split,
                        scale, m1, m2, m3, cos_m2, sin_m2, arc_threshold, arc_fallback,
                        NUM_SUB: tl.constexpr, K_PAD: tl.constexpr, MARGIN: tl.constexpr,
                        D_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        BLOCK_C: tl.constexpr = BLOCK_R // K_PAD
        split = tl.program_id(1)
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < batch
        target = tl.load(target_ptr + offs_b, mask=mask_b, other=-1)
        split_start = split * classes_per_split
        split_stop = tl.minimum(split_start + classes_per_split, num_kept)
        run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_B,), tl.float32)
        for tile_start in range(split_start, split_stop, BLOCK_C):
            w_row, _, inv, valid_r = _center_rows(class_ptr, inv_norm_ptr, tile_start, split_stop,
                                                  NUM_SUB, K_PAD, BLOCK_R)
            cos = _tile_dots(x_ptr, offs_b, mask_b, stride_x, w_ptr, w_row, valid_r, stride_w, dim,
                             BLOCK_B, BLOCK_R, BLOCK_D, DOT_DTYPE, DOT_PRECISION) * inv[None, :]
            best, _ = _pool_subcenters(cos, valid_r, NUM_SUB, K_PAD, BLOCK_B, BLOCK_R)
            position = tile_start + tl.arange(0, BLOCK_C)
            logits, is_target, target_logit, _ = _margined_logits(
                best, position, position < split_stop, target, scale, m1, m2, m3, cos_m2, sin_m2,
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
    def _backward_dx_kernel(x_ptr, w_ptr, inv_norm_ptr, class_ptr, target_ptr, lse_ptr,
                            grad_lse_ptr, grad_target_ptr, partial_dx_ptr,
                            batch, num_kept, dim, stride_x, stride_w, classes_per_split,
                            scale, m1, m2, m3, cos_m2, sin_m2, arc_threshold, arc_fallback,
                            NUM_SUB: tl.constexpr, K_PAD: tl.constexpr, MARGIN: tl.constexpr,
                            D_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        BLOCK_C: tl.constexpr = BLOCK_R // K_PAD
        split = tl.program_id(1)
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < batch
        target = tl.load(target_ptr + offs_b, mask=mask_b, other=-1)
        lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
        grad_lse = tl.load(grad_lse_ptr + offs_b, mask=mask_b, other=0.0)
        grad_target = tl.load(grad_target_ptr + offs_b, mask=mask_b, other=0.0)
        split_start = split * classes_per_split
        split_stop = tl.minimum(split_start + classes_per_split, num_kept)
        offs_d = tl.arange(0, D_PAD)
        mask_d = offs_d < dim
        x_dtype = x_ptr.dtype.element_ty
        grad_x = tl.zeros((BLOCK_B, D_PAD), tl.float32)
        for tile_start in range(split_start, split_stop, BLOCK_C):
            w_row, _, inv, valid_r = _center_rows(class_ptr, inv_norm_ptr, tile_start, split_stop,
                                                  NUM_SUB, K_PAD, BLOCK_R)
            grad_cos, _ = _tile_grad(x_ptr, offs_b, mask_b, stride_x, w_ptr, w_row, inv, valid_r, stride_w, dim,
                                     tile_start, split_stop, target, lse, grad_lse, grad_target,
                                     scale, m1, m2, m3, cos_m2, sin_m2, arc_threshold, arc_fallback,
                                     NUM_SUB, K_PAD, MARGIN, BLOCK_B, BLOCK_R, BLOCK_D, DOT_DTYPE, DOT_PRECISION)
            # cos = (x . w) * inv  =>  dX = (g * inv) @ W, W at full width. Operands are
            # rounded to the embeddings' dtype as a tensor-core backward does.
            w = tl.load(w_ptr + w_row[:, None] * stride_w + offs_d[None, :],
                        mask=valid_r[:, None] & mask_d[None, :], other=0.0)
            scaled = (grad_cos * inv[None, :]).to(x_dtype).to(DOT_DTYPE)
            grad_x = tl.dot(scaled, w.to(x_dtype).to(DOT_DTYPE), grad_x, input_precision=DOT_PRECISION)
        out = partial_dx_ptr + split.to(tl.int64) * batch * dim + offs_b[:, None] * dim + offs_d[None, :]
        tl.store(out, grad_x, mask=mask_b[:, None] & mask_d[None, :])

    @triton.jit
    def _backward_dw_kernel(x_ptr, w_ptr, inv_norm_ptr, class_ptr, target_ptr, lse_ptr,
                            grad_lse_ptr, grad_target_ptr, grad_w_ptr,
                            batch, num_kept, dim, stride_x, stride_w,
                            scale, m1, m2, m3, cos_m2, sin_m2, arc_threshold, arc_fallback,
                            NUM_SUB: tl.constexpr, K_PAD: tl.constexpr, MARGIN: tl.constexpr,
                            D_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        BLOCK_C: tl.constexpr = BLOCK_R // K_PAD
        tile_start = tl.program_id(0) * BLOCK_C
        w_row, kept_row, inv, valid_r = _center_rows(class_ptr, inv_norm_ptr, tile_start, num_kept,
                                                     NUM_SUB, K_PAD, BLOCK_R)
        offs_d = tl.arange(0, D_PAD)
        mask_d = offs_d < dim
        grad_hat = tl.zeros((BLOCK_R, D_PAD), tl.float32)  # g^T X = ||w|| * d loss / d w_hat
        radial = tl.zeros((BLOCK_R,), tl.float32)  # sum_b g * cos = w_hat . d loss / d w_hat
        for row_start in range(0, batch, BLOCK_B):
            offs_b = row_start + tl.arange(0, BLOCK_B)
            mask_b = offs_b < batch
            target = tl.load(target_ptr + offs_b, mask=mask_b, other=-1)
            lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
            grad_lse = tl.load(grad_lse_ptr + offs_b, mask=mask_b, other=0.0)
            grad_target = tl.load(grad_target_ptr + offs_b, mask=mask_b, other=0.0)
            grad_cos, cos = _tile_grad(x_ptr, offs_b, mask_b, stride_x, w_ptr, w_row, inv, valid_r, stride_w, dim,
                                       tile_start, num_kept, target, lse, grad_lse, grad_target,
                                       scale, m1, m2, m3, cos_m2, sin_m2, arc_threshold, arc_fallback,
                                       NUM_SUB, K_PAD, MARGIN, BLOCK_B, BLOCK_R, BLOCK_D, DOT_DTYPE, DOT_PRECISION)
            radial += tl.sum(grad_cos * cos, axis=0)
            x = tl.load(x_ptr + offs_b[:, None] * stride_x + offs_d[None, :],
                        mask=mask_b[:, None] & mask_d[None, :], other=0.0)
            grad_hat = tl.dot(tl.trans(grad_cos.to(x.dtype).to(DOT_DTYPE)), x.to(DOT_DTYPE), grad_hat,
                              input_precision=DOT_PRECISION)
        # w_hat = w * inv (inv = 1/max(||w||, eps)): d w = inv * (G - w_hat (w_hat . G)) with
        # G = g^T X, i.e. inv * G - inv^2 * radial * w; below eps the division is by a
        # constant and only inv * G remains. w is taken as stored (not rounded).
        w = tl.load(w_ptr + w_row[:, None] * stride_w + offs_d[None, :],
                    mask=valid_r[:, None] & mask_d[None, :], other=0.0)
        radial_coef = tl.where(inv < 1e12, inv * inv * radial, 0.0)
        grad_w = grad_hat * inv[:, None] - radial_coef[:, None] * w.to(tl.float32)
        tl.store(grad_w_ptr + kept_row[:, None] * dim + offs_d[None, :], grad_w.to(grad_w_ptr.dtype.element_ty),
                 mask=valid_r[:, None] & mask_d[None, :])

# ---------------------------------------------------------------- launch plan
def _plan(device, batch, num_kept, dim, num_subcenters, chunk_size):
    """Constexprs, fixed tiles (None = autotune) and the class splits of one call."""
    k_pad = triton.next_power_of_2(num_subcenters)
    consts = dict(NUM_SUB=num_subcenters, K_PAD=k_pad, D_PAD=max(16, triton.next_power_of_2(dim)))
    interpreting = _interpreting() or device.type != "cuda"
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
            raise ValueError(f"triton chunk_size (classes per tile) must be a power of two >= 16, got {chunk_size!r}")
        blocks = dict(tiles.INTERPRET_BLOCKS if interpreting else tiles.EXPLICIT_CHUNK_BLOCKS,
                      BLOCK_R=chunk_size * k_pad)
    elif interpreting:
        blocks = dict(tiles.INTERPRET_BLOCKS, BLOCK_R=max(tiles.INTERPRET_BLOCKS["BLOCK_R"], k_pad))
    else:
        blocks = None
    if interpreting:
        splits, classes_per_split = tiles.split_plan(batch, num_kept, dim, 4, 16, 1)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits, classes_per_split = tiles.split_plan(batch, num_kept, dim, 4 * sms, 64, 512)
    return dict(consts=consts, blocks=blocks, splits=splits, classes_per_split=classes_per_split)


if triton is not None:
    def _tuned(kernel, candidates, full_width):
        configs = [triton.Config(dict(BLOCK_B=b, BLOCK_R=r, BLOCK_D=d), num_warps=w, num_stages=s)
                   for b, r, d, w, s in candidates]
        prune = functools.partial(tiles.prune_configs, full_width=full_width)
        return triton.autotune(configs=configs, key=["dim", "NUM_SUB"], prune_configs_by={"early_config_prune": prune})(kernel)

    # Every launch of these kernels only stores (no accumulation into inputs), so
    # autotune may run them repeatedly without resetting any buffer.
    _KERNELS = {
        "forward": (_forward_kernel, _tuned(_forward_kernel, tiles.FORWARD_CANDIDATES, "none")),
        "dx": (_backward_dx_kernel, _tuned(_backward_dx_kernel, tiles.DX_CANDIDATES, "dx")),
        "dw": (_backward_dw_kernel, _tuned(_backward_dw_kernel, tiles.DW_CANDIDATES, "dw")),
    }


def _launch(name, plan, grid, *args, **constexprs):
    """Run kernel ``name`` with the plan's fixed tiles, or through its autotuner (CUDA default)."""
    plain, tuned = _KERNELS[name]
    if plan["blocks"] is None:
        tuned[grid](*args, **plan["consts"], **constexprs)
    else:
        plain[grid(plan["blocks"])](*args, **plan["consts"], **constexprs, **plan["blocks"], num_warps=8)


# ---------------------------------------------------------------- host side
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


def _kept_inv_norm(weight, rows):
    inv_norm = torch.empty(rows.shape[0], dtype=torch.float32, device=weight.device)
    block_r, block_d = 16, min(128, max(16, triton.next_power_of_2(weight.shape[1])))
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
        plan = _plan(x.device, batch, num_kept, dim, num_subcenters, chunk_size)
        kind, scalars = _margin_args(margin)
        rows = kept_rows(class_index, num_subcenters)
        inv_norm = _kept_inv_norm(w, rows)
        target_logit = torch.zeros(batch, dtype=torch.float32, device=x.device)
        if num_kept == 0 or batch == 0:
            lse = torch.full((batch,), float("-inf"), dtype=torch.float32, device=x.device)
        else:
            part_max = torch.empty(plan["splits"], batch, dtype=torch.float32, device=x.device)
            part_sum = torch.empty_like(part_max)
            _launch("forward", plan, lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), plan["splits"]),
                    x, w, inv_norm, class_index, target_position, part_max, part_sum, target_logit,
                    batch, num_kept, dim, x.stride(0), w.stride(0), plan["classes_per_split"], **scalars,
                    MARGIN=kind, **_dot_args(x.dtype))
            # Merge the splits' partial statistics (every split saw >= 1 real class).
            row_max = part_max.amax(dim=0)
            lse = row_max + torch.log((part_sum * torch.exp(part_max - row_max)).sum(dim=0))
        ctx.save_for_backward(x, w, class_index, target_position, rows, inv_norm, lse)
        ctx.num_subcenters, ctx.margin, ctx.plan = num_subcenters, margin, plan
        ctx.embedding_dtype = embeddings.dtype
        return lse, target_logit

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        x, w, class_index, target_position, rows, inv_norm, lse = ctx.saved_tensors
        plan = ctx.plan
        batch, dim = x.shape
        num_kept = class_index.shape[0]
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float().contiguous()
        grad_target = torch.zeros_like(lse) if grad_target is None else grad_target.float().contiguous()
        kind, scalars = _margin_args(ctx.margin)
        common = (x, w, inv_norm, class_index, target_position, lse, grad_lse, grad_target)
        constexprs = dict(MARGIN=kind, **_dot_args(x.dtype))
        work = num_kept > 0 and batch > 0
        grad_embeddings = grad_weight = None
        if ctx.needs_input_grad[0]:
            if work:
                partial = torch.empty(plan["splits"], batch, dim, dtype=torch.float32, device=x.device)
                _launch("dx", plan, lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), plan["splits"]),
                        *common, partial, batch, num_kept, dim, x.stride(0), w.stride(0),
                        plan["classes_per_split"], **scalars, **constexprs)
                grad_x = partial[0] if plan["splits"] == 1 else partial.sum(dim=0)
            else:
                grad_x = torch.zeros(batch, dim, dtype=torch.float32, device=x.device)
            grad_embeddings = grad_x.to(ctx.embedding_dtype)
        if ctx.needs_input_grad[1]:
            # Every kept row is written by exactly one dW program, in the weight's dtype.
            grad_values = (torch.empty if work else torch.zeros)(rows.shape[0], dim, dtype=w.dtype, device=x.device)
            if work:
                k_pad = plan["consts"]["K_PAD"]
                _launch("dw", plan, lambda meta: (triton.cdiv(num_kept, meta["BLOCK_R"] // k_pad),),
                        *common, grad_values, batch, num_kept, dim, x.stride(0), w.stride(0),
                        **scalars, **constexprs)
            grad_weight = sparse_row_grad(rows, grad_values, w)
        return grad_embeddings, grad_weight, None, None, None, None, None


def validate_triton_path_inputs(path: str, function: str, embeddings, weight, class_index, target_position,
                                num_subcenters, margin) -> None:
    """The checks every Triton-backed path makes before any work: triton importable, the
    common argument checks, no float64, CUDA tensors (or the interpreter, for tests)."""
    if not triton_available():
        raise RuntimeError(f"{function} needs the 'triton' package (pip install 'triton>=3.0')")
    validate_margin_softmax_inputs(embeddings, weight, class_index, target_position, num_subcenters, margin)
    if embeddings.dtype == torch.float64 or weight.dtype == torch.float64:
        raise TypeError(f"the {path} path takes float32/float16/bfloat16 inputs, not float64")
    if embeddings.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the {path} path needs CUDA tensors (got {embeddings.device}); set TRITON_INTERPRET=1 "
            "to run it on CPU for testing, or use impl='torch'"
        )


def margin_softmax_stats_triton(
    embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size=None
):
    """Fused Triton ``(lse, target_logit)``; ``chunk_size``: classes per tile (a power of 2 >= 16)."""
    validate_triton_path_inputs("Triton", "margin_softmax_stats_triton", embeddings, weight, class_index,
                                target_position, num_subcenters, margin)
    return _TritonMarginSoftmax.apply(
        embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size
    )
