"""The geodesic penalties (intra, inter, triplet) on the sharded head equal a float64 reference.

The reference below is written from the formulas of the issue, independently of
``partialfc.head.geodesic``: the whole (C, K, D) center matrix on one process, every
angle materialized, plain torch autograd, triplets mined by Python loops. On 1, 2 and 3
gloo ranks with uneven class shards and uneven per-rank batches, each term alone (plain
softmax) and with ArcFace / CosFace, and all three together with K = 3, the loss, each
term, the gradient of each rank's embeddings and of each rank's center shard match it at
r = 1; at r = 0.5 they match the reference restricted to the kept centers. Weight 0 is
bit for bit the head without the penalties.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference import reference_loss
from spawn import run_ranks

DIM = 16
MARGINS = {
    "softmax": (16.0, 1.0, 0.0, 0.0),
    "arcface": (32.0, 1.0, 0.5, 0.0),
    "cosface": (32.0, 1.0, 0.0, 0.35),
}
# (num_classes, K, margin, impl, per-rank batches (first W used), (intra, inter, triplet) weights, sample rate)
CASES = [
    (7, 1, "softmax", "torch", (5, 3, 4), (1.0, 0.0, 0.0), 1.0),
    (7, 1, "softmax", "naive", (5, 3, 4), (0.0, 1.0, 0.0), 1.0),
    (7, 1, "softmax", "torch", (5, 3, 4), (0.0, 0.0, 1.0), 1.0),
    (11, 1, "arcface", "torch", (4, 4, 4), (0.7, 0.0, 0.0), 1.0),
    (11, 1, "arcface", "torch", (4, 4, 4), (0.0, 1.3, 0.0), 1.0),
    (11, 1, "arcface", "naive", (4, 4, 4), (0.0, 0.0, 0.9), 1.0),
    (7, 2, "cosface", "torch", (3, 5, 4), (0.7, 0.0, 0.0), 1.0),
    (7, 2, "cosface", "torch", (3, 5, 4), (0.0, 1.3, 0.0), 1.0),
    (7, 2, "cosface", "naive", (3, 5, 4), (0.0, 0.0, 0.9), 1.0),
    (9, 3, "arcface", "torch", (5, 3, 4), (0.5, 1.5, 2.0), 1.0),
    (8, 1, "cosface", "naive", (4, 6, 2), (1.0, 1.0, 1.0), 1.0),
    # r < 1: the softmax and the inter-loss over the kept centers only.
    (12, 2, "arcface", "torch", (6, 5, 4), (0.5, 1.5, 2.0), 0.5),
]


# ------------------------------------------------------------------ the float64 reference
def reference_intra_inter(x, labels, w, num_subcenters):
    """(intra, inter) from normalized x (B, D) and normalized centers w (C*K, D)."""
    batch, num_classes = x.shape[0], w.shape[0] // num_subcenters
    centers = w.view(num_classes, num_subcenters, -1)
    rows = torch.arange(batch)
    cos_sub = torch.einsum("bd,bkd->bk", x, centers[labels])
    matched = cos_sub.detach().argmax(dim=1)
    intra = torch.acos(cos_sub[rows, matched]).mean() / math.pi
    w_y = centers[labels, matched]  # (B, D)
    other = torch.arange(num_classes)[None, :] != labels[:, None]  # (B, C)
    other = other.repeat_interleave(num_subcenters, dim=1)  # every sub-center of the other classes
    count = (num_classes - 1) * num_subcenters
    angles = torch.acos((w_y @ w.T).masked_select(other).view(batch, count))
    inter = -(angles.sum(dim=1) / count).mean() / math.pi
    return intra, inter


def reference_triplet(x, labels, margin):
    def angle(a, b):
        return torch.acos((x[a] * x[b]).sum())

    total, valid = x.new_zeros(()), 0
    for a in range(x.shape[0]):
        positives = [j for j in range(x.shape[0]) if j != a and labels[j] == labels[a]]
        negatives = [j for j in range(x.shape[0]) if labels[j] != labels[a]]
        if not positives or not negatives:
            continue
        with torch.no_grad():
            hardest_positive = max(positives, key=lambda j: angle(a, j).item())
            hardest_negative = min(negatives, key=lambda j: angle(a, j).item())
        total = total + torch.relu(angle(a, hardest_positive) + margin - angle(a, hardest_negative))
        valid += 1
    return total / max(valid, 1)


def reference(embeddings, labels, centers, num_subcenters, margin, weights, triplet_margin, kept=None):
    """Loss, terms, dX, dW of the full problem, or of the classes ``kept`` (sorted) only."""
    num_classes = centers.shape[0] // num_subcenters
    kept = torch.arange(num_classes) if kept is None else kept
    emb = embeddings.clone().requires_grad_()
    cen = centers.clone().requires_grad_()
    kept_centers = cen.view(num_classes, num_subcenters, -1)[kept].reshape(-1, cen.shape[1])
    kept_labels = torch.searchsorted(kept, labels)
    assert bool((kept[kept_labels] == labels).all())  # positives are always kept
    x = emb / emb.norm(dim=1, keepdim=True)
    w = kept_centers / kept_centers.norm(dim=1, keepdim=True)
    intra, inter = reference_intra_inter(x, kept_labels, w, num_subcenters)
    terms = {"intra": intra, "inter": inter, "triplet": reference_triplet(x, labels, triplet_margin)}
    loss = reference_loss(emb, kept_labels, kept_centers, num_subcenters, *margin)
    for name, weight in zip(("intra", "inter", "triplet"), weights):
        if weight:
            loss = loss + weight * terms[name]
    loss.backward()
    return loss.detach(), {k: v.item() for k, v in terms.items()}, emb.grad, cen.grad


# ------------------------------------------------------------------ the head on W ranks
def make_problem(num_classes, num_subcenters, batches, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(batches)
    centers = torch.randn(num_classes * num_subcenters, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (total,), generator=gen)
    labels[1::3] = labels[0::3][: labels[1::3].numel()]  # pairs, so that anchors have positives
    embeddings = torch.randn(total, DIM, generator=gen, dtype=torch.float64)
    return embeddings, labels, centers


def build_head(case, **geodesic):
    from partialfc import CombinedMargin, PartialFC

    num_classes, num_subcenters, margin_name, impl, _, _, rate = case
    return PartialFC(CombinedMargin(*MARGINS[margin_name]), DIM, num_classes, sample_rate=rate,
                     num_subcenters=num_subcenters, impl=impl, chunk_size=2 if impl == "torch" else None,
                     seed=5, **geodesic)


def local_rows(batches, rank):
    start = sum(batches[:rank])
    return slice(start, start + batches[rank])


def run_case(rank, world_size, case, seed):
    num_classes, num_subcenters, _, _, batches, weights, _ = case
    batches = batches[:world_size]
    embeddings, labels, centers = make_problem(num_classes, num_subcenters, batches, seed)
    head = build_head(case, intra_weight=weights[0], inter_weight=weights[1], triplet_weight=weights[2],
                      triplet_margin=0.3)
    rows = slice(head.class_start * num_subcenters, (head.class_start + head.num_local) * num_subcenters)
    with torch.no_grad():
        head.weight.copy_(centers[rows].float())
    local = local_rows(batches, rank)
    local_embeddings = embeddings[local].float().requires_grad_()
    loss = head(local_embeddings, labels[local])
    loss.backward()
    assert head.weight.grad.is_sparse  # the penalties keep the centers' gradient row-sparse
    return {"loss": loss.item(), "terms": {k: v.item() for k, v in head.last_geodesic_terms.items()},
            "embedding_grad": local_embeddings.grad, "weight_grad": head.weight.grad.to_dense(),
            "rows": (rows.start, rows.stop), "local": (local.start, local.stop),
            "kept": (head.last_class_index + head.class_start).tolist()}


def _plain_softmax_loss(head, x, labels):
    """The head's loss as it was before the penalties existed (the r = 1 pipeline written
    out: normalize, gather, margin-softmax statistics, cross-rank combination)."""
    import torch.nn.functional as F

    from partialfc.distributed import collectives
    from partialfc.head.sampling import target_positions
    from partialfc.kernels import margin_softmax_stats

    group = head.process_group
    normalized = F.normalize(x.float(), dim=1).to(head.compute_dtype)
    all_x, all_labels, _ = collectives.all_gather_batch(normalized, labels, group)  # uneven batches: padded
    class_index = torch.arange(head.num_local)
    positions = target_positions(all_labels, head.class_start, head.num_local, class_index)
    lse, target = margin_softmax_stats(all_x, head.weight, class_index, positions, head.num_subcenters,
                                       head.margin, impl=head.impl, chunk_size=head.chunk_size)
    lse = collectives.global_logsumexp(lse, group)
    return (lse - collectives.sum_across_ranks_local_grad(target, group)).mean()


def weight_zero_is_bitwise_today(rank, world_size, seed):
    """Every weight 0 gives the same bits as the plain margin softmax written out, and as a
    head built without the kwargs."""
    case = CASES[-3]  # K = 3, the chunked torch path, r = 1 (the plain pipeline above keeps every class)
    assert case[1] == 3 and case[3] == "torch" and case[6] == 1.0
    batches = case[4][:world_size]
    embeddings, labels, _ = make_problem(case[0], case[1], batches, seed)
    zero = {"intra_weight": 0.0, "inter_weight": 0.0, "triplet_weight": 0.0, "triplet_margin": 0.2}
    results = []
    for kwargs, plain in (({}, True), ({}, False), (zero, False)):
        head = build_head(case, **kwargs)
        x = embeddings[local_rows(batches, rank)].float().requires_grad_()
        local_labels = labels[local_rows(batches, rank)]
        loss = _plain_softmax_loss(head, x, local_labels) if plain else head(x, local_labels)
        loss.backward()
        if not plain:
            assert head.last_geodesic_terms == {}
        grad = head.weight.grad.coalesce()
        results.append((loss.detach(), x.grad, grad.indices(), grad.values()))
    return all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


def run_all(rank, world_size, seed):
    return {"cases": [run_case(rank, world_size, case, seed + i) for i, case in enumerate(CASES)],
            "bitwise": weight_zero_is_bitwise_today(rank, world_size, seed)}


def check(results_per_rank, world_size, seed):
    for index, case in enumerate(CASES):
        num_classes, num_subcenters, margin_name, _, batches, weights, rate = case
        embeddings, labels, centers = make_problem(num_classes, num_subcenters, batches[:world_size], seed + index)
        kept = sorted(c for rank_results in results_per_rank for c in rank_results["cases"][index]["kept"])
        if rate == 1.0:
            assert kept == list(range(num_classes))
        else:
            assert len(kept) < num_classes, "r < 1 should drop some classes here"
        ref_loss, ref_terms, ref_emb_grad, ref_w_grad = reference(
            embeddings, labels, centers, num_subcenters, MARGINS[margin_name], weights, 0.3, torch.tensor(kept))
        covered = 0
        for rank_results in results_per_rank:
            got = rank_results["cases"][index]
            assert got["loss"] == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-5), case
            for name, weight in zip(("intra", "inter", "triplet"), weights):
                if weight:
                    assert got["terms"][name] == pytest.approx(ref_terms[name], rel=1e-5, abs=1e-6), (case, name)
                else:
                    assert name not in got["terms"]
            lo, hi = got["local"]
            torch.testing.assert_close(got["embedding_grad"].double(), ref_emb_grad[lo:hi], rtol=1e-4, atol=2e-6)
            r0, r1 = got["rows"]
            torch.testing.assert_close(got["weight_grad"].double(), ref_w_grad[r0:r1], rtol=1e-4, atol=2e-6)
            covered += r1 - r0
        assert covered == num_classes * num_subcenters
    assert all(rank_results["bitwise"] for rank_results in results_per_rank)


def test_single_process_matches_reference():
    check([run_all(0, 1, seed=3)], 1, seed=3)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_match_reference(world_size):
    check(run_ranks(run_all, world_size, 17), world_size, seed=17)


def test_reference_triplets_are_not_trivial():
    """The cases mine real triplets with active hinges (else the triplet check proves little)."""
    embeddings, labels, _ = make_problem(7, 1, (5, 3, 4), seed=3)
    x = embeddings / embeddings.norm(dim=1, keepdim=True)
    assert reference_triplet(x, labels, 0.3).item() > 0.1


# ------------------------------------------------------------------ standalone triplet module
def run_triplet_module(rank, world_size, batches, seed):
    from partialfc import AngularTripletLoss

    embeddings, labels, _ = make_problem(5, 1, batches, seed)
    local = local_rows(batches, rank)
    x = embeddings[local].float().requires_grad_()
    loss = AngularTripletLoss(0.3)(x, labels[local])
    loss.backward()
    return loss.item(), x.grad, (local.start, local.stop)


@pytest.mark.parametrize("world_size", [1, 2])
def test_triplet_module_matches_reference(world_size):
    batches = (6, 3)[:world_size]
    results = (run_ranks(run_triplet_module, world_size, batches, 8) if world_size > 1
               else [run_triplet_module(0, 1, batches, 8)])
    embeddings, labels, _ = make_problem(5, 1, batches, 8)
    emb = embeddings.clone().requires_grad_()
    ref = reference_triplet(emb / emb.norm(dim=1, keepdim=True), labels, 0.3)
    ref.backward()
    for loss, grad, (lo, hi) in results:
        assert loss == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(grad.double(), emb.grad[lo:hi], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ clamp, errors
def test_acos_slope_is_clamped_at_plus_minus_one():
    from partialfc.head.geodesic import ACOS_SLOPE_EPS, acos_slope, clamped_acos

    for dtype in (torch.float32, torch.float64):
        edge = torch.tensor(1.0 - ACOS_SLOPE_EPS, dtype=dtype)
        stated = -1.0 / torch.sqrt((1.0 - edge) * (1.0 + edge))
        assert stated.item() == pytest.approx(-707.1 if dtype == torch.float64 else -702.5, rel=1e-4)
        cos = torch.tensor([1.0, -1.0, 1.0 + 1e-7, 0.3], dtype=dtype, requires_grad=True)
        angles = clamped_acos(cos)
        torch.testing.assert_close(angles.detach(), torch.acos(cos.detach().clamp(-1, 1)))
        angles.sum().backward()
        torch.testing.assert_close(cos.grad[:3], stated.expand(3), rtol=1e-6, atol=0)
        assert cos.grad[2] == acos_slope(torch.tensor(1.0, dtype=dtype))
        assert cos.grad[3].item() == pytest.approx(-1 / math.sqrt(1 - 0.3**2), rel=1e-6)


def test_in_place_norm_backward_matches_the_kernels_helper():
    """The inter-loss's in-place chain through the row normalization, zero and tiny rows included."""
    from partialfc.head.geodesic import _normalized_rows_backward_
    from partialfc.kernels.margin_softmax_ref import NORM_EPS, normalized_rows_backward

    gen = torch.Generator().manual_seed(4)
    rows = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    rows[1] = 0.0
    rows[2] *= 1e-14  # below NORM_EPS: divided by the constant eps
    grad = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    inv_norm = rows.norm(dim=1).clamp_min(NORM_EPS).reciprocal()
    expected = normalized_rows_backward(rows, inv_norm, grad)
    leaf = rows.clone().requires_grad_()
    (torch.nn.functional.normalize(leaf, dim=1, eps=NORM_EPS) * grad).sum().backward()
    torch.testing.assert_close(expected, leaf.grad)
    torch.testing.assert_close(_normalized_rows_backward_(rows, inv_norm, grad.clone(), NORM_EPS), expected)


