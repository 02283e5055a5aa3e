"""Row-sparse optimizers equal torch's on dense gradients and touch only given rows."""
from __future__ import annotations

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
