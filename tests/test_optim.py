"""Row-sparse optimizers equal torch's on dense gradients and touch only given rows."""
from __future__ import annotations

import math

import pytest
import torch

from partialfc.optim import RowSparseAdamW, RowSparseSGD, build_scheduler, lr_multiplier


def run(opt_cls, kwargs, grads, sparse_rows=None):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = opt_cls([param], **kwargs)
    for grad in grads:
        if sparse_rows is not None:
            rows = torch.tensor(sparse_rows)
            param.grad = torch.sparse_coo_tensor(rows[None], grad[rows], grad.shape)
        else:
            param.grad = grad.clone()
        opt.step()
    return param.detach(), opt


def grads(n=4):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(n)]


def test_sgd_dense_equals_torch():
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    ours, _ = run(RowSparseSGD, kw, grads())
    theirs, _ = run(torch.optim.SGD, kw, grads())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_adamw_dense_equals_torch():
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours, _ = run(RowSparseAdamW, kw, grads())
    theirs, _ = run(torch.optim.AdamW, kw, grads())
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls,kw", [(RowSparseSGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
                                    (RowSparseAdamW, dict(lr=0.01, weight_decay=0.05))])
def test_sparse_touches_only_given_rows(cls, kw):
    torch.manual_seed(0)
    start = torch.randn(6, 4, dtype=torch.float64)
    after, opt = run(cls, kw, grads(), sparse_rows=[1, 4])
    untouched = [0, 2, 3, 5]
    torch.testing.assert_close(after[untouched], start[untouched], rtol=0, atol=0)
    assert not torch.equal(after[[1, 4]], start[[1, 4]])
    state = next(iter(opt.state.values()))
    for value in state.values():
        assert torch.count_nonzero(value[untouched]) == 0


