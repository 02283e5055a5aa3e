"""Add extra row gradients of the centers into the margin softmax's sparse gradient, in place.

Why this exists: autograd sums two sparse gradients of one tensor by building a new
one with room for both (zero-filled, ``kept rows x D`` twice), so a penalty that reads
the centers besides the margin softmax -- the geodesic intra- and inter-loss -- would
briefly cost two to three extra copies of the kept rows' gradient (measured: about 2x
weights + momentum at 1e5 classes per rank, r = 1, for the inter-loss).

Instead, when a penalty is on, the head hands every consumer of the centers one alias,
``fold_into(weight, stash)``. The penalties' backward passes return no gradient for the
alias; they leave their row gradients in the ``RowGradStash``. Autograd runs the alias's
own backward only after every consumer's (each holds an edge to it), and there the
stash is added into the gradient that arrived, the margin softmax's, in place: that
gradient is a coalesced sparse tensor over exactly the kept rows (the contract of the
fused implementations, ``kernels.margin_softmax_ref.sparse_row_grad``). Any other
layout (the naive path's uncoalesced gradient, a dense one, none) takes a general sum,
which is correct and merely copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RowGradStash", "fold_into", "gather_rows"]


class RowGradStash:
    """Row gradients of the centers left by the penalty terms of one forward.

    ``class_index`` (sorted kept local classes) and ``num_subcenters`` define the kept
    rows ``c * K + k`` in order; positions below index that order.
    """

    def __init__(self, class_index: torch.Tensor, num_subcenters: int) -> None:
        self.class_index, self.num_subcenters = class_index, num_subcenters
        self.num_kept_rows = class_index.shape[0] * num_subcenters
        self.weight_rows = 0  # rows of the whole center shard; set by fold_into
        self.all_rows = None  # (num_kept_rows, D): a gradient of every kept row, or None
        self.some_rows = []  # [(positions (n,), gradients (n, D))], positions may repeat

    def add_all_rows(self, grad_rows: torch.Tensor) -> None:
        self.all_rows = grad_rows if self.all_rows is None else self.all_rows.add_(grad_rows)

    def add_rows(self, positions: torch.Tensor, grads: torch.Tensor) -> None:
        self.some_rows.append((positions, grads))

    def fold(self, grad):
        """``grad`` (what reached the alias) plus everything stashed; empties the stash."""
        all_rows, some_rows = self.all_rows, self.some_rows
        self.all_rows, self.some_rows = None, []
        if all_rows is None and not some_rows:
            return grad
        if grad is not None and grad.is_sparse and grad.is_coalesced() and grad._nnz() == self.num_kept_rows:
            # Sorted, unique, only kept rows and as many as there are: exactly the kept rows, in order.
            values = grad._values()
            if all_rows is not None:
                values.add_(all_rows.to(values.dtype))
            for positions, grads in some_rows:
                values.index_add_(0, positions, grads.to(values.dtype))
            return grad
        from partialfc.kernels.margin_softmax_ref import kept_rows

        row_ids = kept_rows(self.class_index, self.num_subcenters)
        if grad is not None and not grad.is_sparse:
            if all_rows is not None:
                grad.index_add_(0, row_ids, all_rows.to(grad.dtype))
            for positions, grads in some_rows:
                grad.index_add_(0, row_ids[positions], grads.to(grad.dtype))
            return grad
        indices = ([row_ids] if all_rows is not None else []) + [row_ids[p] for p, _ in some_rows]
        values = ([all_rows] if all_rows is not None else []) + [g for _, g in some_rows]
        shape = (grad.shape[0] if grad is not None else self.weight_rows, values[0].shape[1])
        extra = torch.sparse_coo_tensor(torch.cat(indices)[None, :], torch.cat(values), shape,
                                        check_invariants=False)  # kept rows of a validated class_index
        return extra if grad is None else grad + extra.to(grad.dtype)


class _FoldInto(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, stash):
        ctx.stash = stash
        return weight.detach()  # same storage: an alias whose backward folds the stash in

    @staticmethod
    def backward(ctx, grad):
        return ctx.stash.fold(grad), None


def fold_into(weight: torch.Tensor, stash: RowGradStash) -> torch.Tensor:
    """An alias of ``weight`` for every consumer of the centers in one forward (module docstring)."""
    stash.weight_rows = weight.shape[0]
    return _FoldInto.apply(weight, stash)


class _GatherRowsToStash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, row_ids, kept_positions, stash):
        ctx.stash, ctx.kept_positions = stash, kept_positions
        return weight.index_select(0, row_ids.reshape(-1)).view(*row_ids.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad):
        ctx.stash.add_rows(ctx.kept_positions.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return None, None, None, None


def gather_rows(weight, row_ids, kept_positions, stash=None):
    """``weight[row_ids]``; the gradient goes to ``stash`` at ``kept_positions`` (or, without
    a stash, to ``weight`` as a sparse COO tensor, like ``F.embedding(sparse=True)``)."""
    if stash is None:
        return F.embedding(row_ids, weight, sparse=True)
    return _GatherRowsToStash.apply(weight, row_ids, kept_positions, stash)
