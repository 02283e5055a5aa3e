"""The margin-softmax implementations on a real GPU (``pytest -m cuda``); skipped without one.

Run on a CUDA machine as ``TRITON_INTERPRET=0 python -m pytest -m cuda tests/kernels/test_cuda.py``
(``benchmarks/gpu/run_all.sh`` does). The interpreter test modules default
TRITON_INTERPRET to 1 when imported, and Triton fixes a kernel's mode when its module is
imported, so this module pins it to 0 first on a GPU machine (the interpreter modules
then skip themselves there) and skips itself if it finds 1 already set.

What is checked, per implementation (``gemm``, ``triton``, and ``torch`` with its CUDA
half-GEMM branch): forward statistics and both gradients against the naive float64 path
on the same bf16-rounded inputs (weights stored fp32 holding bf16 values, as the head
keeps them), with random upstream gradients for both outputs and some targets on
another rank: every margin at K = 1 and 3, then odd shapes (B = 3, 37, 1024;
n = 1, 423, 1e5; D = 16, 128, 512), and the head through PartialFC against impl=naive.

Tolerances (max abs error <= rtol * max |reference|): stats 2e-5 (the margin's
amplification of fp32 rounding, see test_margin_softmax_gemm.py), or 4e-3 for the gemm
path when its logit tile is bf16 (no torch.mm(out_dtype=) in this torch); gradients
2.5e-2 (dS and the GEMM outputs are rounded to bf16).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0"  # compile; margin_cases would default to the interpreter

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: run `pytest -m cuda` on a GPU machine"),
]
if HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set, so Triton would interpret these kernels: run "
                "`TRITON_INTERPRET=0 python -m pytest -m cuda tests/kernels/test_cuda.py`", allow_module_level=True)

from margin_cases import MARGINS, assert_close_scaled, build_case, rounded_case  # noqa: E402

DEVICE = "cuda"
IMPLS = ("gemm", "triton", "torch")
STATS_RTOL, GRAD_RTOL = 2e-5, 2.5e-2
BF16_TILE_STATS_RTOL = 4e-3  # the gemm path with a bf16 logit tile


def _run(impl, case, margin, dtype=torch.bfloat16, chunk_size=None):
    """Forward + backward on CUDA with the case's upstream gradients; float64 results on the host."""
    from partialfc.kernels import margin_softmax_stats

    embeddings = case["embeddings"].to(DEVICE, dtype, copy=True).requires_grad_(True)
    # The head keeps W in fp32; here it holds bf16-representable values (the rounded case).
    weight_dtype = torch.float32 if dtype != torch.float64 else dtype
    weight = case["weight"].to(DEVICE, weight_dtype, copy=True).requires_grad_(True)
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    lse, target = margin_softmax_stats(embeddings, weight, case["class_index"].to(DEVICE),
                                       case["target_position"].to(DEVICE), case["num_subcenters"], margin,
                                       impl=impl if dtype != torch.float64 else "naive", **kwargs)
    torch.autograd.backward([lse, target], [case["grad_lse"].to(DEVICE, lse.dtype),
                                            case["grad_target"].to(DEVICE, target.dtype)])
    return dict(lse=lse.detach().double().cpu(), target=target.detach().double().cpu(),
                grad_x=embeddings.grad.double().cpu(), grad_w=weight.grad.to_dense().double().cpu())


def _stats_rtol(impl):
    if impl != "gemm":
        return STATS_RTOL
    from partialfc.kernels import margin_softmax_gemm

    probe = torch.zeros(1, 1, dtype=torch.bfloat16, device=DEVICE)
    return STATS_RTOL if margin_softmax_gemm._tile_dtype(probe) == torch.float32 else BF16_TILE_STATS_RTOL