def test_stashed_row_gradients_fold_into_any_gradient_layout():
    """The penalties' row gradients reach the centers whatever layout the softmax's gradient has,
    and the fused paths' layout (coalesced over exactly the kept rows) is added to in place."""
    from partialfc.head.center_grad_fold import RowGradStash
    from partialfc.kernels.margin_softmax_ref import kept_rows

    gen = torch.Generator().manual_seed(6)
    class_index, k_sub, num_rows, dim = torch.tensor([0, 2, 3]), 2, 10, 4
    rows = kept_rows(class_index, k_sub)  # [0, 1, 4, 5, 6, 7]
    softmax_values = torch.randn(6, dim, generator=gen)
    all_rows, some = torch.randn(6, dim, generator=gen), torch.randn(3, dim, generator=gen)
    positions = torch.tensor([1, 4, 1])  # kept-order positions, one repeated
    expected = torch.zeros(num_rows, dim).index_add_(0, rows, softmax_values + all_rows)
    expected.index_add_(0, rows[positions], some)

    def fold(grad):
        stash = RowGradStash(class_index, k_sub)
        stash.weight_rows = num_rows
        stash.add_all_rows(all_rows.clone())
        stash.add_rows(positions, some)
        return stash.fold(grad)

    coalesced = torch.sparse_coo_tensor(rows[None], softmax_values.clone(), (num_rows, dim), is_coalesced=True,
                                        check_invariants=True)
    assert fold(coalesced) is coalesced  # in place: no second gradient built
    torch.testing.assert_close(coalesced.to_dense(), expected)
    uncoalesced = torch.sparse_coo_tensor(rows.flip(0)[None], softmax_values.flip(0), (num_rows, dim),
                                          check_invariants=True)
    torch.testing.assert_close(fold(uncoalesced).to_dense(), expected)
    softmax_dense = torch.zeros(num_rows, dim).index_add_(0, rows, softmax_values)
    torch.testing.assert_close(fold(softmax_dense.clone()), expected)
    torch.testing.assert_close(fold(None).to_dense(), expected - softmax_dense)


