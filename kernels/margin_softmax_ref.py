"""Torch implementations of the margin-softmax statistics: a chunked path and a naive one.

Both compute, for the kept classes of one rank (DESIGN.md sections 1-3),

    c[i, j]     = max_s cos(x_i, normalize(W[class_index[j] * K + s]))
    logit[i, j] = margin.target_logit(c) if j == target_position[i] else scale * c
    lse[i]      = logsumexp_j logit[i, j]
    target[i]   = logit[i, target_position[i]]  (0 where the target lives on another rank)

* ``margin_softmax_stats_torch`` is the CPU production path. It walks the classes in
  tiles (``DEFAULT_TILE_ROWS`` center rows, i.e. ``DEFAULT_TILE_ROWS // K`` classes, or
  ``chunk_size`` classes when given), folds each tile into a running max / sum-exp
  (online softmax) and, in backward, recomputes every tile from the saved ``lse``. Peak
  extra memory is a few ``B x tile rows`` buffers; the ``B x k`` logit matrix never
  exists. Its cost is four GEMMs per tile (forward, recompute, dX, dW) against the naive
  path's three, so everything else is kept off the ``k x D`` side: the GEMMs read the
  raw rows (a slice view of W when the kept classes are contiguous, r = 1), the row
  normalization is a per-column scale of the ``B x rows`` output, and its backward is
  a ``B``-long reduction of the tile plus one fused update of the gradient rows.
* ``margin_softmax_stats_naive`` materializes everything with plain autograd. It is the
  baseline for benchmarks and the reference for tests.

Arithmetic is float32 (float64 when the inputs are float64, for reference checks); on
CUDA the chunked path's GEMMs take bf16/fp16 embeddings as they are (tensor cores, fp32
accumulation, fp32 results where torch.mm can write them), with W's tile cast to match.
On CPU the operands are upcast to fp32, which CPU BLAS runs faster than half. The
embedding gradient comes back in the embeddings' dtype and the weight gradient is a
coalesced sparse COO tensor over the kept rows only, like ``F.embedding(sparse=True)``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "margin_softmax_stats_naive",
    "margin_softmax_stats_torch",
    "validate_margin_softmax_inputs",
    "ClassTiles",
    "kept_rows",
    "normalized_rows_backward",
    "sparse_row_grad",
    "NORM_EPS",
    "DEFAULT_TILE_ROWS",
    "tile_classes",
    "fp32_output_gemm",
    "mm_fp32_output",
]

# Same floor as F.normalize: rows with a smaller norm are divided by NORM_EPS instead.
NORM_EPS = 1e-12
# Center rows (classes x K) per tile of the chunked path when chunk_size is None. A tile's
# temporaries are a few B x rows buffers (dot products, probabilities and, for K > 1, the
# gradient routed to the argmax sub-centers): ~8 MiB each at B = 256, fp32. 8192 rows
# keeps each GEMM (B x D times D x 8192) large enough to run at the BLAS's full speed.
DEFAULT_TILE_ROWS = 8192
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


def _gemm_dtype(embeddings, compute_dtype):
    """Operand dtype of the chunked path's GEMMs: half embeddings stay half on CUDA only."""
    if embeddings.is_cuda and compute_dtype == torch.float32 and embeddings.dtype in (torch.float16, torch.bfloat16):
        return embeddings.dtype
    return compute_dtype


_FP32_OUTPUT = {}