def _check(impl, case, margin, chunk_size=None):
    case = rounded_case(case, torch.bfloat16)
    want = _run("naive", case, margin, dtype=torch.float64)
    # Explicit triton tiles: no autotune here (the benchmark runs the autotuned path).
    got = _run(impl, case, margin, chunk_size=chunk_size or (32 if impl == "triton" else None))
    for key in ("lse", "target"):
        assert_close_scaled(key, got[key], want[key], rtol=_stats_rtol(impl))
    for key in ("grad_x", "grad_w"):
        assert_close_scaled(key, got[key], want[key], rtol=GRAD_RTOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_subcenters", [1, 3])
@pytest.mark.parametrize("margin_name", sorted(MARGINS))
def test_every_margin(impl, num_subcenters, margin_name):
    case = build_case(batch=37, num_local=500, num_kept=423, dim=128, num_subcenters=num_subcenters, seed=3)
    _check(impl, case, MARGINS[margin_name])


SHAPES = [  # (batch, classes on the rank, kept classes, D)
    (3, 1, 1, 16),
    (37, 423, 423, 512),
    (1024, 600, 423, 16),
    (1024, 100_000, 100_000, 512),
]


@functools.lru_cache(maxsize=2)
def _shape_case(batch, num_local, num_kept, dim, num_subcenters):
    """Built once for the three impls (the 1e5-class case takes seconds on the host)."""
    return build_case(batch, num_local, num_kept, dim, num_subcenters, seed=batch + dim)


@pytest.mark.parametrize("num_subcenters", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-n{}-k{}-D{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_odd_shapes(impl, num_subcenters, shape):
    # k = n is r = 1: build_case keeps a sorted permutation of all classes, i.e. arange(n).
    _check(impl, _shape_case(*shape, num_subcenters), MARGINS["arcface"])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_targets_off_rank(impl):
    case = build_case(batch=64, num_local=300, num_kept=211, dim=128, num_subcenters=3, seed=8, all_off_rank=True)
    _check(impl, case, MARGINS["combined"])


def test_gemm_chunks_agree():
    # Many small chunks vs the default byte-bounded chunking: the same numbers.
    case = build_case(batch=256, num_local=5000, num_kept=4099, dim=128, num_subcenters=3, seed=4)
    rounded = rounded_case(case, torch.bfloat16)
    one = _run("gemm", rounded, MARGINS["arcface"])
    many = _run("gemm", rounded, MARGINS["arcface"], chunk_size=333)
    for key in ("lse", "target"):
        assert_close_scaled(key, one[key], many[key], rtol=1e-6)
    for key in ("grad_x", "grad_w"):
        assert_close_scaled(key, one[key], many[key], rtol=1e-2)  # bf16 rounding of per-chunk products


@pytest.mark.parametrize("impl", ["gemm", "triton"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_head_equals_naive(impl, sample_rate):
    """PartialFC on one GPU (bf16 compute, fp32 weights) against impl=naive with the same weights."""
    from partialfc import CombinedMargin, PartialFC

    results = []
    for name in (impl, "naive"):
        torch.manual_seed(0)
        head = PartialFC(CombinedMargin.preset("arcface"), 128, 5003, sample_rate=sample_rate, num_subcenters=3,
                         impl=name, seed=1, compute_dtype=torch.bfloat16).to(DEVICE)
        gen = torch.Generator(device=DEVICE).manual_seed(2)
        embeddings = torch.randn(200, 128, device=DEVICE, generator=gen).requires_grad_(True)
        labels = torch.randint(0, 5003, (200,), device=DEVICE, generator=gen)
        loss = head(embeddings, labels)
        loss.backward()
        results.append((loss.item(), embeddings.grad.double().cpu(), head.weight.grad.to_dense().double().cpu(),
                        head.last_class_index.cpu()))
    (loss, grad_x, grad_w, kept), (ref_loss, ref_x, ref_w, ref_kept) = results
    assert torch.equal(kept, ref_kept)
    # naive multiplies bf16 embeddings by the fp32 weights; the kernels round W to bf16 (AMP).
    assert loss == pytest.approx(ref_loss, rel=5e-3)
    assert_close_scaled("grad_x", grad_x, ref_x, rtol=3e-2)
    assert_close_scaled("grad_w", grad_w, ref_w, rtol=3e-2)