def test_head_folds_penalty_gradients_in_place(monkeypatch):
    """With the chunked path, the head takes the in-place branch (the memory saving is real)."""
    from partialfc import CombinedMargin, PartialFC
    from partialfc.head import center_grad_fold

    in_place = []
    original = center_grad_fold.RowGradStash.fold
    monkeypatch.setattr(center_grad_fold.RowGradStash, "fold",
                        lambda self, grad: in_place.append(original(self, grad) is grad) or grad)
    for rate in (1.0, 0.5):
        head = PartialFC(CombinedMargin(), DIM, 9, sample_rate=rate, num_subcenters=2, impl="torch",
                         intra_weight=1.0, inter_weight=1.0)
        head(torch.randn(6, DIM), torch.tensor([0, 1, 1, 4, 8, 8])).backward()
    assert in_place == [True, True]


def test_sample_on_its_center_has_finite_gradients():
    """cos = 1 exactly (a sample on its center, a duplicate sample): every gradient stays finite."""
    from partialfc import CombinedMargin, PartialFC

    head = PartialFC(CombinedMargin(*MARGINS["arcface"]), DIM, 5, impl="torch", intra_weight=1.0,
                     inter_weight=1.0, triplet_weight=1.0)
    with torch.no_grad():
        head.weight[3] = head.weight[2]  # two identical centers: inter sees cos = 1 too
    labels = torch.tensor([2, 2, 4, 1])
    x = head.weight.detach()[labels] * 7.0  # every sample on its center; samples 0 and 1 identical
    x.requires_grad_()
    loss = head(x, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert head.last_geodesic_terms["intra"].item() < 1e-3  # acos of a float32 cosine within 1 ulp of 1
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(head.weight.grad.to_dense()).all())


