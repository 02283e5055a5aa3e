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

All functions take the process group explicitly; ``group=None`` with no initialized
process group means one rank, and every function is then the identity, which is how
the single-process tests run the same code.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

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
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = torch.exp(local_lse - global_max)
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