def fp32_output_gemm(dtype, device) -> bool:
    """Whether ``torch.mm`` can write an fp32 result from ``dtype`` operands on ``device``.

    CUDA: ``torch.mm(..., out_dtype=torch.float32)`` (torch >= 2.8), probed once per
    (device, dtype) with a 1 x 1 product; without it, half GEMMs round their results and
    a warning says so once. CPU: always (``mm_fp32_output`` upcasts the operands).
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype == torch.float32:
        return True
    key = (str(device), dtype)
    if key not in _FP32_OUTPUT:
        probe = torch.zeros(1, 1, dtype=dtype, device=device)
        try:
            _FP32_OUTPUT[key] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUTPUT[key] = False
        if not _FP32_OUTPUT[key]:
            warnings.warn(f"torch {torch.__version__} has no torch.mm(out_dtype=) for {dtype} on {device}: "
                          f"{dtype} GEMM results are rounded to {dtype} before the fp32 math", RuntimeWarning,
                          stacklevel=2)
    return _FP32_OUTPUT[key]


def mm_fp32_output(a, b):
    """``a @ b`` of same-dtype operands with an fp32 result accumulated in fp32.

    CPU: the operands are upcast, which is exact for half values, so this computes what the
    CUDA GEMM with fp32 output does (and is what the interpreter tests compare against).
    """
    if a.dtype == torch.float32 or a.device.type != "cuda":
        return torch.mm(a.float(), b.float())
    if fp32_output_gemm(a.dtype, a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def tile_classes(num_subcenters: int, chunk_size=None) -> int:
    """Classes per tile of the chunked path.

    An explicit ``chunk_size`` counts classes (what ``head.chunk_size`` documents). The
    default bounds center *rows* instead: ``DEFAULT_TILE_ROWS // K`` classes, because the
    tile's temporaries are ``B x rows`` buffers, so with K = 3 a class-sized tile would
    need 3x the memory of K = 1.
    """
    if chunk_size is None:
        return max(1, DEFAULT_TILE_ROWS // num_subcenters)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (classes per tile), got {chunk_size!r}")
    return chunk_size


def _target_logit_and_slope(margin, cos_target):
    """target_logit at ``cos_target`` and its d / d cos, by autograd through margins.py (one formula)."""
    with torch.enable_grad():
        cos_leaf = cos_target.detach().requires_grad_(True)
        logit = margin.target_logit(cos_leaf)
        (slope,) = torch.autograd.grad(logit.sum(), cos_leaf)
    return logit.detach(), slope


def _contiguous_first_class(class_index):
    """First class when ``class_index`` is one run ``first, first+1, ...`` (r = 1), else None.

    A validated class_index is sorted and unique, so it is a run iff ``last - first == k - 1``;
    then every tile's center rows are a slice *view* of the weight and the gather copy is
    skipped. Only checked on CPU (where the inputs were validated): elsewhere reading two
    elements would be a host sync per step, and the gather is cheap next to the GEMMs there.
    """
    if class_index.device.type != "cpu" or class_index.numel() == 0:
        return None
    first, last = int(class_index[0]), int(class_index[-1])
    return first if last - first == class_index.numel() - 1 else None


class ClassTiles:
    """The class tiles of one pass: their center rows, target columns and reused scratch.

    Scratch buffers are allocated for the first (largest) tile and viewed for the others,
    so a pass holds the same few ``B x tile rows`` buffers however many tiles there are
    and every tile's GEMM writes into memory that is already resident.
    """

    def __init__(self, weight, class_index, target_position, num_subcenters, tile, dtype, gemm_dtype):
        self.weight = weight.detach()
        self.class_index, self.target_position = class_index, target_position
        self.num_subcenters, self.tile, self.dtype, self.gemm_dtype = num_subcenters, tile, dtype, gemm_dtype
        self.first_class = _contiguous_first_class(class_index)
        self._scratch = {}

    def __iter__(self):
        num_kept = self.class_index.shape[0]
        for start in range(0, num_kept, self.tile):
            yield start, min(start + self.tile, num_kept)

    def centers(self, start, stop):
        """Raw center rows of the tile's classes, class-major ((stop - start) * K, D), compute dtype."""
        k_sub = self.num_subcenters
        if self.first_class is not None:
            rows = self.weight[(self.first_class + start) * k_sub:(self.first_class + stop) * k_sub]
        else:
            rows = self.weight.index_select(0, kept_rows(self.class_index[start:stop], k_sub))
        return rows if rows.dtype == self.dtype else rows.to(self.dtype)

    def gemm_rows(self, centers):
        """The tile's center rows as GEMM operand (a cast only on the CUDA half path)."""
        return centers if self.gemm_dtype == self.dtype else centers.to(self.gemm_dtype)

    def targets(self, start, stop):
        """(owned, column): rows whose target is in this tile, and its column (clamped into range)."""
        local = self.target_position - start
        owned = (local >= 0) & (local < stop - start)
        return owned, local.clamp(0, stop - start - 1)[:, None]

    def scratch(self, name, rows, cols):
        numel = rows * cols
        buffer = self._scratch.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[name] = torch.empty(numel, dtype=self.dtype, device=self.weight.device)
        return buffer[:numel].view(rows, cols)


