"""The ArcFace paper's geodesic penalties, added to the sharded margin softmax.

The paper compares its additive angular margin with three losses that act on angles
(geodesic distances on the unit hypersphere) directly, alone and combined with it. With
``L2`` the margin-softmax loss the head computes, ``theta_y`` the angle between a sample
and its target center and ``N`` the number of classes, per sample:

* intra-loss   ``L2 + w_intra * theta_y / pi``: pulls each sample to its center;
* inter-loss   ``L2 - w_inter / (pi * (N - 1)) * sum_{j != y} acos(W_y . W_j)``: pushes
  the target center away from every other center (centers normalized);
* triplet-loss ``L2 + w_triplet * max(0, acos(x . x_pos) + m - acos(x . x_neg))`` on the
  samples of the gathered global batch, batch-hard mining (below).

Every term is averaged over the global batch like ``L2``, so the head's loss stays the
mean over the global batch, the same scalar on every rank.

Sub-centers (K > 1), defined here: the target center of a sample is its *matched*
sub-center, the one of its class nearest to it (the max-pooled cosine the margin
uses). ``theta_y`` is the angle to that sub-center, and in the inter-loss ``W_y`` is
that sub-center while ``j`` runs over every sub-center of every other class: the sum
has ``(N - 1) * K`` terms and is divided by that count. The other sub-centers of the
target class are left out (they are the same identity).

Partial FC sampling (``r < 1``): the inter-loss runs over the centers kept this step
and divides by their count. Every class of the global batch is kept (so every ``W_y``
is there) plus a uniform sample of the others, so it is the mean angle to that subset:
the batch's classes weigh more than in the ``r = 1`` mean, which it only estimates. At
``r = 1`` it is exact. The head logs this once when built with ``r < 1``. Intra and
triplet do not depend on sampling.

Gradients are the true ones: ``d acos(c) / dc = -1 / sqrt(1 - c^2)``, which is infinite
at ``c = +-1`` (a sample exactly on its center, two identical samples). There the slope
is evaluated at ``c`` clamped into ``[-1 + ACOS_SLOPE_EPS, 1 - ACOS_SLOPE_EPS]``: at most
``1 / sqrt(2e-6 - 1e-12) = 707.1`` in magnitude (702.5 in float32, where ``1 - 1e-6``
rounds to ``1 - 1.013e-6``). The forward angle is not clamped (``acos(1) = 0``).

Cost (``benchmarks/results/head.md`` has measurements). Intra: ``B x K x D`` work on the
owner of each target. Inter: three GEMMs per tile of kept centers (about the margin
softmax's own cost) and, in memory, a few ``B x tile`` buffers plus the gradient of the
kept rows, held from forward to backward. Triplet: ``b x B`` cosines per rank. In the
head, the intra and inter row gradients are added into the margin softmax's sparse
gradient in place (``center_grad_fold``), so no second sparse gradient is summed.

Triplet mining rule (batch-hard, over the gathered global batch): for each anchor, its
hardest positive is the other sample of its label at the *largest* angle, its hardest
negative the sample of another label at the *smallest* angle. Anchors with no other
sample of their label, or no sample of another label, are skipped; the loss is the sum
of the hinges over the valid anchors of all ranks divided by their number (0 when
there are none). Mining runs under ``no_grad`` (the choice is piecewise constant); the
loss on the chosen pairs has the true gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from partialfc.distributed import collectives
from partialfc.head.center_grad_fold import gather_rows

__all__ = [
    "ACOS_SLOPE_EPS",
    "DEFAULT_TRIPLET_MARGIN",
    "AngularTripletLoss",
    "GeodesicPenalties",
    "acos_slope",
    "angular_triplet_loss",
    "clamped_acos",
    "inter_loss",
    "intra_loss",
    "matched_target_centers",
    "mine_batch_hard",
]

# Where d acos / dc is evaluated instead of at +-1 (see the module docstring).
ACOS_SLOPE_EPS = 1e-6
# 0.35 rad (20 degrees) between a sample's hardest positive and hardest negative: below
# ArcFace's sample-to-center margin of 0.5 rad because a sample-to-sample angle carries
# the noise of two samples, and large enough that a trained model's genuine pairs (well
# under 60 degrees) and impostors (near 90 degrees) meet it without the hinge staying on.
DEFAULT_TRIPLET_MARGIN = 0.35


def acos_slope_(cos: torch.Tensor) -> torch.Tensor:
    """``acos_slope`` written over ``cos`` (one temporary of its size, for the B x tile buffers)."""
    cos.clamp_(-1.0 + ACOS_SLOPE_EPS, 1.0 - ACOS_SLOPE_EPS)
    one_plus = cos + 1.0
    # (1 - c)(1 + c), not 1 - c^2: no cancellation near +-1, where the slope matters most.
    return cos.neg_().add_(1.0).mul_(one_plus).rsqrt_().neg_()


def acos_slope(cos: torch.Tensor) -> torch.Tensor:
    """``d acos(c) / dc = -1 / sqrt(1 - c^2)`` at ``c`` clamped ``ACOS_SLOPE_EPS`` inside +-1."""
    return acos_slope_(cos.clone())


class _ClampedAcos(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos)
        return torch.acos(cos.clamp(-1.0, 1.0))  # rounding can put a cosine a hair past 1

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (cos,) = ctx.saved_tensors
        return grad_output * acos_slope(cos)


def clamped_acos(cos: torch.Tensor) -> torch.Tensor:
    """The angle ``acos(c)`` with a finite slope at ``c = +-1`` (``acos_slope``)."""
    return _ClampedAcos.apply(cos)


@dataclass(frozen=True)
class GeodesicPenalties:
    """Weights of the three penalty terms and the triplet margin (radians); 0 = off."""

    intra: float = 0.0
    inter: float = 0.0
    triplet: float = 0.0
    triplet_margin: float = DEFAULT_TRIPLET_MARGIN

    def __post_init__(self) -> None:
        names = {"intra": "intra_weight", "inter": "inter_weight", "triplet": "triplet_weight",
                 "triplet_margin": "triplet_margin"}
        for field, name in names.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.triplet_margin >= math.pi:
            raise ValueError(f"triplet_margin is an angle in [0, pi), got {self.triplet_margin}")

    @property
    def active(self) -> bool:
        return self.intra > 0 or self.inter > 0 or self.triplet > 0

    @property
    def reads_centers(self) -> bool:
        """Intra and inter read the centers (the triplet term only the embeddings)."""
        return self.intra > 0 or self.inter > 0


# ------------------------------------------------------------------ intra / target centers
def matched_target_centers(x, weight, class_index, target_position, num_subcenters, stash=None):
    """``(cos_y, w_y)`` of each gathered sample whose target this rank owns; zeros elsewhere.

    ``x`` (B, D) are the normalized gathered embeddings, ``target_position`` the index of
    each label in ``class_index`` (-1 where another rank owns it). ``w_y`` is the
    normalized matched sub-center (module docstring), ``cos_y`` the cosine to it. The
    target rows' gradient goes to ``stash`` (``center_grad_fold``) or, without one, to
    ``weight`` as a sparse COO tensor; rows of samples owned elsewhere read the first
    kept class (a kept row either way) and get exact zeros.
    """
    owned = target_position >= 0
    position = target_position.clamp(min=0)
    offsets = torch.arange(num_subcenters, device=x.device)
    row_ids = class_index[position][:, None] * num_subcenters + offsets
    rows = gather_rows(weight, row_ids, position[:, None] * num_subcenters + offsets, stash)  # (B, K, D)
    centers = F.normalize(rows.to(x.dtype), dim=2)
    cos = torch.bmm(centers, x[:, :, None]).squeeze(2)  # (B, K)
    best = cos.detach().argmax(dim=1, keepdim=True)  # first of equal maxima, as the kernels' max()
    cos_y = cos.gather(1, best).squeeze(1)
    w_y = centers.gather(1, best[:, :, None].expand(-1, 1, centers.shape[2])).squeeze(1)
    return torch.where(owned, cos_y, 0.0), torch.where(owned[:, None], w_y, 0.0)


def intra_loss(cos_y: torch.Tensor) -> torch.Tensor:
    """``mean(theta_y) / pi`` from the global target cosines (summed from the owners)."""
    return clamped_acos(cos_y).mean() / math.pi


# ------------------------------------------------------------------ inter
def _normalized_rows_backward_(rows, inv_norm, grad, norm_eps):
    """Chain ``grad`` (d loss / d normalized row) through ``w / max(||w||, eps)`` in place.

    The in-place twin of ``kernels``' ``normalized_rows_backward``: it overwrites the
    gradient rows the tile already holds instead of building ``tile x D`` temporaries.
    With ``s = 1 / max(||w||, eps)``: ``s * g - s^3 * w (w . g)`` above eps, ``s * g`` below.
    """
    radial = torch.einsum("rd,rd->r", rows, grad)
    coefficient = torch.where(inv_norm < 1.0 / norm_eps, radial * inv_norm.pow(3), 0.0)
    return grad.mul_(inv_norm[:, None]).addcmul_(rows, coefficient[:, None], value=-1.0)


class _InterAngleSum(torch.autograd.Function):
    """``sum_i sum_j acos(t_i . w_hat_j)`` over this rank's kept rows, own class left out.

    The output is one scalar, so its gradient is the upstream scalar times a fixed
    tensor: the forward computes that tensor tile by tile right after each tile's
    angles (2 GEMMs more per tile, no recompute pass and no ``B x n`` buffer), and the
    backward only scales it. Gradient of the centers: every kept row, left in ``stash``
    (``center_grad_fold``) or, without one, returned as a sparse COO tensor over them.
    """

    @staticmethod
    def forward(ctx, targets, weight, class_index, target_position, num_subcenters, tile, with_grad, stash):
        from partialfc.kernels.margin_softmax_ref import NORM_EPS, ClassTiles, kept_rows

        k_sub, num_kept = num_subcenters, class_index.shape[0]
        # needs_input_grad is set under no_grad too: with_grad (grad mode at the call) decides.
        want_targets, want_weight = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        total = targets.new_zeros(())
        grad_targets = torch.zeros_like(targets) if want_targets else None
        grad_rows = targets.new_empty(num_kept * k_sub, targets.shape[1]) if want_weight else None
        offsets = torch.arange(k_sub, device=targets.device)
        # The margin softmax's tiling: a slice view of the rows when the kept classes are one run.
        tiles = ClassTiles(weight, class_index, target_position, k_sub, tile, targets.dtype, targets.dtype)
        for start, stop in tiles:
            rows = tiles.centers(start, stop)
            inv_norm = rows.norm(dim=1).clamp_min(NORM_EPS).reciprocal()
            # GEMM on the raw rows, columns scaled after: no normalized tile x D copy.
            cos = torch.mm(targets, rows.T).mul_(inv_norm)  # (B, tile rows)
            # The K columns of each sample's own class, where this tile holds it: zeroed.
            in_tile, own_class = tiles.targets(start, stop)
            in_tile, own_columns = in_tile[:, None], own_class * k_sub + offsets
            angles = cos.clamp(-1.0, 1.0).acos_()
            angles.scatter_(1, own_columns, torch.where(in_tile, 0.0, angles.gather(1, own_columns)))
            total += angles.sum()
            del angles
            if want_targets or want_weight:
                slope = acos_slope_(cos)  # cos is not needed any more
                slope.scatter_(1, own_columns, torch.where(in_tile, 0.0, slope.gather(1, own_columns)))
                if want_weight:  # d / d normalized row = slope^T targets, then through the norm
                    tile_grad = torch.mm(slope.T, targets, out=grad_rows[start * k_sub:stop * k_sub])
                    _normalized_rows_backward_(rows, inv_norm, tile_grad, NORM_EPS)
                if want_targets:  # d / d targets = slope . normalized rows = (slope * inv_norm) . rows
                    grad_targets.addmm_(slope.mul_(inv_norm), rows)
        ctx.row_ids = kept_rows(class_index, k_sub) if want_weight and stash is None else None
        ctx.stash, ctx.consumed = stash, False
        ctx.save_for_backward(grad_targets, grad_rows, weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        from partialfc.kernels.margin_softmax_ref import sparse_row_grad

        if ctx.consumed:  # the saved gradient is scaled in place (a kept_rows x D copy saved)
            raise RuntimeError("the inter-loss gradient was already used by an earlier backward "
                               "(retain_graph is not supported by the geodesic inter-loss)")
        ctx.consumed = True
        grad_targets, grad_rows, weight = ctx.saved_tensors
        if grad_targets is not None:
            grad_targets = grad_targets.mul_(grad_total)
        grad_weight = None
        if grad_rows is not None and ctx.stash is not None:
            ctx.stash.add_all_rows(grad_rows.mul_(grad_total))
        elif grad_rows is not None:
            grad_weight = sparse_row_grad(ctx.row_ids, grad_rows.mul_(grad_total), weight)
        return grad_targets, grad_weight, None, None, None, None, None, None


def inter_loss(targets, weight, class_index, target_position, num_subcenters, *, tile, group=None, stash=None):
    """``-(1/pi) * mean_i [sum_{j != y_i} acos(W_yi . W_j) / count]`` over all ranks' kept centers.

    ``targets`` (B, D) are the normalized matched target centers of the global batch,
    identical on every rank (``collectives.all_reduce_with_grad`` of the owners'
    rows). Each rank sums over its own kept rows, tiled by ``tile`` classes; the sums
    and the kept-row counts are all-reduced; ``count = sum_r kept_r * K - K`` (every
    other kept row: ``(N - 1) * K`` at ``r = 1``). ``stash``: see
    ``center_grad_fold`` (the head passes one so no second sparse gradient is summed).
    """
    local_sum = _InterAngleSum.apply(targets, weight, class_index, target_position, num_subcenters, tile,
                                     torch.is_grad_enabled(), stash)
    total = collectives.sum_across_ranks_local_grad(local_sum, group)
    kept = torch.full((), float(class_index.shape[0] * num_subcenters), dtype=targets.dtype,
                      device=targets.device)
    count = (collectives.sum_across_ranks_local_grad(kept, group) - num_subcenters).clamp_min(1.0)
    return -total / (math.pi * targets.shape[0] * count)


# ------------------------------------------------------------------ triplet
@torch.no_grad()
def mine_batch_hard(anchor_cos, anchor_labels, all_labels, offset):
    """``(positive, negative, valid)`` per anchor: indices into the gathered batch.

    ``anchor_cos`` (b, B) are the cosines of this rank's anchors (gathered rows
    ``offset .. offset + b``) to the whole gathered batch. Hardest positive: smallest
    cosine (largest angle) among the other samples of the label; hardest negative:
    largest cosine among the other labels. ``valid``: both exist.
    """
    num_anchors = anchor_cos.shape[0]
    same = anchor_labels[:, None] == all_labels[None, :]
    positive_mask = same.clone()
    anchor_rows = torch.arange(num_anchors, device=anchor_cos.device)
    positive_mask[anchor_rows, anchor_rows + offset] = False  # an anchor is not its own positive
    positive = anchor_cos.masked_fill(~positive_mask, math.inf).argmin(dim=1)
    negative = anchor_cos.masked_fill(same, -math.inf).argmax(dim=1)
    valid = positive_mask.any(dim=1) & ~same.all(dim=1)
    return positive, negative, valid


def angular_triplet_loss(all_x, all_labels, offset, num_local, margin, group=None):
    """Batch-hard triplet hinge on angles; anchors are this rank's rows of the gathered batch.

    ``all_x`` (B, D): normalized gathered embeddings (identical on every rank, gathered
    with ``all_gather_with_grad``), this rank's rows at ``offset .. offset + num_local``.
    Each rank takes only its own anchors (against every gathered sample) so that the
    gather's backward, which sums the ranks' partial gradients, counts each anchor once;
    the hinge sums and valid-anchor counts are then summed across ranks.
    """
    anchors = all_x[offset:offset + num_local]
    anchor_labels = all_labels[offset:offset + num_local]
    positive, negative, valid = mine_batch_hard(anchors.detach() @ all_x.detach().T, anchor_labels, all_labels,
                                                offset)
    positive_angle = clamped_acos((anchors * all_x[positive]).sum(dim=1))
    negative_angle = clamped_acos((anchors * all_x[negative]).sum(dim=1))
    hinge = torch.where(valid, F.relu(positive_angle - negative_angle + margin), 0.0)
    total = collectives.sum_across_ranks_local_grad(hinge.sum(), group)
    count = collectives.sum_across_ranks_local_grad(valid.sum().to(all_x.dtype), group)
    return total / count.clamp_min(1.0)


class AngularTripletLoss(nn.Module):
    """Batch-hard triplet loss on angles over the global batch (the rule in the module docstring).

    ``loss = AngularTripletLoss(margin)(local_embeddings, local_labels)``: the embeddings
    are normalized, gathered from every rank of ``process_group`` (differentiably; the
    ranks may hold different batch sizes) and mined together; the loss is the same
    scalar on every rank, like the head's. Without a process group it is one rank.
    """

    def __init__(self, margin: float = DEFAULT_TRIPLET_MARGIN, *, process_group=None) -> None:
        super().__init__()
        self.margin = GeodesicPenalties(triplet_margin=margin).triplet_margin  # validated there
        self.process_group = process_group

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining=batch_hard"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (batch, dim), got shape {tuple(embeddings.shape)}")
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must be (batch,) = ({embeddings.shape[0]},), got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        x = F.normalize(embeddings.float() if embeddings.dtype != torch.float64 else embeddings, dim=1)
        labels = labels.to(device=x.device, dtype=torch.long)
        all_x, all_labels, offset = collectives.all_gather_batch(x, labels, self.process_group)
        return angular_triplet_loss(all_x, all_labels, offset, x.shape[0], self.margin, self.process_group)
