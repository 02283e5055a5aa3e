"""Triton path of the margin-softmax statistics, run on CPU under TRITON_INTERPRET=1.

Compared with the naive float64 path (same rounded inputs) and the torch chunked path.
The interpreter executes every program in Python, so cases are few and tiny; the tile
is 16 x 16 x 16 there, so the shapes below still cover partial tiles in B, classes and
D, several class tiles per split and several splits.

Tolerances (max abs error <= rtol * max |reference|):

    inputs      stats (lse, target)   grad X    grad W
    float32     6e-6                  2e-5      2e-5
    float16     2e-6                  3e-3      3e-3   (backward dots take fp16 inputs)
    bfloat16    2e-6                  2.5e-2    2.5e-2 (backward dots take bf16 inputs)

The fp32 stats bound is set by the margin, not the kernel: a target logit moves by
scale * d psi / d cos times the cosine's rounding (a few fp32 ulps, ~2e-7 at D = 40,
whatever the order of the dot's sum), and for SphereFace (m1 = 4) at cos ~ 0.97 that
factor is ~900, i.e. ~2e-4 on an lse of ~35.
With fp16 embeddings and fp32 weights the kernel rounds W to fp16 for its dots (what
autocast does to F.linear); the stats then get 2e-3.
Under the interpreter a bf16 dot runs in fp32 on bf16-rounded operands (triton's CPU
interpreter cannot multiply bf16), so the bf16 tensor-core arithmetic itself is only
exercised on a GPU.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch
from margin_cases import MARGINS, assert_close_scaled, build_case, rounded_case, run_impl

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("triton is not installed (pip install 'triton>=3.0'); Triton path untested",
                allow_module_level=True)

from partialfc.kernels import margin_softmax as triton_module
from partialfc.kernels import margin_softmax_tiles as tiles
from partialfc.kernels import margin_softmax_stats
from partialfc.kernels.margin_softmax import margin_softmax_stats_triton
from partialfc.kernels.margin_softmax_ref import margin_softmax_stats_naive, margin_softmax_stats_torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("TRITON_INTERPRET was set to something other than 1 before this module",
                allow_module_level=True)

TOLERANCES = {  # dtype: (stats, grads)
    torch.float32: (6e-6, 2e-5),
    torch.float16: (2e-6, 3e-3),
    torch.bfloat16: (2e-6, 2.5e-2),
}

# fp16 embeddings with fp32 weights: the kernel's rounding of W to fp16 moves each
# logit by up to ~scale * 2**-11 relative to either reference.
MIXED_STATS_RTOL = 2e-3

CASES = [  # (batch, num_local, num_kept, dim, K, margin, dtype, weight dtype, chunk_size)
    (3, 1, 1, 16, 1, "arcface", torch.float32, None, None),
    (37, 50, 43, 40, 3, "sphereface", torch.float32, None, None),
    (37, 60, 35, 16, 1, "cosface", torch.float16, None, 16),
    (20, 40, 33, 24, 3, "combined", torch.bfloat16, None, None),
    (19, 30, 21, 16, 3, "arcface", torch.float16, torch.float32, 32),
    (3, 9, 7, 512, 1, "combined", torch.float32, None, None),
    (11, 12, 9, 16, 5, "cosface", torch.float32, None, None),  # K = 5: 3 padding rows per class
]


@pytest.mark.parametrize("case_args", CASES, ids=lambda c: f"B{c[0]}-k{c[2]}-D{c[3]}-K{c[4]}-{c[5]}-{str(c[6])[6:]}")
def test_triton_matches_naive_float64_and_torch(case_args):
    batch, num_local, num_kept, dim, num_subcenters, margin_name, dtype, weight_dtype, chunk = case_args
    margin = MARGINS[margin_name]
    case = build_case(batch, num_local, num_kept, dim, num_subcenters, seed=batch * 7 + dim)
    # The kernel rounds W to the embeddings' dtype for its dots (AMP semantics) but takes
    # the row norms from W as stored; with mixed dtypes neither reference does exactly
    # that, hence the looser MIXED_STATS_RTOL there.
    want = run_impl(margin_softmax_stats_naive, rounded_case(case, dtype, dtype), margin)
    got = run_impl(margin_softmax_stats_triton, case, margin, dtype=dtype, weight_dtype=weight_dtype,
                   chunk_size=chunk)
    torch_path = run_impl(margin_softmax_stats_torch, case, margin, dtype=dtype, weight_dtype=weight_dtype,
                          chunk_size=5)
    stats_tol, grad_tol = TOLERANCES[dtype]
    w_grad_tol = max(grad_tol, TOLERANCES[weight_dtype or dtype][1])
    for reference in (want, torch_path):
        mixed = weight_dtype not in (None, dtype)
        for key in ("lse", "target"):
            assert_close_scaled(key, got[key], reference[key], rtol=MIXED_STATS_RTOL if mixed else stats_tol)
        assert_close_scaled("grad_x", got["grad_x"], reference["grad_x"], rtol=grad_tol)
        assert_close_scaled("grad_w", got["grad_w"], reference["grad_w"], rtol=w_grad_tol)
    assert got["out_dtype"] == torch.float32
    assert got["raw_grad_x"].dtype == dtype and got["raw_grad_x"].layout == torch.strided
    grad_w = got["raw_grad_w"]
    assert grad_w.layout == torch.sparse_coo and grad_w._nnz() == num_kept * num_subcenters
    assert grad_w.dtype == (weight_dtype or dtype) and grad_w.shape == case["weight"].shape
    grad_w = grad_w.coalesce()
    rows = (case["class_index"][:, None] * num_subcenters + torch.arange(num_subcenters)).reshape(-1)
    assert torch.equal(grad_w.indices()[0], rows)


def test_triton_off_rank_targets_and_lse_only_backward():
    margin = MARGINS["arcface"]
    case = build_case(batch=5, num_local=20, num_kept=18, dim=16, num_subcenters=3, all_off_rank=True)
    results = []
    for fn in (margin_softmax_stats_triton, margin_softmax_stats_naive):
        embeddings = case["embeddings"].float().requires_grad_(True)
        weight = case["weight"].float().requires_grad_(True)
        lse, target = fn(embeddings, weight, case["class_index"], case["target_position"], 3, margin)
        (lse * case["grad_lse"].float()).sum().backward()  # target's upstream grad is None
        results.append((lse.detach(), target.detach(), embeddings.grad, weight.grad.to_dense()))
    assert torch.all(results[0][1] == 0)
    for got, want, name in zip(results[0], results[1], ("lse", "target", "grad_x", "grad_w")):
        assert_close_scaled(name, got.double(), want.double(), rtol=2e-5)


def test_triton_dispatch_and_errors(monkeypatch):
    margin = MARGINS["cosface"]
    case = build_case(batch=4, num_local=6, num_kept=5, dim=16, num_subcenters=1)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(lambda *a: margin_softmax_stats(*a, impl="triton"), case, margin, dtype=torch.float32)
    assert_close_scaled("lse", got["lse"], want["lse"], rtol=2e-6)
    args = (case["embeddings"], case["weight"], case["class_index"], case["target_position"], 1, margin)
    with pytest.raises(TypeError, match="float64"):
        margin_softmax_stats_triton(*args)
    float_args = (args[0].float(), args[1].float()) + args[2:]
    with pytest.raises(ValueError, match="power of two"):
        margin_softmax_stats_triton(*float_args, chunk_size=24)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        margin_softmax_stats_triton(*float_args)


def _config(block_b, block_r, block_d, warps, stages=2):
    return triton.Config(dict(BLOCK_B=block_b, BLOCK_R=block_r, BLOCK_D=block_d), num_warps=warps, num_stages=stages)


def test_autotune_candidates_are_pruned_by_width_and_subcenters():
    # No GPU here: this checks the selection rule the CUDA autotuner applies before timing.
    prune = tiles.prune_configs
    dx = [_config(64, 64, 64, 8), _config(32, 32, 64, 8), _config(16, 32, 64, 4)]
    # At D = 512 a 64-row accumulator (or 32 rows of W to update from) spills; at D = 128 the
    # 64 x 64 backward tile does (calibrated with benchmarks/kernel.py --compile-check sm_90).
    assert prune(dx, {}, "dx", D_PAD=512, K_PAD=1) == [dx[1]]
    assert prune(dx, {}, "dx", D_PAD=128, K_PAD=1) == dx[1:]
    fallback = prune(dx, {}, "dx", D_PAD=128, K_PAD=64)  # no tile holds one class of 64 rows
    assert len(fallback) == 1 and fallback[0].kwargs["BLOCK_R"] == 64
    for d_pad, k_pad in ((16, 1), (512, 1), (512, 4), (4096, 1)):
        for name, candidates in (("none", tiles.FORWARD_CANDIDATES), ("dx", tiles.DX_CANDIDATES),
                                 ("dw", tiles.DW_CANDIDATES)):
            configs = [_config(b, r, d, w, st) for b, r, d, w, st in candidates]
            kept = prune(configs, {}, name, D_PAD=d_pad, K_PAD=k_pad)
            assert kept and all(c.kwargs["BLOCK_R"] >= k_pad and c.kwargs["BLOCK_D"] <= max(32, d_pad) for c in kept)


def test_split_plan_bounds_the_dx_partials():
    # CUDA-sized numbers: 132 SMs, batch 1024 x D 512, a million classes.
    splits, per_split = tiles.split_plan(1024, 1_000_000, 512, 4 * 132, 64, 512)
    assert splits * per_split >= 1_000_000 and (splits - 1) * per_split < 1_000_000
    assert splits * 1024 * 512 * 4 <= tiles.DX_PARTIAL_BYTES
    # Few classes: never an empty split, never more splits than classes.
    assert tiles.split_plan(1024, 3, 512, 528, 64, 1) == (3, 1)
    assert tiles.split_plan(8, 1, 16, 4, 16, 1) == (1, 1)
    assert tiles.split_plan(8, 0, 16, 4, 16, 1) == (1, 1)  # no kept class: the launch is skipped anyway


def test_autotuned_launch_path_runs_under_the_interpreter(monkeypatch):
    # On CUDA the kernels launch through triton.autotune with grids computed from the chosen
    # tile. With one candidate per kernel the autotuner times nothing, so that path (and
    # tiles other than the interpreter's fixed ones) can run here on CPU.
    kernels = {
        name: (plain, triton_module._tuned(plain, [candidate], name if name != "forward" else "none"))
        for (name, (plain, _)), candidate in zip(triton_module._KERNELS.items(),
                                                  [(32, 64, 32, 4, 2), (16, 32, 16, 4, 2), (32, 16, 32, 4, 2)])
    }
    monkeypatch.setattr(triton_module, "_KERNELS", kernels)
    real_plan = triton_module._plan
    monkeypatch.setattr(triton_module, "_plan", lambda *a: dict(real_plan(*a), blocks=None))
    margin = MARGINS["arcface"]
    case = build_case(batch=21, num_local=50, num_kept=37, dim=40, num_subcenters=3, seed=9)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(margin_softmax_stats_triton, case, margin, dtype=torch.float32)
    stats_tol, grad_tol = TOLERANCES[torch.float32]
    for key in ("lse", "target"):
        assert_close_scaled(key, got[key], want[key], rtol=stats_tol)
    for key in ("grad_x", "grad_w"):
        assert_close_scaled(key, got[key], want[key], rtol=grad_tol)
