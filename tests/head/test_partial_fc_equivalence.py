"""PartialFC at sample_rate = 1 equals a float64 single-process full softmax.

For world sizes 1, 2 and 3 with uneven shards, K in {1, 3}, every margin family
and a combined one, with some samples past theta + m2 > pi: the loss, the gradient
of each rank's embeddings and of each rank's center shard match the reference.
"""
from __future__ import annotations

import math

import pytest
import torch

from reference import reference_loss
from spawn import run_ranks

MARGINS = {
    "arcface": (64.0, 1.0, 0.5, 0.0),
    "cosface": (64.0, 1.0, 0.0, 0.4),
    "sphereface": (30.0, 4.0, 0.0, 0.0),
    "combined": (32.0, 1.2, 0.3, 0.2),
}
CASES = [
    # (num_classes, K, margin, impl, per-rank batch)
    (7, 1, "arcface", "naive", 5),
    (7, 3, "arcface", "torch", 4),
    (11, 1, "cosface", "torch", 3),
    (8, 3, "sphereface", "naive", 4),
    (9, 2, "combined", "torch", 5),
]


def make_problem(num_classes, num_subcenters, world_size, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    dim = 16
    centers = torch.randn(num_classes * num_subcenters, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (world_size * batch,), generator=gen)
    embeddings = torch.randn(world_size * batch, dim, generator=gen, dtype=torch.float64)
    # Push the first two samples of every rank opposite their target: theta + m2 > pi.
    for rank in range(world_size):
        for i in (rank * batch, rank * batch + 1):
            target_row = centers[labels[i] * num_subcenters]
            embeddings[i] = -target_row + 0.05 * torch.randn(dim, generator=gen, dtype=torch.float64)
    return embeddings, labels, centers


def reference(embeddings, labels, centers, num_subcenters, margin):
    emb = embeddings.clone().requires_grad_()
    cen = centers.clone().requires_grad_()
    loss = reference_loss(emb, labels, cen, num_subcenters, *margin)
    loss.backward()
    return loss.detach(), emb.grad, cen.grad


def run_case(rank, world_size, case, seed):
    from partialfc import CombinedMargin, PartialFC

    num_classes, num_subcenters, margin_name, impl, batch = case
    embeddings, labels, centers = make_problem(num_classes, num_subcenters, world_size, batch, seed)
    scale, m1, m2, m3 = MARGINS[margin_name]
    head = PartialFC(CombinedMargin(scale, m1, m2, m3), 16, num_classes, num_subcenters=num_subcenters,
                     impl=impl, chunk_size=16 if impl == "triton" else 2)  # triton tiles: powers of 2
    rows = slice(head.class_start * num_subcenters, (head.class_start + head.num_local) * num_subcenters)
    with torch.no_grad():
        head.weight.copy_(centers[rows].float())
    local = slice(rank * batch, (rank + 1) * batch)
    local_embeddings = embeddings[local].float().requires_grad_()
    loss = head(local_embeddings, labels[local])
    loss.backward()
    weight_grad = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    return {"loss": loss.item(), "embedding_grad": local_embeddings.grad, "weight_grad": weight_grad,
            "rows": (rows.start, rows.stop), "local": (local.start, local.stop)}


def run_all_cases(rank, world_size, seed):
    return [run_case(rank, world_size, case, seed + i) for i, case in enumerate(CASES)]


def check(results_per_rank, world_size, seed):
    for index, case in enumerate(CASES):
        num_classes, num_subcenters, margin_name, _, batch = case
        embeddings, labels, centers = make_problem(num_classes, num_subcenters, world_size, batch, seed + index)
        ref_loss, ref_emb_grad, ref_w_grad = reference(embeddings, labels, centers, num_subcenters,
                                                        MARGINS[margin_name])
        covered = 0
        for rank_results in results_per_rank:
            got = rank_results[index]
            assert got["loss"] == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-5), case
            lo, hi = got["local"]
            torch.testing.assert_close(got["embedding_grad"].double(), ref_emb_grad[lo:hi], rtol=1e-4, atol=2e-6)
            r0, r1 = got["rows"]
            torch.testing.assert_close(got["weight_grad"].double(), ref_w_grad[r0:r1], rtol=1e-4, atol=2e-6)
            covered += r1 - r0
        assert covered == num_classes * num_subcenters


def test_single_process_matches_full_softmax():
    # No process group at all: W = 1 through the very same code.
    results = [run_all_cases(0, 1, seed=11)]
    check(results, 1, seed=11)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_match_full_softmax(world_size):
    results = run_ranks(run_all_cases, world_size, 23)
    check(results, world_size, seed=23)


def test_samples_past_pi_use_fallback():
    """The cases above include theta + m2 > pi; make sure such samples really exist."""
    embeddings, labels, centers = make_problem(7, 1, 1, 5, seed=11)
    x = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = centers / centers.norm(dim=1, keepdim=True)
    cos_target = (x * w[labels]).sum(1)
    assert (torch.acos(cos_target) + 0.5 > math.pi).sum() >= 2


TRITON_CASES = [(7, 3, "combined", "triton", 3), (5, 1, "arcface", "triton", 2)]


def run_triton_cases(rank, world_size, seed):
    return [run_case(rank, world_size, case, seed + i) for i, case in enumerate(TRITON_CASES)]


def test_fused_triton_path_through_two_ranks(monkeypatch):
    """The fused kernel (Triton interpreter on CPU) inside PartialFC on 2 ranks equals the reference."""
    pytest.importorskip("triton", reason="triton is not installed (extra 'triton')")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks
    global CASES
    saved, CASES = CASES, TRITON_CASES
    try:
        results = run_ranks(run_triton_cases, 2, 31)
        check(results, 2, seed=31)
    finally:
        CASES = saved