def test_bad_weights_are_refused():
    from partialfc import CombinedMargin, PartialFC

    def make(**kwargs):
        return PartialFC(CombinedMargin(), DIM, 4, **kwargs)

    with pytest.raises(ValueError, match="intra_weight must be >= 0, got -1"):
        make(intra_weight=-1.0)
    with pytest.raises(TypeError, match="inter_weight must be a finite number, got nan"):
        make(inter_weight=float("nan"))
    with pytest.raises(TypeError, match="triplet_weight must be a finite number, got True"):
        make(triplet_weight=True)
    with pytest.raises(ValueError, match=r"triplet_margin is an angle in \[0, pi\), got 4.0"):
        make(triplet_margin=4.0)
    with pytest.raises(ValueError, match="inter_weight > 0 needs at least 2 classes"):
        PartialFC(CombinedMargin(), DIM, 1, inter_weight=1.0)


def test_config_keys_reach_the_head(tmp_path):
    from partialfc.config import load_config
    from partialfc.builders import build_head as build_head_from_config

    path = tmp_path / "c.toml"
    path.write_text("[model]\nembedding_size = 16\n")
    cfg = load_config(path, ["head.intra_weight=1", "head.inter_weight=0.5", "head.triplet_weight=2",
                             "head.triplet_margin=0.2"])
    head = build_head_from_config(cfg, 6)
    assert (head.geodesic.intra, head.geodesic.inter, head.geodesic.triplet) == (1.0, 0.5, 2.0)
    assert head.geodesic.triplet_margin == 0.2
    from partialfc.config import HeadConfig
    from partialfc.head.geodesic import DEFAULT_TRIPLET_MARGIN

    assert HeadConfig().triplet_margin == DEFAULT_TRIPLET_MARGIN  # config.py stays torch-free: a copy
    assert not build_head_from_config(load_config(path), 6).geodesic.active
    with pytest.raises(ValueError, match=r"head\.triplet_weight = -0\.5 must be >= 0"):
        load_config(path, ["head.triplet_weight=-0.5"])
    with pytest.raises(ValueError, match=r"head\.triplet_margin = 3\.5 must be in \[0, 3\.14"):
        load_config(path, ["head.triplet_margin=3.5"])


