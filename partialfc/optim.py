"""Optimizers and the learning-rate schedule.

The head's centers get a gradient only on the rows that were sampled this step (a
sparse COO tensor from the margin-softmax op). ``RowSparseSGD`` and ``RowSparseAdamW``
update exactly those rows and their optimizer state, indexing rows rather than
densifying an ``(n*K, D)`` gradient. The updates are lazy: a row absent from the
gradient is untouched (no weight decay, no decay of its moments). On a dense gradient
(``sample_rate = 1``, or any dense parameter) they reduce to ``torch.optim.SGD`` /
``AdamW`` step for step, which the tests check, as they check strict row subsets
against a row-by-row reference.

Memory: the update is in place. When the rows form one contiguous run (every row at
``sample_rate = 1``, or a dense gradient) the arithmetic runs on slice views of the
weights and state, with no copy at all (AdamW needs one ``ROW_BLOCK x D`` scratch for
its denominator). Otherwise the rows are gathered ``ROW_BLOCK`` at a time into scratch
blocks allocated once per step, updated there and written back, so the temporaries are
a few ``ROW_BLOCK x D`` blocks whatever the shard size. The gradient's rows are used as
they come when sorted and unique, which is what the head's backward produces: autograd
drops the sparse tensor's "coalesced" flag when it stores ``.grad``, and ``coalesce()``
would copy every value again.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


# Rows per gathered block: the scratch of a sparse update is a few ROW_BLOCK x D blocks
# (8 MiB each at D = 512, fp32) whatever the number of rows; large enough that the
# per-block launches do not matter, small enough to stay far below the weights.
ROW_BLOCK = 4096


class _GradRows(NamedTuple):
    """The rows a gradient touches: a contiguous ``span`` or sorted unique ``index``."""

    span: Optional[slice]
    index: Optional[torch.Tensor]
    values: torch.Tensor


def _grad_rows(grad: torch.Tensor, num_rows: int) -> Optional[_GradRows]:
    """Rows of a dense or row-sparse gradient, duplicates summed; None if it has none.

    A dense gradient is the span of all rows. A sparse one is used as it is when its
    rows are sorted and unique; otherwise (several backward passes accumulated into
    one step, or any unordered input) it is coalesced, which sorts and sums duplicates.
    """
    if not grad.is_sparse:
        return _GradRows(slice(0, num_rows), None, grad) if num_rows else None
    if grad.sparse_dim() != 1:
        raise ValueError(f"a row-sparse gradient must be sparse in its first dimension only, "
                         f"got sparse_dim={grad.sparse_dim()} for shape {tuple(grad.shape)}")
    rows, values = grad._indices()[0], grad._values()
    if rows.numel() == 0:
        return None
    if grad.is_coalesced():
        ordered = torch.ones((), dtype=rows.dtype, device=rows.device)
    else:
        ordered = (rows[1:] > rows[:-1]).all().to(rows.dtype)
    # One host sync per parameter and step (marked: which update runs depends on it, and
    # it replaces the sync coalesce() would make): sorted and unique? first and last row?
    is_ordered, first, last = torch.stack([ordered, rows[0], rows[-1]]).tolist()
    if not is_ordered:
        grad = grad.coalesce()
        rows, values = grad._indices()[0], grad._values()
        first, last = rows[[0, -1]].tolist()  # host sync: coalescing has synced already
    if last - first + 1 == rows.numel():  # sorted + unique + as many as the span: the span itself
        return _GradRows(slice(first, last + 1), None, values)
    return _GradRows(None, rows, values)


def _row_blocks(touched: _GradRows, tensors: list, split_span: bool):
    """Yield ``(rows of each tensor, their gradient rows)`` to be updated in place.

    ``tensors`` are the weights and the state sharing their rows. A contiguous span
    yields slice views (whole, or ``ROW_BLOCK`` rows at a time with ``split_span`` for an
    update that needs scratch per row). Scattered rows are gathered ``ROW_BLOCK`` at a
    time into buffers allocated once for the step and, after the caller has updated
    them, copied back to their rows.
    """
    count = touched.values.shape[0]
    if touched.span is not None:
        start = touched.span.start
        block = min(ROW_BLOCK, count) if split_span else count
        for first in range(0, count, block):
            rows = slice(start + first, start + min(first + block, count))
            yield [t[rows] for t in tensors], touched.values[first:first + block]
        return
    block = min(ROW_BLOCK, count)
    buffers = [torch.empty((block,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for t in tensors]
    for first in range(0, count, block):
        index = touched.index[first:first + block]
        gathered = [torch.index_select(t, 0, index, out=b[:index.numel()]) for t, b in zip(tensors, buffers)]
        yield gathered, touched.values[first:first + block]
        for tensor, rows in zip(tensors, gathered):
            tensor.index_copy_(0, index, rows)


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
                touched = _grad_rows(param.grad, param.shape[0])
                if touched is None:
                    continue
                tensors = [param, state["momentum_buffer"]] if momentum else [param]
                for rows, grad in _row_blocks(touched, tensors, split_span=False):
                    self._update(*rows, grad=grad, lr=lr, momentum=momentum, decay=decay)
        return loss

    @staticmethod
    def _update(weight, buffer=None, *, grad, lr, momentum, decay):
        """In place on rows of the weights and momentum (views or gathered copies).

        ``buffer = momentum * buffer + grad + decay * weight``, ``weight -= lr * buffer``;
        without momentum ``weight = (1 - lr * decay) * weight - lr * grad``.
        """
        if momentum:
            buffer.mul_(momentum).add_(grad)
            if decay:
                buffer.add_(weight, alpha=decay)
            weight.add_(buffer, alpha=-lr)
        else:
            if decay:
                weight.mul_(1 - lr * decay)
            weight.add_(grad, alpha=-lr)


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
            settings = dict(lr=group["lr"], betas=group["betas"], eps=group["eps"], decay=group["weight_decay"])
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    state["row_step"] = torch.zeros(param.shape[0], dtype=torch.float64, device=param.device)
                touched = _grad_rows(param.grad, param.shape[0])
                if touched is None:
                    continue
                scratch = torch.empty((min(ROW_BLOCK, touched.values.shape[0]),) + tuple(param.shape[1:]),
                                      dtype=param.dtype, device=param.device)
                tensors = [param, state["exp_avg"], state["exp_avg_sq"], state["row_step"]]
                for rows, grad in _row_blocks(touched, tensors, split_span=True):
                    self._update(*rows, grad=grad, scratch=scratch[:grad.shape[0]], **settings)
        return loss

    @staticmethod
    def _update(weight, exp_avg, exp_avg_sq, row_step, *, grad, scratch, lr, betas, eps, decay):
        """In place on rows of the weights and state (views or gathered copies).

        Per row, with its own step count t: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 -
        b2) g^2``, ``w = (1 - lr decay) w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t)
        + eps)``, as torch.optim.AdamW. ``scratch`` (same shape) holds the denominator
        and then the step; the per-row factors are computed in float64, like torch's
        Python-float bias corrections.
        """
        beta1, beta2 = betas
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        row_step.add_(1)
        shape = (-1,) + (1,) * (weight.ndim - 1)
        root_correction2 = (1 - beta2 ** row_step).sqrt_().to(weight.dtype).view(shape)
        step_size = (lr / (1 - beta1 ** row_step)).to(weight.dtype).view(shape)
        denom = torch.sqrt(exp_avg_sq, out=scratch).div_(root_correction2).add_(eps)
        update = torch.div(exp_avg, denom, out=scratch).mul_(step_size)
        weight.mul_(1 - lr * decay).sub_(update)


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
