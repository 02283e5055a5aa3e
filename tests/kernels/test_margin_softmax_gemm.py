"""GEMM + fused-elementwise path of the margin-softmax statistics, on CPU under TRITON_INTERPRET=1.

The GEMMs are CPU torch matmuls here (with fp32 results for half inputs, as
``torch.mm(..., out_dtype=torch.float32)`` gives on CUDA) and the Triton passes run in
the interpreter with 16 x 16 tiles, so the small shapes below cross several chunks,
tiles, splits and partial blocks. Every case is compared with the naive float64 path
on the same rounded inputs: weights are rounded to the embeddings' dtype and stored
as the tested weight dtype, so the GEMM sees exactly the reference's values.

Tolerances (max abs error <= rtol * max |reference|):

    inputs      stats (lse, target)   grad X / grad W
    float32     2e-5                  2e-5
    float16     2e-5                  3e-3    (dS rounded to fp16 before its GEMMs)
    bfloat16    2e-5                  2.5e-2  (dS rounded to bf16 before its GEMMs)

The stats bound is the margin's, not the kernel's: SphereFace (m1 = 4) multiplies a
cosine's fp32 rounding by scale * d psi / d cos ~ 900 * 64 at cos ~ 0.97, which moved a
dominant target's lse by up to ~1e-5 relative (the fused Triton path shows the same).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import types

import pytest
import torch
from margin_cases import MARGINS, assert_close_scaled, build_case, rounded_case, run_impl

pytest.importorskip("triton", reason="triton is not installed (extra 'triton'); gemm path untested")

from partialfc.kernels import AUTO_TABLE, margin_softmax_gemm, margin_softmax_stats, resolve_impl
from partialfc.kernels.margin_softmax_gemm import TILE_BYTES, chunk_classes, margin_softmax_stats_gemm
from partialfc.kernels.margin_softmax_ref import margin_softmax_stats_naive

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("TRITON_INTERPRET was set to something other than 1 before this module",
                allow_module_level=True)

TOLERANCES = {  # dtype: (stats, grads)
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-5, 3e-3),
    torch.bfloat16: (2e-5, 2.5e-2),
}

CASES = [  # (batch, num_local, num_kept, dim, K, margin, dtype, weight dtype, chunk_size)
    (3, 1, 1, 16, 1, "arcface", torch.float32, None, None),  # one class, B = 3
    (37, 50, 43, 40, 3, "sphereface", torch.float32, None, 7),  # 7 chunks, K = 3
    (37, 60, 35, 16, 1, "cosface", torch.float16, torch.float32, 16),
    (20, 40, 33, 24, 3, "combined", torch.bfloat16, torch.float32, 5),  # the head's dtypes
    (11, 12, 9, 16, 5, "arcface", torch.float32, None, 4),  # K = 5: 3 padding sub-centers per class
    (3, 9, 7, 130, 1, "combined", torch.bfloat16, None, None),  # D past a power of two
]


def _check(got, want, dtype, stats_rtol=None, grad_rtol=None):
    stats_tol, grad_tol = TOLERANCES[dtype]
    for key in ("lse", "target"):
        assert_close_scaled(key, got[key], want[key], rtol=stats_rtol or stats_tol)
    for key in ("grad_x", "grad_w"):
        assert_close_scaled(key, got[key], want[key], rtol=grad_rtol or grad_tol)


@pytest.mark.parametrize("case_args", CASES, ids=lambda c: f"B{c[0]}-k{c[2]}-D{c[3]}-K{c[4]}-{c[5]}-{str(c[6])[6:]}")
def test_gemm_matches_naive_float64(case_args):
    batch, num_local, num_kept, dim, num_subcenters, margin_name, dtype, weight_dtype, chunk = case_args
    margin = MARGINS[margin_name]
    case = rounded_case(build_case(batch, num_local, num_kept, dim, num_subcenters, seed=batch * 5 + dim), dtype)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(margin_softmax_stats_gemm, case, margin, dtype=dtype, weight_dtype=weight_dtype, chunk_size=chunk)
    _check(got, want, dtype)
    assert got["out_dtype"] == torch.float32
    assert got["raw_grad_x"].dtype == dtype and got["raw_grad_x"].layout == torch.strided
    grad_w = got["raw_grad_w"]
    assert grad_w.layout == torch.sparse_coo and grad_w._nnz() == num_kept * num_subcenters
    assert grad_w.dtype == (weight_dtype or dtype) and grad_w.shape == case["weight"].shape
    rows = (case["class_index"][:, None] * num_subcenters + torch.arange(num_subcenters)).reshape(-1)
    assert torch.equal(grad_w.coalesce().indices()[0], rows)


def test_half_precision_logit_tile_is_close(monkeypatch):
    # TILE_DTYPE = "compute" rounds every non-target dot to bf16 (8 bits): a logit moves by
    # up to scale * 2**-9 * |cos| (0.125 at scale 64, cos 1), so lse by that relative to ~35.
    monkeypatch.setattr(margin_softmax_gemm, "TILE_DTYPE", "compute")
    margin = MARGINS["arcface"]
    case = rounded_case(build_case(20, 40, 33, 24, 3, seed=4), torch.bfloat16)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(margin_softmax_stats_gemm, case, margin, dtype=torch.bfloat16, weight_dtype=torch.float32,
                   chunk_size=8)
    _check(got, want, torch.bfloat16, stats_rtol=4e-3, grad_rtol=4e-2)
    assert_close_scaled("target", got["target"], want["target"], rtol=2e-5)  # computed apart, in fp32
    monkeypatch.setattr(margin_softmax_gemm, "TILE_DTYPE", "fp8")
    with pytest.raises(ValueError, match="TILE_DTYPE"):
        run_impl(margin_softmax_stats_gemm, case, margin, dtype=torch.bfloat16)


def test_off_rank_targets_lse_only_backward_and_frozen_weight():
    margin = MARGINS["cosface"]
    case = build_case(batch=6, num_local=20, num_kept=18, dim=16, num_subcenters=3, all_off_rank=True)
    results = []
    for fn in (margin_softmax_stats_gemm, margin_softmax_stats_naive):
        embeddings = case["embeddings"].float().requires_grad_(True)
        weight = case["weight"].float()  # frozen: no weight gradient asked for
        lse, target = fn(embeddings, weight, case["class_index"], case["target_position"], 3, margin)
        (lse * case["grad_lse"].float()).sum().backward()  # target's upstream grad is None
        results.append((lse.detach(), target.detach(), embeddings.grad))
    assert torch.all(results[0][1] == 0)
    for got, want, name in zip(results[0], results[1], ("lse", "target", "grad_x")):
        assert_close_scaled(name, got.double(), want.double(), rtol=2e-5)


def test_no_kept_class_gives_empty_statistics():
    margin = MARGINS["arcface"]
    embeddings = torch.nn.functional.normalize(torch.randn(4, 16), dim=1).requires_grad_(True)
    weight = torch.randn(6, 16).requires_grad_(True)
    lse, target = margin_softmax_stats_gemm(embeddings, weight, torch.zeros(0, dtype=torch.long),
                                            torch.full((4,), -1), 1, margin)
    assert torch.all(lse == float("-inf")) and torch.all(target == 0)
    target.sum().backward()
    assert torch.all(embeddings.grad == 0) and weight.grad._nnz() == 0


def test_errors_name_the_problem(monkeypatch):
    margin = MARGINS["arcface"]
    case = build_case(batch=4, num_local=6, num_kept=5, dim=16, num_subcenters=1)
    args = (case["embeddings"], case["weight"], case["class_index"], case["target_position"], 1, margin)
    with pytest.raises(TypeError, match="float64"):
        margin_softmax_stats_gemm(*args)
    float_args = (args[0].float(), args[1].float()) + args[2:]
    with pytest.raises(ValueError, match="chunk_size"):
        margin_softmax_stats_gemm(*float_args, chunk_size=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        margin_softmax_stats_gemm(*float_args)


def test_chunks_stay_under_the_byte_bound():
    # fp32 logit tile + bf16 dS tile = 6 bytes per (row, center row) at B = 1024.
    for batch, subs, entry in ((1024, 1, 6), (1024, 3, 6), (4096, 1, 4), (3, 5, 2)):
        classes = chunk_classes(batch, subs, entry)
        assert batch * classes * subs * entry <= TILE_BYTES < batch * (classes + 1) * subs * entry
    assert chunk_classes(1024, 1, 6) == 43690
    assert chunk_classes(2**40, 1, 4) == 1  # never zero
    assert chunk_classes(1024, 3, 6, chunk_size=5) == 5
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_classes(1024, 1, 6, chunk_size=True)


def test_auto_dispatch_table():
    def fake_weight(device_type, dtype=torch.float32):
        return types.SimpleNamespace(device=types.SimpleNamespace(type=device_type), dtype=dtype)

    assert resolve_impl("auto", torch.randn(4, 8)) == "torch"  # CPU
    # Whatever the table says for CUDA half precision, the lookup must return it.
    half_row = next(row for row in AUTO_TABLE if "bfloat16" in row[1])
    assert resolve_impl("auto", fake_weight("cuda"), torch.bfloat16, 10**6) == half_row[3]
    assert resolve_impl("auto", fake_weight("cuda"), torch.float16) == half_row[3]
    assert resolve_impl("auto", fake_weight("cuda"), torch.float32) == "triton"
    assert resolve_impl("gemm", fake_weight("cpu")) == "gemm"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cublas", fake_weight("cpu"))
    for row in AUTO_TABLE:
        assert len(row) == 5 and row[3] in ("gemm", "triton", "torch", "naive") and row[4]
    # Through the entry point on CPU (interpreter): impl="gemm" runs this path.
    margin = MARGINS["cosface"]
    case = build_case(batch=4, num_local=6, num_kept=5, dim=16, num_subcenters=1)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(lambda *a: margin_softmax_stats(*a, impl="gemm", chunk_size=2), case, margin, dtype=torch.float32)
    assert_close_scaled("lse", got["lse"], want["lse"], rtol=2e-6)


# ------------------------------------------------------------------ through PartialFC on 2 ranks
def _head_step(rank, world_size, impl, compute_dtype, seed):
    from partialfc import CombinedMargin, PartialFC

    gen = torch.Generator().manual_seed(seed)
    num_classes, subs, batch, dim = 23, 3, 5, 16
    centers = torch.randn(num_classes * subs, dim, generator=gen)
    embeddings = torch.randn(world_size * batch, dim, generator=gen)
    labels = torch.randint(0, num_classes, (world_size * batch,), generator=gen)
    head = PartialFC(CombinedMargin.preset("arcface"), dim, num_classes, num_subcenters=subs, sample_rate=0.6,
                     impl=impl, chunk_size=3, seed=seed, compute_dtype=compute_dtype)
    with torch.no_grad():
        head.weight.copy_(centers[head.class_start * subs:(head.class_start + head.num_local) * subs])
    local = embeddings[rank * batch:(rank + 1) * batch].clone().requires_grad_(True)
    loss = head(local, labels[rank * batch:(rank + 1) * batch])
    loss.backward()
    return loss.item(), local.grad, head.weight.grad.to_dense(), head.last_class_index


def _compare_on_ranks(rank, world_size):
    return {dtype: [_head_step(rank, world_size, impl, dtype, seed=5) for impl in ("gemm", "naive")]
            for dtype in (torch.float32, torch.bfloat16)}


def test_partial_fc_gemm_equals_naive_on_two_ranks():
    """PartialFC(impl="gemm") inside 2 gloo ranks (r = 0.6, K = 3) matches impl="naive" rank by rank,
    with fp32 and bf16 compute dtypes (one spawn for both: starting ranks is the slow part)."""
    from spawn import run_ranks

    results = run_ranks(_compare_on_ranks, 2)  # TRITON_INTERPRET=1 is inherited
    for dtype in (torch.float32, torch.bfloat16):
        # naive upcasts bf16 embeddings and keeps W in fp32; gemm rounds W to bf16 for its GEMMs.
        rtol, grad_rtol = (1e-5, 2e-5) if dtype == torch.float32 else (5e-3, 3e-2)
        for rank_results in results:
            (gemm_loss, gemm_x, gemm_w, gemm_kept), (naive_loss, naive_x, naive_w, naive_kept) = rank_results[dtype]
            assert torch.equal(gemm_kept, naive_kept)  # same sampling stream
            assert gemm_loss == pytest.approx(naive_loss, rel=rtol)
            assert_close_scaled("grad_x", gemm_x.double(), naive_x.double(), rtol=grad_rtol)
            assert_close_scaled("grad_w", gemm_w.double(), naive_w.double(), rtol=grad_rtol)
        assert results[0][dtype][0][0] == results[1][dtype][0][0]  # the loss is the same on every rank
