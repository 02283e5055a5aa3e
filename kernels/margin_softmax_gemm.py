"""Margin-softmax statistics on library GEMMs plus fused Triton elementwise passes.

Same contract as ``margin_softmax_ref`` (read its docstring for the math); this is
design (a) of issue 15: the three products of the op run as plain ``torch.mm`` in the
embeddings' dtype (cuBLAS on CUDA: bf16/fp16 tensor cores with fp32 accumulation),
and everything between them is one Triton pass over each ``B x chunk`` tile.

Per call:

* ``_gather_rows_kernel``: the kept center rows, gathered once into a contiguous copy
  in the compute dtype (what the GEMMs read; for bf16 embeddings and fp32 weights
  this is AMP's rounding of W) together with ``1 / max(||w||, eps)`` of the rows as
  stored. The copy is saved for backward, so W is read once per step.
* The target column of every row is computed apart, in fp32, from the ``B x K``
  target rows of that copy: ``max_s (x . w_s) * inv_s``, the margin through
  ``CombinedMargin.target_logit`` (margins.py, no second formula) and its slope by
  autograd. The tiles below skip that column. This keeps the one logit the loss
  is most sensitive to out of the tile's rounding, and keeps the margin math --
  every family, SphereFace's intervals included -- out of the kernels.
* Forward, per class chunk: ``dots = x @ centers^T`` (the logit tile), then
  ``_chunk_stats_kernel`` reads it once: cosine = dot * inv, max over the K
  sub-centers, logit = scale * cosine, and an online max / sum-exp over its columns,
  written as per-(split, row) partials that one torch merge folds, with the target
  logits, into ``lse``.
* Backward, per chunk: the same GEMM again (the one recompute), then
  ``_chunk_grad_kernel`` writes ``d loss / d dot`` -- ``scale * softmax * g_lse`` off
  target, the precomputed margined target gradient on it, routed to the argmax
  sub-center and multiplied by ``inv`` -- in the GEMM dtype (dS). Then
  ``dX += dS @ centers`` and ``G = dS^T @ x`` (torch.mm), and ``_rows_backward_kernel``
  chains ``G`` through the row normalization (``d w = G - inv^2 (w . G) w``) and
  writes the gradient rows once, in the weight's dtype.

The logit tile is fp32 (``TILE_DTYPE = "float32"``): cuBLAS writes its fp32
accumulator (``torch.mm(..., out_dtype=torch.float32)``), so the statistics are as
exact as the fused kernel's. The alternative, ``"compute"``, keeps the tile in the
GEMM dtype -- about half the tile traffic, with every non-target dot rounded to bf16's 8
bits, which at scale 64 moved lse by ~3e-3 relative in the tests -- and is there to be
measured against it (``benchmarks/kernel.py --impls gemm gemm:compute``).
dS is rounded to the GEMM dtype before its two GEMMs, as in any bf16 backward; dX is
accumulated over chunks in fp32. With fp16 inputs the dS entries (about scale * p / B)
can fall below fp16's normals: the head's loss is not scaled by the backbone's
GradScaler, which is why ``head.compute_dtype = "auto"`` never picks fp16.

Chunking: the ``B x chunk`` buffers (the fp32 logit tile plus, for half inputs, the dS
tile; for fp32 inputs dS overwrites the logit tile in place) are bounded together by
``TILE_BYTES`` = 256 MiB: 43690 center rows at B = 1024 with bf16 inputs, i.e. 23 chunks
at a million classes and a handful of launches each. An explicit ``chunk_size``
counts classes per chunk instead.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (the tests), where the GEMMs are
CPU torch matmuls with the same output rounding.
"""
from __future__ import annotations

import torch