def test_sparse_rows_match_dense_rows():
    """Rows always sampled evolve exactly as under the dense optimizer."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    sparse, _ = run(RowSparseSGD, kw, grads(), sparse_rows=[0, 1, 2, 3, 4, 5])
    dense, _ = run(torch.optim.SGD, kw, grads())
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)


def test_schedule_warmup_then_decay():
    assert lr_multiplier(0, total_steps=100, warmup_steps=10, schedule="poly") == pytest.approx(0.1)
    assert lr_multiplier(9, total_steps=100, warmup_steps=10, schedule="poly") == pytest.approx(1.0)
    assert lr_multiplier(55, total_steps=100, warmup_steps=10, schedule="poly") == pytest.approx(0.25)
    assert lr_multiplier(55, total_steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, total_steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), total_steps=3,
                        warmup_steps=0, schedule="step")


@pytest.mark.parametrize("cls,kw", [(RowSparseSGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
                                    (RowSparseSGD, dict(lr=0.1, momentum=0.0, weight_decay=5e-4)),
                                    (RowSparseAdamW, dict(lr=0.01, weight_decay=0.05))])
def test_blocked_sparse_update_equals_unblocked(cls, kw, monkeypatch):
    """Splitting the rows into blocks (bounded temporaries) changes nothing."""
    import partialfc.optim as optim

    rows = [0, 2, 3, 5]
    whole, _ = run(cls, kw, grads(), sparse_rows=rows)
    monkeypatch.setattr(optim, "ROW_BLOCK", 1)
    blocked, _ = run(cls, kw, grads(), sparse_rows=rows)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=0)


def test_sgd_without_momentum_equals_torch():
    kw = dict(lr=0.1, momentum=0.0, weight_decay=5e-4)
    ours, _ = run(RowSparseSGD, kw, grads())
    theirs, _ = run(torch.optim.SGD, kw, grads())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours_all_rows, _ = run(RowSparseSGD, kw, grads(), sparse_rows=[0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(ours_all_rows, theirs, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- strict subsets vs a dense reference
# Lazy semantics, written out row by row in float64: on each step only the rows present in
# the gradient (duplicates summed) are decayed and updated, and only their state moves.
NUM_ROWS, DIM, SMALL_BLOCK = 40, 5, 8
SGD_SETTINGS = [dict(lr=0.1, momentum=0.9, weight_decay=5e-4), dict(lr=0.1, momentum=0.9, weight_decay=0.0),
                dict(lr=0.1, momentum=0.0, weight_decay=5e-4), dict(lr=0.1, momentum=0.0, weight_decay=0.0)]
ADAMW_SETTINGS = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


class ReferenceSGD:
    def __init__(self, weight, lr, momentum, weight_decay):
        self.weight, self.momentum, self.decay = weight.double().clone(), momentum, weight_decay
        self.state = {"momentum_buffer": torch.zeros_like(self.weight)} if momentum else {}

    def step(self, grad, rows, lr):
        for row in rows:
            update = grad[row] + self.decay * self.weight[row]
            if self.momentum:
                buffer = self.state["momentum_buffer"]
                buffer[row] = self.momentum * buffer[row] + update
                update = buffer[row]
            self.weight[row] = self.weight[row] - lr * update


class ReferenceAdamW:
    def __init__(self, weight, lr, betas, eps, weight_decay):
        self.weight, self.betas, self.eps, self.decay = weight.double().clone(), betas, eps, weight_decay
        self.state = {"exp_avg": torch.zeros_like(self.weight), "exp_avg_sq": torch.zeros_like(self.weight),
                      "row_step": torch.zeros(weight.shape[0], dtype=torch.float64)}

    def step(self, grad, rows, lr):
        (beta1, beta2), state = self.betas, self.state
        for row in rows:
            state["row_step"][row] += 1
            step = float(state["row_step"][row])
            state["exp_avg"][row] = beta1 * state["exp_avg"][row] + (1 - beta1) * grad[row]
            state["exp_avg_sq"][row] = beta2 * state["exp_avg_sq"][row] + (1 - beta2) * grad[row] ** 2
            denom = state["exp_avg_sq"][row].sqrt() / math.sqrt(1 - beta2 ** step) + self.eps
            self.weight[row] = (self.weight[row] * (1 - lr * self.decay)
                                - lr / (1 - beta1 ** step) * state["exp_avg"][row] / denom)


def _row_steps():
    """(name, rows or None for dense, coalesced flag) for every way a gradient reaches the step.

    Row sets change and overlap; some exceed SMALL_BLOCK (blocked update), one is a
    contiguous run (slice views), one has unsorted duplicates (summed by coalescing), one
    is flagged coalesced, the others are sorted and unique but unflagged, which is how
    autograd stores the head's gradient.
    """
    return [
        ("subset, flagged coalesced", [1, 4, 5, 9, 12, 13, 30, 39], True),
        ("larger than a block, overlapping", [0, 1, 2, 5, 6, 9, 11, 17, 18, 21, 22, 25, 29, 30, 33, 38], False),
        ("unsorted duplicates", [7, 3, 7, 20, 3, 3, 39, 0, 25, 7], False),
        ("contiguous run", list(range(10, 31)), False),
        ("every row, sparse", list(range(NUM_ROWS)), False),
        ("empty", [], False),
        ("small overlapping subset", [2, 3, 4, 13, 14, 36], False),
        ("dense", None, False),
        ("subset after dense", [5, 6, 7, 8, 19, 21, 23, 27, 31, 35], False),
    ]


def _sparse_grad(rows, coalesced, dtype, generator):
    values = torch.randn(len(rows), DIM, generator=generator, dtype=torch.float64)
    index = torch.tensor(rows, dtype=torch.long).view(1, -1)
    grad = torch.sparse_coo_tensor(index, values.to(dtype), (NUM_ROWS, DIM), is_coalesced=coalesced or None)
    dense = torch.zeros(NUM_ROWS, DIM, dtype=torch.float64).index_add_(0, index[0], values.to(dtype).double())
    return grad, dense


def check_against_reference(make_optimizer, reference_cls, settings, dtype=torch.float64, tol=1e-12):
    """Run ``make_optimizer`` over ``_row_steps`` with a changing lr; compare weights and state every step."""
    generator = torch.Generator().manual_seed(7)
    param = torch.nn.Parameter(torch.randn(NUM_ROWS, DIM, generator=generator, dtype=torch.float64).to(dtype))
    opt = make_optimizer(param, settings)
    reference = reference_cls(param.detach(), **settings)
    for number, (name, rows, coalesced) in enumerate(_row_steps()):
        lr = settings["lr"] * (1.0 - 0.07 * number)  # as a scheduler would change it
        for group in opt.param_groups:
            group["lr"] = lr
        if rows is None:
            dense = torch.randn(NUM_ROWS, DIM, generator=generator, dtype=torch.float64)
            param.grad, touched = dense.to(dtype), range(NUM_ROWS)
        else:
            param.grad, dense = _sparse_grad(rows, coalesced, dtype, generator)
            touched = sorted(set(rows))
        given = param.grad.clone()
        opt.step()
        reference.step(dense, touched, lr)
        where = f"step {number} ({name})"
        assert torch.equal(param.grad.to_dense(), given.to_dense()), f"{where}: the step changed the gradient"
        torch.testing.assert_close(param.detach().double(), reference.weight, rtol=tol, atol=tol, msg=lambda m: f"{where}: weights: {m}")
        state = opt.state[param]
        assert set(state) == set(reference.state), (where, sorted(state))
        for key, expected in reference.state.items():
            torch.testing.assert_close(state[key].double(), expected, rtol=tol, atol=tol,
                                       msg=lambda m, key=key: f"{where}: {key}: {m}")


def _plain(cls):
    return lambda param, settings: cls([param], **settings)


@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=lambda s: f"m{s['momentum']}-wd{s['weight_decay']}")
@pytest.mark.parametrize("block", [SMALL_BLOCK, None], ids=["small-block", "default-block"])
def test_sgd_strict_subsets_match_reference(settings, block, monkeypatch):
    import partialfc.optim as optim

    if block:
        monkeypatch.setattr(optim, "ROW_BLOCK", block)
    check_against_reference(_plain(RowSparseSGD), ReferenceSGD, settings)


@pytest.mark.parametrize("block", [SMALL_BLOCK, None], ids=["small-block", "default-block"])
def test_adamw_strict_subsets_match_reference(block, monkeypatch):
    import partialfc.optim as optim

    if block:
        monkeypatch.setattr(optim, "ROW_BLOCK", block)
    check_against_reference(_plain(RowSparseAdamW), ReferenceAdamW, ADAMW_SETTINGS)


@pytest.mark.parametrize("cls,reference_cls,settings", [(RowSparseSGD, ReferenceSGD, SGD_SETTINGS[0]),
                                                        (RowSparseAdamW, ReferenceAdamW, ADAMW_SETTINGS)])
def test_float32_strict_subsets_match_reference(cls, reference_cls, settings, monkeypatch):
    """The production dtype: float32 state and weights against the float64 reference."""
    import partialfc.optim as optim

    monkeypatch.setattr(optim, "ROW_BLOCK", SMALL_BLOCK)
    check_against_reference(_plain(cls), reference_cls, settings, dtype=torch.float32, tol=2e-5)


# Broken optimizers the reference check must catch (a check that cannot fail is a defect).
# Each wraps the real optimizer, so the mutants follow the implementation as it changes.
def _wrapped(cls, *, before=None, after=None, **overrides):
    def make(param, settings):
        opt = cls([param], **dict(settings, **overrides))
        real_step = opt.step

        def step():
            saved = before(opt, param) if before else None
            real_step()
            if after:
                after(opt, param, saved)
        opt.step = step
        return opt
    return make


def _restore(key):
    """The state ``key`` is read but never written back."""
    def before(opt, param):
        state = opt.state[param]
        return state[key].clone() if key in state else None

    def after(opt, param, saved):
        state = opt.state[param]
        state[key].copy_(saved if saved is not None else torch.zeros_like(state[key]))
    return dict(before=before, after=after)


def _decay_unsampled_rows(opt, param, saved):
    """Decays every row, sampled or not (not lazy)."""
    group = opt.param_groups[0]
    sampled = torch.zeros(NUM_ROWS, dtype=torch.bool)
    if param.grad.is_sparse:
        sampled[param.grad.coalesce().indices()[0]] = True
    else:
        sampled[:] = True
    param.detach()[~sampled] *= 1 - group["lr"] * 0.01


def _first_duplicate_only(opt, param):
    """Keeps one value per duplicated row instead of summing them."""
    grad = param.grad
    if grad.is_sparse and not grad.is_coalesced():
        rows, values = grad._indices()[0], grad._values()
        keep = [rows.tolist().index(row) for row in sorted(set(rows.tolist()))]
        param.grad = torch.sparse_coo_tensor(rows[keep][None], values[keep], grad.shape)


def _global_step_count(opt, param):
    """Bias correction from the optimizer's step count instead of each row's own."""
    state = opt.state[param]
    if "row_step" in state:
        state["row_step"].fill_(state["row_step"].max())


MUTANTS = {
    "sgd drops weight decay": (_wrapped(RowSparseSGD, weight_decay=0.0), ReferenceSGD, SGD_SETTINGS[0]),
    "sgd momentum not written back": (_wrapped(RowSparseSGD, **_restore("momentum_buffer")), ReferenceSGD,
                                      SGD_SETTINGS[0]),
    "sgd decays unsampled rows": (_wrapped(RowSparseSGD, after=_decay_unsampled_rows), ReferenceSGD, SGD_SETTINGS[0]),
    "sgd keeps one duplicate": (_wrapped(RowSparseSGD, before=_first_duplicate_only), ReferenceSGD, SGD_SETTINGS[2]),
    "adamw drops weight decay": (_wrapped(RowSparseAdamW, weight_decay=0.0), ReferenceAdamW, ADAMW_SETTINGS),
    "adamw second moment not written back": (_wrapped(RowSparseAdamW, **_restore("exp_avg_sq")), ReferenceAdamW,
                                             ADAMW_SETTINGS),
    "adamw global step count": (_wrapped(RowSparseAdamW, before=_global_step_count), ReferenceAdamW, ADAMW_SETTINGS),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_reference_check_catches_broken_optimizer(name, monkeypatch):
    import partialfc.optim as optim

    monkeypatch.setattr(optim, "ROW_BLOCK", SMALL_BLOCK)
    make_optimizer, reference_cls, settings = MUTANTS[name]
    with pytest.raises(AssertionError):
        check_against_reference(make_optimizer, reference_cls, settings)


def test_gradient_sparse_in_more_than_rows_is_refused():
    param = torch.nn.Parameter(torch.zeros(3, 2))
    param.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2], [1, 0]]), torch.ones(2), (3, 2))
    with pytest.raises(ValueError, match="sparse_dim=2"):
        RowSparseSGD([param], lr=0.1).step()