def _tile_cosines(tiles, x, gemm_centers, inv_norm, with_argmax):
    """Best-sub-center cosines of a tile, as ``pooled * column_scale`` (B x classes).

    The GEMM runs on the raw rows (``cos = (x . w) * inv_norm``): no normalized copy of W.
    K = 1: ``pooled`` are the raw dots and ``column_scale = inv_norm``, so the scaling is
    folded into the next pass over the tile. K > 1: the max over sub-centers needs true
    cosines, so the dots are scaled in place and ``column_scale`` is None. Also returns
    the (B x rows) dots buffer itself and, if asked, the argmax sub-center (K > 1).
    """
    batch, num_rows = x.shape[0], gemm_centers.shape[0]
    if tiles.gemm_dtype == tiles.dtype:
        dots = torch.mm(x, gemm_centers.T, out=tiles.scratch("dots", batch, num_rows))
    else:
        dots = mm_fp32_output(x, gemm_centers.T)
    if tiles.num_subcenters == 1:
        return dots, inv_norm, dots, None
    cos = dots.mul_(inv_norm).view(batch, num_rows // tiles.num_subcenters, tiles.num_subcenters)
    if with_argmax:
        pooled, best_sub = cos.max(dim=2)  # max, not amax: one argmax per (row, class), as naive
        return pooled, None, dots, best_sub
    return cos.amax(dim=2), None, dots, None


def _gather_cos(pooled, column_scale, column):
    cos = pooled.gather(1, column).squeeze(1)
    return cos if column_scale is None else cos * column_scale[column.squeeze(1)]


class _ChunkedMarginSoftmax(torch.autograd.Function):
    """Online-softmax statistics over class tiles; backward recomputes each tile."""

    @staticmethod
    def forward(ctx, embeddings, weight, class_index, target_position, num_subcenters, margin, tile):
        compute_dtype = _compute_dtype(embeddings, weight)
        gemm_dtype = _gemm_dtype(embeddings, compute_dtype)
        x = embeddings.detach().to(gemm_dtype)
        batch = x.shape[0]
        tiles = ClassTiles(weight, class_index, target_position, num_subcenters, tile, compute_dtype, gemm_dtype)
        # 1/||w|| of every kept row: k*K floats, saved so backward does not re-read W for it.
        inv_norm = torch.empty(class_index.shape[0] * num_subcenters, dtype=compute_dtype, device=x.device)
        running_max = torch.full((batch,), float("-inf"), dtype=compute_dtype, device=x.device)
        running_sum = torch.zeros(batch, dtype=compute_dtype, device=x.device)
        target_logit = torch.zeros(batch, dtype=compute_dtype, device=x.device)
        for start, stop in tiles:
            centers = tiles.centers(start, stop)
            inv = inv_norm[start * num_subcenters:stop * num_subcenters]
            torch.linalg.vector_norm(centers, dim=1, out=inv).clamp_min_(NORM_EPS).reciprocal_()
            pooled, column_scale, _, _ = _tile_cosines(tiles, x, tiles.gemm_rows(centers), inv, with_argmax=False)
            owned, column = tiles.targets(start, stop)
            tile_target = margin.target_logit(_gather_cos(pooled, column_scale, column))
            # pooled is scratch (K = 1) or fresh (K > 1): scale it in place into logits.
            logits = pooled.mul_(margin.scale if column_scale is None else margin.scale * column_scale)
            plain = logits.gather(1, column).squeeze(1)
            logits.scatter_(1, column, torch.where(owned, tile_target, plain)[:, None])
            new_max = torch.maximum(running_max, logits.amax(dim=1))
            # running_max starts at -inf; new_max is finite after the first (non-empty) tile.
            running_sum = running_sum * torch.exp(running_max - new_max) + (
                logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            )
            running_max = new_max
            target_logit = torch.where(owned, tile_target, target_logit)
        lse = running_max + torch.log(running_sum)
        out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        ctx.save_for_backward(embeddings, weight, class_index, target_position, lse, inv_norm)
        ctx.num_subcenters, ctx.margin, ctx.tile = num_subcenters, margin, tile
        return lse.to(out_dtype), target_logit.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        embeddings, weight, class_index, target_position, lse, inv_norm = ctx.saved_tensors
        num_subcenters, margin, scale = ctx.num_subcenters, ctx.margin, ctx.margin.scale
        compute_dtype = lse.dtype
        gemm_dtype = _gemm_dtype(embeddings, compute_dtype)
        x = embeddings.detach().to(gemm_dtype)
        batch, num_kept = x.shape[0], class_index.shape[0]
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(compute_dtype)
        grad_target = torch.zeros_like(lse) if grad_target is None else grad_target.to(compute_dtype)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros(x.shape, dtype=compute_dtype, device=x.device) if want_x else None
        grad_values = (
            torch.empty(num_kept * num_subcenters, x.shape[1], dtype=weight.dtype, device=x.device)
            if want_w else None
        )
        tiles = ClassTiles(weight, class_index, target_position, num_subcenters, ctx.tile, compute_dtype, gemm_dtype)
        same_dtype = gemm_dtype == compute_dtype
        neg_lse, grad_lse_scaled = -lse[:, None], (grad_lse * scale)[:, None]
        for start, stop in tiles:
            row_start, row_stop = start * num_subcenters, stop * num_subcenters
            centers, inv = tiles.centers(start, stop), inv_norm[row_start:row_stop]
            gemm_centers = tiles.gemm_rows(centers)
            pooled, column_scale, dots, best_sub = _tile_cosines(tiles, x, gemm_centers, inv, with_argmax=True)
            owned, column = tiles.targets(start, stop)
            tile_target, slope = _target_logit_and_slope(margin, _gather_cos(pooled, column_scale, column))
            # softmax = exp(logit - lse), with "logit - lse" formed in one pass over the tile.
            prob = tiles.scratch("prob", batch, stop - start)
            if column_scale is None:
                torch.add(neg_lse, pooled, alpha=scale, out=prob)
            else:
                torch.addcmul(neg_lse, pooled, scale * column_scale, out=prob)
            plain = prob.gather(1, column).squeeze(1)
            prob.scatter_(1, column, torch.where(owned, tile_target - lse, plain)[:, None])
            prob_at_column = prob.exp_().gather(1, column).squeeze(1)
            # d loss / d cos = scale * softmax * g_lse off target; at an owned target the
            # logit is margined: (softmax * g_lse + g_target) * d target_logit / d cos.
            grad_cos = prob.mul_(grad_lse_scaled)
            at_column = prob_at_column * grad_lse + torch.where(owned, grad_target, 0.0)
            grad_cos.scatter_(1, column, torch.where(owned, at_column * slope, at_column * scale)[:, None])
            if num_subcenters > 1:
                # Only the argmax sub-center of each (row, class) receives the gradient.
                routed = tiles.scratch("routed", batch, row_stop - row_start).zero_()
                routed.view(batch, stop - start, num_subcenters).scatter_(2, best_sub[:, :, None], grad_cos[:, :, None])
                grad_cos = routed
            if want_w:
                # Normalization backward without touching W twice: with g = d loss / d cos,
                # d loss / d w = inv * (g^T x) - inv^2 * (sum_b g * cos) * w  (rows above eps).
                # sum_b g * cos is a B-long reduction of the tile; dots is dead after it.
                radial = dots.mul_(grad_cos).sum(dim=0)
                if column_scale is not None:
                    radial.mul_(inv)  # K = 1: dots were raw, cos = dots * inv
                radial_coef = torch.where(inv < 1.0 / NORM_EPS, radial * inv * inv, 0.0)
            grad_dots = grad_cos.mul_(inv)  # d loss / d (x . w)
            if not same_dtype:  # CUDA half GEMMs: d loss / d dot rounded like any half backward
                grad_dots = grad_dots.to(gemm_dtype)
            if want_x:
                if same_dtype:
                    grad_x.addmm_(grad_dots, centers)
                else:
                    grad_x += mm_fp32_output(grad_dots, gemm_centers)
            if want_w:
                # Written straight into the gradient rows unless they are stored in a lower precision.
                direct = same_dtype and grad_values.dtype == compute_dtype
                destination = grad_values[row_start:row_stop] if direct else None
                if same_dtype:
                    rows_grad = torch.mm(grad_dots.T, x, out=destination)
                else:
                    rows_grad = mm_fp32_output(grad_dots.T, x)
                rows_grad.addcmul_(centers, radial_coef[:, None], value=-1.0)
                if not direct:
                    grad_values[row_start:row_stop] = rows_grad
        grad_embeddings = grad_x.to(embeddings.dtype) if want_x else None
        grad_weight = (
            sparse_row_grad(kept_rows(class_index, num_subcenters), grad_values, weight) if want_w else None
        )
        return grad_embeddings, grad_weight, None, None, None, None, None


def margin_softmax_stats_torch(
    embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size=None
):
    """Chunked (online-softmax) ``(lse, target_logit)``; see the module docstring.

    ``chunk_size``: classes per tile; None = ``DEFAULT_TILE_ROWS // num_subcenters``.
    """
    validate_margin_softmax_inputs(embeddings, weight, class_index, target_position, num_subcenters, margin)
    tile = tile_classes(num_subcenters, chunk_size)
    return _ChunkedMarginSoftmax.apply(
        embeddings, weight, class_index, target_position, num_subcenters, margin, tile
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