from .margin_softmax import _interpreting, validate_triton_path_inputs
from .margin_softmax_ref import (
    _target_logit_and_slope,
    fp32_output_gemm,
    kept_rows,
    mm_fp32_output,
    sparse_row_grad,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["margin_softmax_stats_gemm", "chunk_classes", "TILE_BYTES", "TILE_DTYPE"]

# Bound on the B x chunk buffers together: the logit tile and, when it is fp32 and the
# GEMMs are half precision, the dS tile beside it (else dS overwrites the logit tile).
TILE_BYTES = 256 * 2**20
# Logit tile of half-precision inputs: "float32" (the GEMM writes its fp32 accumulator,
# torch.mm(..., out_dtype=torch.float32)) or "compute" (the GEMM's own dtype: half the
# tile traffic (roughly), but every non-target logit rounded to 8 (bf16) or 11 (fp16) bits).
TILE_DTYPE = "float32"
# Elementwise tiles: BLOCK_B rows x BLOCK_R center rows (BLOCK_R // K_PAD classes), 16
# values per thread. Compiled for sm_90 with ptxas (no GPU needed): 8 x 512 on 8 warps
# takes 62-79 registers and no stack for K = 1 and 3 (fp32 or bf16 tile); 32 x 256
# took 254 and spilled, the 3-D [rows, classes, K_PAD] layouts being register-hungry.
CUDA_TILE = dict(BLOCK_B=8, BLOCK_R=512, num_warps=8)
# Under the interpreter tiles are tiny so small test shapes cross many tiles and splits.
INTERPRET_TILE = dict(BLOCK_B=16, BLOCK_R=16, num_warps=4)
# Row passes (gather + norm, normalization backward): values per program and warps. 4096
# on 8 warps compiled without stack at D = 16, 128, 512 (8192 on 4 warps spilled KiBs).
ROW_PASS_VALUES = 4096
ROW_PASS_WARPS = 8
# Forward programs per chunk ~ this many per SM (row blocks x class splits).
PROGRAMS_PER_SM = 8


if triton is not None:

    @triton.jit
    def _gather_rows_kernel(w_ptr, rows_ptr, out_ptr, inv_ptr, num_rows, dim, stride_w,
                            BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
        """out[i] = W[rows[i]] in out's dtype; inv[i] = 1 / max(||W[rows[i]]||, eps) as stored."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < num_rows
        offs_d = tl.arange(0, D_PAD)
        mask = mask_r[:, None] & (offs_d < dim)[None, :]
        rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0)
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0)
        w32 = w.to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(w32 * w32, axis=1)), 1e-12)
        tl.store(out_ptr + offs_r.to(tl.int64)[:, None] * dim + offs_d[None, :],
                 w.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(inv_ptr + offs_r, inv, mask=mask_r)

    @triton.jit
    def _tile_cosines(dots_ptr, inv_ptr, offs_b, mask_b, offs_c, mask_c, row_stride,
                      NUM_SUB: tl.constexpr, K_PAD: tl.constexpr):
        """Cosines of a [rows, classes, K_PAD] tile (fp32; padding and masked entries -inf), the
        tile's column offsets, its mask and the [1, classes, K_PAD] inverse norms."""
        offs_s = tl.arange(0, K_PAD)
        column = offs_c[None, :, None] * NUM_SUB + offs_s[None, None, :]
        real = mask_c[None, :, None] & (offs_s < NUM_SUB)[None, None, :]  # [1, classes, K_PAD]
        valid = mask_b[:, None, None] & real
        dots = tl.load(dots_ptr + offs_b.to(tl.int64)[:, None, None] * row_stride + column, mask=valid, other=0.0)
        inv = tl.load(inv_ptr + column, mask=real, other=0.0)
        return tl.where(valid, dots.to(tl.float32) * inv, float("-inf")), column, valid, inv

    @triton.jit
    def _chunk_stats_kernel(dots_ptr, inv_ptr, target_ptr, part_max_ptr, part_sum_ptr,
                            batch, num_classes, class_offset, classes_per_split, scale,
                            NUM_SUB: tl.constexpr, K_PAD: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
        """Per (row, split): running max and sum of exp of the non-target logits of the split."""
        BLOCK_C: tl.constexpr = BLOCK_R // K_PAD
        split = tl.program_id(1)
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < batch
        # The target's column in this chunk (out of range when it is elsewhere or -1).
        target = tl.load(target_ptr + offs_b, mask=mask_b, other=-1) - class_offset
        split_start = split * classes_per_split
        split_stop = tl.minimum(split_start + classes_per_split, num_classes)
        row_stride = num_classes * NUM_SUB
        run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_B,), tl.float32)
        for start in range(split_start, split_stop, BLOCK_C):
            offs_c = start + tl.arange(0, BLOCK_C)
            mask_c = offs_c < split_stop
            cos, _, _, _ = _tile_cosines(dots_ptr, inv_ptr, offs_b, mask_b, offs_c, mask_c, row_stride,
                                      NUM_SUB, K_PAD)
            best = tl.max(cos, axis=2)
            keep = (offs_c[None, :] != target[:, None]) & mask_c[None, :] & mask_b[:, None]
            logits = tl.where(keep, scale * best, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            # A row can see only -inf so far (its target is the split's one class): keep 0 * exp(0).
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(logits - safe_max[:, None]), axis=1)
            run_max = new_max
        tl.store(part_max_ptr + split * batch + offs_b, run_max, mask=mask_b)
        tl.store(part_sum_ptr + split * batch + offs_b, run_sum, mask=mask_b)

    @triton.jit
    def _chunk_grad_kernel(dots_ptr, grad_ptr, inv_ptr, target_ptr, lse_ptr, grad_lse_ptr, target_grad_ptr,
                           target_sub_ptr, batch, num_classes, class_offset, scale,
                           NUM_SUB: tl.constexpr, K_PAD: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
        """d loss / d dot of the tile (routed to the argmax sub-center) into grad_ptr, which may
        be dots_ptr itself: every element is read and then written by the same program."""
        BLOCK_C: tl.constexpr = BLOCK_R // K_PAD
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < batch
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < num_classes
        target = tl.load(target_ptr + offs_b, mask=mask_b, other=-1) - class_offset
        lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
        grad_lse = tl.load(grad_lse_ptr + offs_b, mask=mask_b, other=0.0)
        target_grad = tl.load(target_grad_ptr + offs_b, mask=mask_b, other=0.0)
        target_sub = tl.load(target_sub_ptr + offs_b, mask=mask_b, other=0).to(tl.int32)
        row_stride = num_classes * NUM_SUB
        cos, column, valid, inv = _tile_cosines(dots_ptr, inv_ptr, offs_b, mask_b, offs_c, mask_c, row_stride,
                                                NUM_SUB, K_PAD)
        best = tl.max(cos, axis=2)
        offs_s = tl.arange(0, K_PAD)[None, None, :]
        # First argmax, like torch.max: exactly one sub-center per (row, class) gets the gradient.
        best_sub = tl.min(tl.where(cos == best[:, :, None], offs_s, K_PAD), axis=2)
        is_target = offs_c[None, :] == target[:, None]
        softmax = tl.exp(scale * best - lse[:, None])
        grad_cos = tl.where(is_target, target_grad[:, None], (grad_lse * scale)[:, None] * softmax)
        best_sub = tl.where(is_target, target_sub[:, None], best_sub)
        grad_dot = tl.where(offs_s == best_sub[:, :, None], grad_cos[:, :, None] * inv, 0.0)
        tl.store(grad_ptr + offs_b.to(tl.int64)[:, None, None] * row_stride + column,
                 grad_dot.to(grad_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _rows_backward_kernel(g_ptr, w_ptr, inv_ptr, out_ptr, num_rows, dim,
                              BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
        """d w = G - inv^2 (w . G) w from G = dS^T x (= inv * d loss / d w_hat); G alone below eps."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < num_rows
        offs_d = tl.arange(0, D_PAD)
        mask = mask_r[:, None] & (offs_d < dim)[None, :]
        offsets = offs_r.to(tl.int64)[:, None] * dim + offs_d[None, :]
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        inv = tl.load(inv_ptr + offs_r, mask=mask_r, other=0.0)
        radial = tl.where(inv < 1e12, inv * inv * tl.sum(g * w, axis=1), 0.0)
        tl.store(out_ptr + offsets, (g - radial[:, None] * w).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- planning (plain Python)
def chunk_classes(batch: int, num_subcenters: int, entry_bytes: int, chunk_size=None) -> int:
    """Classes per chunk: ``chunk_size`` if given, else the most whose B x rows buffers fit
    TILE_BYTES at ``entry_bytes`` per (row, center row)."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (classes per chunk), got {chunk_size!r}")
        return chunk_size
    rows = TILE_BYTES // max(1, batch * entry_bytes)
    return max(1, rows // num_subcenters)


def _tile(device) -> dict:
    return dict(INTERPRET_TILE if _interpreting() or device.type != "cuda" else CUDA_TILE)


def _row_block(dim: int) -> tuple[int, int]:
    d_pad = max(16, triton.next_power_of_2(dim))
    return max(1, ROW_PASS_VALUES // d_pad), d_pad


def _splits(batch, num_classes, block_b, block_c, device) -> tuple[int, int]:
    """(splits, classes_per_split) of one forward chunk: enough programs to fill the device."""
    if _interpreting() or device.type != "cuda":
        target = 4
    else:
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(batch, block_b)
    splits = max(1, min(triton.cdiv(num_classes, block_c), triton.cdiv(target, row_blocks)))
    per_split = triton.cdiv(triton.cdiv(num_classes, splits), block_c) * block_c  # whole tiles
    return triton.cdiv(num_classes, per_split), per_split


def _chunks(num_kept, per_chunk):
    for start in range(0, num_kept, per_chunk):
        yield start, min(start + per_chunk, num_kept)


# ---------------------------------------------------------------- host side
def _gather_centers(weight, rows, dtype):
    """Contiguous kept rows in ``dtype`` and their fp32 inverse norms (one pass over W)."""
    centers = torch.empty(rows.shape[0], weight.shape[1], dtype=dtype, device=weight.device)
    inv_norm = torch.empty(rows.shape[0], dtype=torch.float32, device=weight.device)
    if rows.shape[0]:
        block_r, d_pad = _row_block(weight.shape[1])
        _gather_rows_kernel[(triton.cdiv(rows.shape[0], block_r),)](
            weight, rows, centers, inv_norm, rows.shape[0], weight.shape[1], weight.stride(0),
            BLOCK_R=block_r, D_PAD=d_pad, num_warps=ROW_PASS_WARPS)
    return centers, inv_norm


def _target_cosines(x, centers, inv_norm, target_position, num_subcenters):
    """fp32 best-sub-center cosine of each row to its target and that sub-center (0 where off rank)."""
    position = target_position.clamp_min(0)
    rows = position[:, None] * num_subcenters + torch.arange(num_subcenters, device=x.device)
    dots = torch.einsum("bd,bkd->bk", x.float(), centers[rows].float())
    return (dots * inv_norm[rows]).max(dim=1)


class _GemmMarginSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size):
        x = embeddings.detach().contiguous()
        w = weight.detach()
        if w.stride(1) != 1:
            w = w.contiguous()
        batch, num_kept = x.shape[0], class_index.shape[0]
        target_position = target_position.contiguous()
        rows = kept_rows(class_index, num_subcenters)
        centers, inv_norm = _gather_centers(w, rows, x.dtype)
        owned = target_position >= 0
        zeros = torch.zeros(batch, dtype=torch.float32, device=x.device)
        if num_kept == 0 or batch == 0:
            lse = torch.full((batch,), float("-inf"), dtype=torch.float32, device=x.device)
            target_logit, slope, target_sub = zeros, zeros, zeros.long()
        else:
            target_cos, target_sub = _target_cosines(x, centers, inv_norm, target_position, num_subcenters)
            target_logit, slope = _target_logit_and_slope(margin, target_cos)
            target_logit = torch.where(owned, target_logit, 0.0)
            plan = _ChunkPlan(x, num_kept, num_subcenters, chunk_size)
            lse = _forward_chunks(plan, centers, inv_norm, target_position, margin.scale)
            # Fold the target column (skipped by the tiles) into lse: logaddexp(lse, target).
            with_target = torch.logaddexp(lse, target_logit)
            lse = torch.where(owned, with_target, lse)
        ctx.save_for_backward(x, w, centers, inv_norm, rows, target_position, lse, target_logit, slope, target_sub)
        ctx.num_subcenters, ctx.scale, ctx.chunk_size = num_subcenters, float(margin.scale), chunk_size
        ctx.embedding_dtype = embeddings.dtype
        return lse, target_logit

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        x, w, centers, inv_norm, rows, target_position, lse, target_logit, slope, target_sub = ctx.saved_tensors
        batch, dim = x.shape
        num_subcenters = ctx.num_subcenters
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float().contiguous()
        grad_target = torch.zeros_like(lse) if grad_target is None else grad_target.float().contiguous()
        grad_x = torch.zeros(batch, dim, dtype=torch.float32, device=x.device) if want_x else None
        work = rows.shape[0] > 0 and batch > 0
        # Every kept row is written by the normalization-backward pass when there is work.
        grad_values = ((torch.empty if work else torch.zeros)(rows.shape[0], dim, dtype=w.dtype, device=x.device)
                       if want_w else None)
        if work and (want_x or want_w):
            # d loss / d target cosine: softmax and upstream target gradient through the margin.
            owned = target_position >= 0
            target_grad = torch.where(owned, (grad_lse * torch.exp(target_logit - lse) + grad_target) * slope, 0.0)
            plan = _ChunkPlan(x, rows.shape[0] // num_subcenters, num_subcenters, ctx.chunk_size)
            _backward_chunks(plan, centers, inv_norm, target_position, lse, grad_lse, target_grad, target_sub,
                             ctx.scale, grad_x if want_x else None, grad_values)
        grad_embeddings = grad_x.to(ctx.embedding_dtype) if want_x else None
        grad_weight = sparse_row_grad(rows, grad_values, w) if want_w else None
        return grad_embeddings, grad_weight, None, None, None, None, None


class _ChunkPlan:
    """Chunks of one call, their tile dtype, the reused B x chunk buffers and the kernel tiles."""

    def __init__(self, x, num_kept, num_subcenters, chunk_size):
        self.x, self.num_subcenters = x, num_subcenters
        self.tile_dtype = _tile_dtype(x)
        self.separate_grad = self.tile_dtype != x.dtype  # fp32 logits, dS in the GEMM dtype
        entry_bytes = self.tile_dtype.itemsize + (x.element_size() if self.separate_grad else 0)
        self.per_chunk = chunk_classes(x.shape[0], num_subcenters, entry_bytes, chunk_size)
        self.chunks = list(_chunks(num_kept, self.per_chunk))
        self.tile = _tile(x.device)
        self.k_pad = triton.next_power_of_2(num_subcenters)
        self.block_c = max(1, self.tile["BLOCK_R"] // self.k_pad)
        self._buffers = {}

    def constexprs(self):
        return dict(NUM_SUB=self.num_subcenters, K_PAD=self.k_pad, BLOCK_B=self.tile["BLOCK_B"],
                    BLOCK_R=self.tile["BLOCK_R"], num_warps=self.tile["num_warps"])

    def buffer(self, name, dtype, rows):
        """A (B, rows) view of a buffer sized for the largest chunk, allocated once per pass."""
        batch = self.x.shape[0]
        if name not in self._buffers:
            largest = max(stop - start for start, stop in self.chunks) * self.num_subcenters
            self._buffers[name] = torch.empty(batch * largest, dtype=dtype, device=self.x.device)
        return self._buffers[name][:batch * rows].view(batch, rows)

    def dots(self, centers):
        """x @ centers^T in the tile dtype, fp32 accumulation, operands in x's dtype."""
        if self.tile_dtype == self.x.dtype:
            return torch.mm(self.x, centers.T, out=self.buffer("dots", self.x.dtype, centers.shape[0]))
        return mm_fp32_output(self.x, centers.T)  # a fresh tile: the caching allocator reuses it


def _tile_dtype(x) -> torch.dtype:
    """fp32 logit tiles for half inputs (TILE_DTYPE = "float32") where torch.mm can write them."""
    if x.dtype == torch.float32 or TILE_DTYPE == "compute":
        return x.dtype
    if TILE_DTYPE != "float32":
        raise ValueError(f"TILE_DTYPE must be 'float32' or 'compute', got {TILE_DTYPE!r}")
    return torch.float32 if fp32_output_gemm(x.dtype, x.device) else x.dtype


def _forward_chunks(plan, centers, inv_norm, target_position, scale):
    """lse over the non-target columns of every chunk (-inf where a row has none)."""
    x, num_subcenters = plan.x, plan.num_subcenters
    batch = x.shape[0]
    splits = [_splits(batch, stop - start, plan.tile["BLOCK_B"], plan.block_c, x.device) for start, stop in plan.chunks]
    part_max = torch.empty(sum(count for count, _ in splits), batch, dtype=torch.float32, device=x.device)
    part_sum = torch.empty_like(part_max)
    slot = 0
    for (start, stop), (count, per_split) in zip(plan.chunks, splits):
        row_start, row_stop = start * num_subcenters, stop * num_subcenters
        dots = plan.dots(centers[row_start:row_stop])
        _chunk_stats_kernel[(triton.cdiv(batch, plan.tile["BLOCK_B"]), count)](
            dots, inv_norm[row_start:], target_position, part_max[slot:], part_sum[slot:],
            batch, stop - start, start, per_split, float(scale), **plan.constexprs())
        slot += count
    row_max = part_max.amax(dim=0)
    safe_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    return safe_max + torch.log((part_sum * torch.exp(part_max - safe_max)).sum(dim=0))


def _backward_chunks(plan, centers, inv_norm, target_position, lse, grad_lse, target_grad, target_sub, scale,
                     grad_x, grad_values):
    """Accumulate dX (fp32) and write the gradient rows, chunk by chunk."""
    x, num_subcenters = plan.x, plan.num_subcenters
    batch, dim = x.shape
    block_rows, d_pad = _row_block(dim)
    for start, stop in plan.chunks:
        row_start, row_stop = start * num_subcenters, stop * num_subcenters
        chunk_centers = centers[row_start:row_stop]
        dots = plan.dots(chunk_centers)
        grad_dots = plan.buffer("grad", x.dtype, row_stop - row_start) if plan.separate_grad else dots
        _chunk_grad_kernel[(triton.cdiv(batch, plan.tile["BLOCK_B"]), triton.cdiv(stop - start, plan.block_c))](
            dots, grad_dots, inv_norm[row_start:], target_position, lse, grad_lse, target_grad, target_sub,
            batch, stop - start, start, float(scale), **plan.constexprs())
        if grad_x is not None:
            if grad_dots.dtype == torch.float32:
                grad_x.addmm_(grad_dots, chunk_centers)
            else:  # the product is rounded once per chunk; the sum over chunks stays fp32
                grad_x += torch.mm(grad_dots, chunk_centers)
        if grad_values is not None:
            rows_grad = torch.mm(grad_dots.T, x)
            _rows_backward_kernel[(triton.cdiv(row_stop - row_start, block_rows),)](
                rows_grad, chunk_centers, inv_norm[row_start:], grad_values[row_start:row_stop],
                row_stop - row_start, dim, BLOCK_R=block_rows, D_PAD=d_pad, num_warps=ROW_PASS_WARPS)


def margin_softmax_stats_gemm(
    embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size=None
):
    """``(lse, target_logit)`` on torch.mm GEMMs + fused Triton passes; ``chunk_size``: classes per chunk."""
    validate_triton_path_inputs("gemm", "margin_softmax_stats_gemm", embeddings, weight, class_index,
                                target_position, num_subcenters, margin)
    chunk_classes(1, num_subcenters, 1, chunk_size)  # validates chunk_size before any work
    return _GemmMarginSoftmax.apply(
        embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size
    )
