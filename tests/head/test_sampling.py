"""Class sampling: positives kept, exact count, no duplicates, unbiased, and the
sampled loss equals the full softmax restricted to the kept classes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from partialfc import CombinedMargin, PartialFC
from partialfc.head.sampling import num_sampled, sample_classes, target_positions
from reference import reference_loss
from spawn import run_ranks


@pytest.mark.parametrize("num_local,rate,num_pos", [(1000, 0.1, 5), (1000, 0.1, 300), (37, 0.5, 0), (10, 1.0, 3)])
def test_sample_classes_keeps_positives_and_count(num_local, rate, num_pos):
    gen = torch.Generator().manual_seed(3)
    positives = torch.randperm(num_local, generator=gen)[:num_pos].sort().values
    kept = sample_classes(positives, num_local, rate, gen)
    expected = min(num_local, max(num_pos, round(rate * num_local), 1))
    assert kept.numel() == expected
    assert torch.unique(kept).numel() == kept.numel()
    assert bool((kept[1:] > kept[:-1]).all())
    assert set(positives.tolist()) <= set(kept.tolist())
    assert int(kept.min()) >= 0 and int(kept.max()) < num_local


def test_sampling_is_not_biased_to_low_ids():
    gen = torch.Generator().manual_seed(0)
    num_local, counts = 200, np.zeros(200)
    positives = torch.tensor([5, 150])
    for _ in range(2000):
        counts[sample_classes(positives, num_local, 0.1, gen).numpy()] += 1
    negatives = np.delete(counts, [5, 150])
    assert counts[5] == counts[150] == 2000
    # 18 of 198 negatives per draw: expected 181.8 each; halves of the id range agree.
    expected = 2000 * 18 / 198
    assert abs(negatives.mean() - expected) < 1e-6
    assert abs(negatives[:99].mean() - negatives[99:].mean()) < 0.05 * expected
    assert negatives.min() > 0.6 * expected


def test_num_sampled_rounding():
    assert num_sampled(10, 0, 0.01) == 1
    assert num_sampled(100, 3, 0.25) == 25
    assert num_sampled(100, 40, 0.25) == 40


def test_target_positions_marks_other_ranks():
    class_index = torch.tensor([0, 2, 5])
    labels = torch.tensor([10, 12, 15, 3, 40])
    got = target_positions(labels, 10, 6, class_index)
    assert got.tolist() == [0, 1, 2, -1, -1]


def sampled_case(rank, world_size, seed):
    gen = torch.Generator().manual_seed(seed)
    num_classes, dim, batch, k = 23, 8, 3, 2
    centers = torch.randn(num_classes * k, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (world_size * batch,), generator=gen)
    embeddings = torch.randn(world_size * batch, dim, generator=gen, dtype=torch.float64)
    head = PartialFC(CombinedMargin.preset("combined"), dim, num_classes, sample_rate=0.3, num_subcenters=k,
                     impl="torch", seed=seed)
    rows = slice(head.class_start * k, (head.class_start + head.num_local) * k)
    with torch.no_grad():
        head.weight.copy_(centers[rows].float())
    local = slice(rank * batch, (rank + 1) * batch)
    loss = head(embeddings[local].float(), labels[local])
    kept_global = (head.last_class_index + head.class_start).tolist()
    return loss.item(), kept_global, head.num_local


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampled_loss_is_restricted_full_softmax(world_size):
    seed = 5
    if world_size == 1:
        results = [sampled_case(0, 1, seed)]
    else:
        results = run_ranks(sampled_case, world_size, seed)
    kept = sorted(c for _, classes, _ in results for c in classes)
    for _, classes, num_local in results:
        assert len(classes) == max(round(0.3 * num_local), 1) or len(classes) > round(0.3 * num_local)
    gen = torch.Generator().manual_seed(seed)
    num_classes, dim, batch, k = 23, 8, 3, 2
    centers = torch.randn(num_classes * k, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (world_size * batch,), generator=gen)
    embeddings = torch.randn(world_size * batch, dim, generator=gen, dtype=torch.float64)
    assert set(labels.tolist()) <= set(kept)
    remap = {c: i for i, c in enumerate(kept)}
    kept_rows = torch.tensor([c * k + s for c in kept for s in range(k)])
    new_labels = torch.tensor([remap[c] for c in labels.tolist()])
    expected = reference_loss(embeddings, new_labels, centers[kept_rows], k, 64.0, 1.0, 0.3, 0.2)
    assert len(kept) < num_classes  # sampling really dropped classes
    for loss, _, _ in results:
        assert loss == pytest.approx(expected.item(), rel=1e-5)
