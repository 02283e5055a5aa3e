"""Optimizers and the learning-rate schedule.

The head's centers get a gradient only on the rows that were sampled this step (a
sparse COO tensor from the margin-softmax op). ``RowSparseSGD`` and ``RowSparseAdamW``
update exactly those rows and their optimizer state, indexing rows rather than
densifying an ``(n*K, D)`` gradient. On a dense gradient (``sample_rate = 1``, or
any dense parameter) they reduce to ``torch.optim.SGD`` / ``AdamW`` step for step,
which the tests check.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


# Rows updated per block: bounds the temporaries of a sparse update to
# ROW_BLOCK x D whatever the shard size (a 1 M-row shard would otherwise copy GBs).
ROW_BLOCK = 65536


def _row_blocks(grad: torch.Tensor, num_rows: int):
    """Yield ``(rows or None, row gradients)`` blocks of a dense or sparse gradient.

    ``rows is None`` means a dense gradient of all rows (updated in place, no copy). A
    sparse gradient that covers every row (``sample_rate = 1``) is treated as dense too.
    """
    if not grad.is_sparse:
        yield None, grad
        return
    grad = grad.coalesce()  # sums duplicate rows (several forwards in one step)
    rows, values = grad.indices()[0], grad.values()
    if rows.numel() == num_rows:  # coalesced + unique + all present = arange, in order
        yield None, values
        return
    for first in range(0, rows.numel(), ROW_BLOCK):
        yield rows[first:first + ROW_BLOCK], values[first:first + ROW_BLOCK]


class RowSparseSGD(Optimizer):
    """SGD with momentum and L2 weight decay that touches only rows with a gradient."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings lr={lr} momentum={momentum} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if momentum and "momentum_buffer" not in state:
                    # Zero start equals torch's "first buffer = first update".
                    state["momentum_buffer"] = torch.zeros_like(param)
                for rows, grad in _row_blocks(param.grad, param.shape[0]):
                    if rows is None:
                        self._dense_update(param, grad, state, lr, momentum, decay)
                        continue
                    update = grad.add(param.index_select(0, rows), alpha=decay) if decay else grad.clone()
                    if momentum:
                        buffer = state["momentum_buffer"]
                        update = buffer.index_select(0, rows).mul_(momentum).add_(update)
                        buffer.index_copy_(0, rows, update)
                    param.index_add_(0, rows, update, alpha=-lr)
        return loss

    @staticmethod
    def _dense_update(param, grad, state, lr, momentum, decay):
        """All rows, in place: no temporary the size of the shard."""
        if momentum:
            buffer = state["momentum_buffer"].mul_(momentum).add_(grad)
            if decay:
                buffer.add_(param, alpha=decay)
            param.add_(buffer, alpha=-lr)
        else:
            if decay:
                param.mul_(1 - lr * decay)
            param.add_(grad, alpha=-lr)


class RowSparseAdamW(Optimizer):
    """AdamW whose moments and bias-correction step counts are kept per row.

    A row's moments decay only on the steps it is sampled (lazy Adam); its own step
    count drives the bias correction, so a rarely sampled row is not under-corrected.
    """

    def __init__(self, params: Iterable, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    state["row_step"] = torch.zeros(param.shape[0], dtype=torch.float64, device=param.device)
                for rows, grad in _row_blocks(param.grad, param.shape[0]):
                    if rows is None:
                        blocks = range(0, param.shape[0], ROW_BLOCK)
                        pieces = ((torch.arange(b, min(b + ROW_BLOCK, param.shape[0]), device=param.device),
                                   grad[b:b + ROW_BLOCK]) for b in blocks)
                    else:
                        pieces = ((rows, grad),)
                    for block_rows, block_grad in pieces:
                        self._update_rows(param, state, block_rows, block_grad, lr, beta1, beta2, eps, decay)
        return loss

    @staticmethod
    def _update_rows(param, state, rows, grad, lr, beta1, beta2, eps, decay):
        weight = param.index_select(0, rows)
        exp_avg = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2)
        exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
        step = state["row_step"].index_select(0, rows) + 1
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        state["row_step"].index_copy_(0, rows, step)
        shape = (-1,) + (1,) * (param.ndim - 1)
        correction1 = (1 - beta1 ** step).view(shape)
        correction2 = (1 - beta2 ** step).view(shape)
        denom = (exp_avg_sq.sqrt() / correction2.sqrt()).add_(eps)
        new_weight = weight * (1 - lr * decay) - (lr / correction1) * exp_avg / denom
        param.index_copy_(0, rows, new_weight.to(param.dtype))


def build_optimizer(name: str, params, *, lr: float, momentum: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float = 1e-8, row_sparse: bool = False) -> Optimizer:
    """The backbone gets torch's own optimizer; the head its row-sparse twin."""
    if name == "sgd":
        cls = RowSparseSGD if row_sparse else torch.optim.SGD
        return cls(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        cls = RowSparseAdamW if row_sparse else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adamw")


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str, poly_power: float = 2.0) -> float:
    """Linear warmup from 0 to 1, then polynomial or cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "poly":
        return (1.0 - progress) ** poly_power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose poly or cosine")


def build_scheduler(optimizer: Optimizer, *, total_steps: int, warmup_steps: int, schedule: str,
                    poly_power: float = 2.0) -> LambdaLR:
    """A per-iteration scheduler; call ``.step()`` after every optimizer step."""
    lr_multiplier(0, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule)  # validate name
    return LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps,
                                   schedule=schedule, poly_power=poly_power),
    )
