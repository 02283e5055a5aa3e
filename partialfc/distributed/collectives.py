"""Autograd-aware collectives for the model-parallel head.

Every rank computes the *same* scalar loss (the mean over the global batch) and runs
backward on it. Autograd on rank ``r`` then yields the derivative of that loss with
respect to rank ``r``'s own tensors, treating what other ranks contributed as
constants. From that rule follow the backward passes below:

* ``all_gather_with_grad``: the gathered embeddings feed every rank's logits, so the
  true gradient of one rank's slice is the *sum* over ranks of their partial
  gradients -> reduce-scatter (sum) in backward.
* ``global_logsumexp``: ``lse = log sum_r exp(lse_r)``; d lse / d lse_r is
  ``exp(lse_r - lse)``, computable locally -> no communication in backward.
* ``sum_across_ranks_local_grad``: ``t = sum_r t_r`` with d t / d t_r = 1 -> the
  gradient passes through unchanged, again with no communication.
* ``all_reduce_with_grad``: ``s = sum_r a_r`` that every rank then *uses* in its own
  share of the loss (the geodesic inter-loss sends each sample's target center to all
  ranks this way), so d loss / d a_r is the sum over ranks of their partial gradients
  -> all-reduce (sum) in backward.
* ``all_gather_batch``: the head's gather of a batch whose size may differ per rank
  (padding, then dropping the pad rows), plus where this rank's rows start.

All functions take the process group explicitly; ``group=None`` with no initialized
process group means one rank, and every function is then the identity, which is how
the single-process tests run the same code.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from partialfc.step_timer import phase

ProcessGroup = Optional["dist.ProcessGroup"]

# torch >= 2.12 renamed the tensor-output collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_distributed(group: ProcessGroup = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: ProcessGroup = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: ProcessGroup = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def all_gather_no_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0 (rank order)."""
    if not is_distributed(group):
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty((world_size(group) * tensor.shape[0], *tensor.shape[1:]))
    with phase("communication"):  # step_timer: a no-op unless the trainer installed a timer
        _all_gather_single(out, tensor, group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_no_grad(tensor, group)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        group = ctx.group
        size = world_size(group)
        grad_output = grad_output.contiguous()
        grad_input = grad_output.new_empty((grad_output.shape[0] // size, *grad_output.shape[1:]))
        # Sum of every rank's partial gradient for this rank's slice.
        with phase("communication"):
            _reduce_scatter_single(grad_input, grad_output, op=dist.ReduceOp.SUM, group=group)
        return grad_input, None


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Differentiable all-gather along dim 0; backward reduce-scatters (sums) the gradient."""
    if not is_distributed(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


class _GlobalLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_lse: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        # Max first so exp() cannot overflow: M = max_r lse_r, S = sum_r exp(lse_r - M).
        global_max = local_lse.detach().clone()
        with phase("communication"):
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = torch.exp(local_lse - global_max)
        with phase("communication"):
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        global_lse = global_max + torch.log(sum_exp)
        ctx.save_for_backward(local_lse, global_lse)
        return global_lse

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        local_lse, global_lse = ctx.saved_tensors
        # This rank's share of the softmax mass: d lse / d lse_r = exp(lse_r - lse).
        return grad_output * torch.exp(local_lse - global_lse), None


def global_logsumexp(local_lse: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """``log sum_r exp(local_lse_r)`` elementwise across ranks, differentiable locally."""
    if not is_distributed(group):
        return local_lse
    return _GlobalLogSumExp.apply(local_lse, group)


class _SumLocalGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        total = tensor.detach().clone()
        with phase("communication"):
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def sum_across_ranks_local_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """All-reduce(SUM) whose backward is the identity (see the module docstring)."""
    if not is_distributed(group):
        return tensor
    return _SumLocalGrad.apply(tensor, group)


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _SumLocalGrad.forward(ctx, tensor, group)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Every rank used the sum in its share of the loss: this rank's input gets all of them.
        grad_input = grad_output.contiguous().clone()
        with phase("communication"):
            dist.all_reduce(grad_input, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_input, None


def all_reduce_with_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """All-reduce(SUM) used by every rank downstream; backward all-reduces the gradient."""
    if not is_distributed(group):
        return tensor
    return _AllReduceWithGrad.apply(tensor, group)


def all_gather_batch(embeddings: torch.Tensor, labels: torch.Tensor, group: ProcessGroup = None,
                     expected_size: Optional[int] = None):
    """``(gathered embeddings, gathered labels, offset)`` of a batch split over the ranks.

    Rows are in rank order; ``offset`` is where this rank's own rows start in the
    gathered batch (a host int). The embeddings' gather is differentiable. Ranks may
    hold different batch sizes (the last batch of an epoch): then every rank pads to the
    largest, gathers, and drops the pad rows. ``expected_size``: the size every rank was
    promised (the trainer's micro-batch), so the sizes need no gather and no host sync
    (``partialfc.distributed.batch_sizes``).
    """
    if not is_distributed(group):
        return embeddings, labels, 0
    from partialfc.distributed.batch_sizes import batch_sizes  # it builds on this module

    # Without a promised size: one tiny collective + host sync, since all_gather needs
    # equal shapes and the offset of this rank's rows is needed on the host to slice them.
    sizes = batch_sizes(embeddings.shape[0], embeddings.device, group, expected_size)
    offset = sum(sizes[:rank(group)])
    max_size = max(sizes)
    if max_size == min(sizes):
        return all_gather_with_grad(embeddings, group), all_gather_no_grad(labels, group), offset
    pad = max_size - embeddings.shape[0]
    padded = torch.nn.functional.pad(embeddings, (0, 0, 0, pad))
    padded_labels = torch.nn.functional.pad(labels, (0, pad), value=-1)
    gathered = all_gather_with_grad(padded, group)
    gathered_labels = all_gather_no_grad(padded_labels, group)
    valid = torch.cat([torch.arange(max_size, device=labels.device) < s for s in sizes])
    return gathered[valid], gathered_labels[valid], offset