# ------------------------------------------------------------------ training
def test_each_term_lowers_itself_when_trained():
    """Trained with a term on, the term ends lower than trained with it off (same start, same data)."""
    from partialfc import CombinedMargin, PartialFC

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (24,), generator=gen)
    start_x = torch.randn(24, DIM, generator=gen)

    def make(**weights):
        return PartialFC(CombinedMargin(*MARGINS["arcface"]), DIM, 6, impl="torch", init_std=1.0, **weights)

    for name in ("intra", "inter", "triplet"):
        finals = {}
        for weight in (0.0, 8.0):
            head = make(**{f"{name}_weight": weight})
            x = start_x.clone().requires_grad_()
            for _ in range(30):
                x.grad = head.weight.grad = None
                head(x, labels).backward()
                with torch.no_grad():
                    x -= 0.5 * x.grad
                    head.weight -= 0.5 * head.weight.grad.to_dense()
            probe = make(**{f"{name}_weight": 1.0})
            probe.load_state_dict(head.state_dict())
            with torch.no_grad():
                probe(x, labels)
            finals[weight] = probe.last_geodesic_terms[name].item()
        assert finals[8.0] < finals[0.0] - 0.01, (name, finals)


ROOT = Path(__file__).resolve().parents[2]


def test_demo_trains_with_all_three_terms(tmp_path):
    """The demo config (2 gloo ranks, r = 0.5) with every penalty on: the loss falls."""
    import json

    sets = ["model.backbone=mobilefacenet_tiny", "model.embedding_size=64", "data.num_classes=13",
            "data.batch_size=8", "data.num_samples=400", "head.sample_rate=0.5", "head.scale=16.0",
            "optim.warmup_epochs=0.1", "train.max_steps=16", "train.log_every=2", "train.checkpoint_every=0",
            "head.intra_weight=1.0", "head.inter_weight=1.0", "head.triplet_weight=1.0",
            f"train.output={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "partialfc.train", str(ROOT / "configs" / "demo.toml")] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recorded = [r["loss"] for r in records if "loss" in r]
    assert len(recorded) == 8 and all(math.isfinite(v) for v in recorded)
    assert sum(recorded[-2:]) < 0.7 * sum(recorded[:2]), recorded
