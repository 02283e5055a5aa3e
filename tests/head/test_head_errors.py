"""Bad inputs to the head get a clear ValueError naming the value."""
from __future__ import annotations

import pytest
import torch

from partialfc import CombinedMargin, PartialFC
from partialfc.distributed.shards import all_shards, class_shard
from spawn import run_ranks


def make_head(**kw):
    args = dict(margin=CombinedMargin(), embedding_size=8, num_classes=10)
    args.update(kw)
    return PartialFC(**args)


@pytest.mark.parametrize("bad_label", [-1, 10, 999])
def test_label_out_of_range(bad_label):
    head = make_head()
    with pytest.raises(ValueError, match=f"label {bad_label} is outside \\[0, 10\\)"):
        head(torch.randn(3, 8), torch.tensor([0, bad_label, 1]))


def test_wrong_embedding_width():
    with pytest.raises(ValueError, match=r"\(batch, 8\).*\(3, 9\)"):
        make_head()(torch.randn(3, 9), torch.tensor([0, 1, 2]))


def test_float_labels_refused():
    with pytest.raises(TypeError, match="integer"):
        make_head()(torch.randn(2, 8), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_bad_sample_rate(rate):
    with pytest.raises(ValueError, match="sample_rate"):
        make_head(sample_rate=rate)


def test_bad_subcenters_and_impl():
    with pytest.raises(ValueError, match="num_subcenters"):
        make_head(num_subcenters=0)
    with pytest.raises(ValueError, match="impl"):
        make_head(impl="cuda")


def test_fewer_classes_than_ranks():
    with pytest.raises(ValueError, match="num_classes=2 is smaller than world_size=3"):
        class_shard(2, 3, 0)


def test_shard_table_uneven():
    shards = all_shards(10, 3)
    assert [(s.class_start, s.num_local) for s in shards] == [(0, 4), (4, 3), (7, 3)]
    for classes in (1, 7, 64, 1001):
        for world in (1, 2, 3, 8):
            if classes < world:
                continue
            shards = all_shards(classes, world)
            assert shards[0].class_start == 0 and shards[-1].class_end == classes
            assert all(a.class_end == b.class_start for a, b in zip(shards, shards[1:]))
            assert max(s.num_local for s in shards) - min(s.num_local for s in shards) <= 1


def uneven_batch(rank, world_size):
    """Rank 0 has 3 samples, rank 1 has 2: the loss must equal the 5-sample full loss."""
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(5, 8, generator=gen)
    labels = torch.randint(0, 6, (5,), generator=gen)
    centers = torch.randn(6, 8, generator=gen)
    head = PartialFC(CombinedMargin.preset("arcface"), 8, 6, impl="naive")
    with torch.no_grad():
        head.weight.copy_(centers[head.class_start:head.class_start + head.num_local])
    local = slice(0, 3) if rank == 0 else slice(3, 5)
    x = emb[local].clone().requires_grad_()
    loss = head(x, labels[local])
    loss.backward()
    return loss.item(), x.grad


def test_uneven_batch_between_ranks_is_handled():
    results = run_ranks(uneven_batch, 2)
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(5, 8, generator=gen).requires_grad_()
    labels = torch.randint(0, 6, (5,), generator=gen)
    centers = torch.randn(6, 8, generator=gen)
    head = PartialFC(CombinedMargin.preset("arcface"), 8, 6, impl="naive")
    with torch.no_grad():
        head.weight.copy_(centers)
    expected = head(emb, labels)
    expected.backward()
    assert results[0][0] == pytest.approx(expected.item(), rel=1e-5)
    assert results[1][0] == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), emb.grad, rtol=1e-4, atol=1e-6)


def test_bf16_compute_dtype_close_to_fp32():
    gen = torch.Generator().manual_seed(4)
    emb, labels = torch.randn(6, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        head = make_head(compute_dtype=dtype, impl="torch", margin=CombinedMargin(scale=16.0))
        x = emb.clone().requires_grad_()
        loss = head(x, labels)
        loss.backward()
        results.append((loss.item(), x.grad))
    assert results[1][0] == pytest.approx(results[0][0], rel=2e-2)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0.1, atol=2e-2)
    with pytest.raises(ValueError, match="compute_dtype"):
        make_head(compute_dtype=torch.int8)


def promised_batch(rank, world):
    """The same step with and without a promised batch size: equal losses and gradients;
    the promise saves the size all-gather; a batch that breaks it is refused by name."""
    from partialfc.distributed import collectives

    calls = []
    gather = collectives._all_gather_single

    def counting(*args, **kwargs):
        calls.append(1)
        return gather(*args, **kwargs)

    collectives._all_gather_single = counting
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(2 * 4, 8, generator=gen)[rank * 4:(rank + 1) * 4]
    labels = torch.randint(0, 7, (8,), generator=gen)[rank * 4:(rank + 1) * 4]
    results = []
    for promise in (None, 4):
        head = PartialFC(CombinedMargin.preset("arcface"), 8, 7, impl="torch")
        head.expected_batch_size = promise
        x = emb.clone().requires_grad_()
        del calls[:]
        loss = head(x, labels)
        gathers = len(calls)
        loss.backward()
        results.append((loss.item(), x.grad, head.weight.grad.to_dense(), gathers))
    head.expected_batch_size = 5
    try:
        head(emb, labels)
        refused = ""
    except ValueError as error:
        refused = str(error)
    return results, refused


def test_promised_batch_size_skips_the_size_gather():
    for rank, (results, refused) in enumerate(run_ranks(promised_batch, 2)):
        (loss, dx, dw, gathers), (loss_p, dx_p, dw_p, gathers_p) = results
        assert loss_p == loss
        torch.testing.assert_close(dx_p, dx, rtol=0, atol=0)
        torch.testing.assert_close(dw_p, dw, rtol=0, atol=0)
        assert (gathers, gathers_p) == (3, 2)  # sizes + embeddings + labels, then without sizes
        assert f"rank {rank} holds a batch of 4 rows where every rank was promised 5" in refused
