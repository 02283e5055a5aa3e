"""Torch chunked path and naive path of the margin-softmax statistics.

The naive float64 path is checked against an independent numpy computation (loss values
and central finite differences); the chunked path is then checked against the naive one
on odd shapes, every margin, several dtypes and chunk sizes, with random upstream grads.

Tolerances (max abs error <= rtol * max |reference|, reference = naive float64 on the
same rounded inputs):

    inputs                stats (lse, target)   grad X / grad W
    float64               1e-12                 1e-10
    float32               2e-6                  2e-5
    float16 / bfloat16    2e-6 (fp32 compute)   2e-5, plus the output rounding of the
                                                gradient dtype (fp16 1e-3, bf16 8e-3)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from margin_cases import MARGINS, assert_close_scaled, build_case, rounded_case, run_impl
from torch.utils._python_dispatch import TorchDispatchMode

from partialfc.kernels import margin_softmax_ref, margin_softmax_stats, resolve_impl
from partialfc.kernels.margin_softmax_ref import (
    margin_softmax_stats_naive,
    margin_softmax_stats_torch,
)

GRAD_ROUNDING = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def numpy_loss_terms(case, margin):
    """Independent float64 (lse, target) with numpy: arccos, explicit piecewise margin."""
    x = case["embeddings"].numpy()
    w = case["weight"].numpy()
    k_sub = case["num_subcenters"]
    kept = case["class_index"].numpy()
    targets = case["target_position"].numpy()
    w_hat = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    rows = (kept[:, None] * k_sub + np.arange(k_sub)[None, :])  # (k, K)
    cos = np.einsum("bd,kjd->bkj", x, w_hat[rows]).max(axis=2)
    logits = margin.scale * cos
    target = np.zeros(len(x))
    for i, pos in enumerate(targets):
        if pos < 0:
            continue
        c = cos[i, pos]
        theta = math.acos(min(max(c, -1 + 1e-7), 1 - 1e-7))
        if margin.m1 == 1.0 and margin.m2 == 0.0:
            psi = c
        elif margin.m1 == 1.0:
            psi = math.cos(theta + margin.m2) if theta + margin.m2 < math.pi else c - margin.m2 * math.sin(margin.m2)
        else:
            angle = margin.m1 * theta + margin.m2
            interval = math.floor(angle / math.pi)
            psi = (-1) ** interval * math.cos(angle) - 2 * interval
        logits[i, pos] = target[i] = margin.scale * (psi - margin.m3)
    top = logits.max(axis=1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return lse, target


@pytest.mark.parametrize("margin_name", sorted(MARGINS))
@pytest.mark.parametrize("num_subcenters", [1, 3])
def test_naive_float64_matches_numpy(margin_name, num_subcenters):
    margin = MARGINS[margin_name]
    case = build_case(batch=37, num_local=60, num_kept=41, dim=16, num_subcenters=num_subcenters, seed=3)
    got = run_impl(margin_softmax_stats_naive, case, margin)
    lse, target = numpy_loss_terms(case, margin)
    np.testing.assert_allclose(got["lse"].numpy(), lse, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got["target"].numpy(), target, rtol=0, atol=1e-10)
    # The steered rows must reach the interesting margin branches.
    owned = case["target_position"] >= 0
    assert (got["target"][owned] / margin.scale).min() < -0.5


@pytest.mark.parametrize("margin_name", ["arcface", "sphereface"])
def test_naive_gradient_matches_numpy_finite_differences(margin_name):
    margin = MARGINS[margin_name]
    case = build_case(batch=5, num_local=9, num_kept=6, dim=8, num_subcenters=3, seed=5)
    got = run_impl(margin_softmax_stats_naive, case, margin)

    def objective(embeddings, weight):
        lse, target = numpy_loss_terms(dict(case, embeddings=embeddings, weight=weight), margin)
        return float((lse * case["grad_lse"].numpy()).sum() + (target * case["grad_target"].numpy()).sum())

    gen = np.random.default_rng(0)
    step = 1e-6
    for name, tensor, grad in (("embeddings", case["embeddings"], got["grad_x"]),
                               ("weight", case["weight"], got["grad_w"])):
        base = tensor.numpy()
        for flat in gen.choice(base.size, size=6, replace=False):
            plus, minus = base.copy(), base.copy()
            plus.flat[flat] += step
            minus.flat[flat] -= step
            args_plus = (plus, case["weight"].numpy()) if name == "embeddings" else (case["embeddings"].numpy(), plus)
            args_minus = (minus, case["weight"].numpy()) if name == "embeddings" else (case["embeddings"].numpy(), minus)
            numeric = (objective(*map(torch.from_numpy, args_plus)) - objective(*map(torch.from_numpy, args_minus))) / (2 * step)
            assert abs(numeric - grad.view(-1)[flat].item()) < 1e-4 * max(1.0, abs(numeric)), (name, flat)


def assert_float64_match(got, want):
    """The float64 row of the tolerance table: stats 1e-12, gradients 1e-10."""
    for key in ("lse", "target"):
        assert_close_scaled(key, got[key], want[key], rtol=1e-12)
    for key in ("grad_x", "grad_w"):
        assert_close_scaled(key, got[key], want[key], rtol=1e-10)


SHAPES = [  # (batch, num_local, num_kept, dim)
    (3, 1, 1, 16),
    (37, 500, 423, 16),
]


@pytest.mark.parametrize("margin_name", sorted(MARGINS))
@pytest.mark.parametrize("num_subcenters", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_path_matches_naive_float64(margin_name, num_subcenters, shape):
    batch, num_local, num_kept, dim = shape
    margin = MARGINS[margin_name]
    case = build_case(batch, num_local, num_kept, dim, num_subcenters, seed=batch + num_kept)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(margin_softmax_stats_torch, case, margin, chunk_size=100)
    assert_float64_match(got, want)


@pytest.mark.parametrize("dtype,weight_dtype", [
    (torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float16, torch.float32),
])
@pytest.mark.parametrize("margin_name", ["arcface", "combined"])
def test_torch_and_naive_low_precision(dtype, weight_dtype, margin_name):
    margin = MARGINS[margin_name]
    case = build_case(batch=37, num_local=300, num_kept=211, dim=24, num_subcenters=3, seed=11)
    want = run_impl(margin_softmax_stats_naive, rounded_case(case, dtype, weight_dtype), margin)
    for fn in (margin_softmax_stats_torch, margin_softmax_stats_naive):
        got = run_impl(fn, case, margin, dtype=dtype, weight_dtype=weight_dtype)
        assert got["out_dtype"] == torch.float32
        assert got["raw_grad_x"].dtype == dtype
        assert got["raw_grad_w"].dtype == (weight_dtype or dtype)
        for key in ("lse", "target"):
            assert_close_scaled(key, got[key], want[key], rtol=2e-6)
        assert_close_scaled("grad_x", got["grad_x"], want["grad_x"], rtol=2e-5 + GRAD_ROUNDING[dtype])
        assert_close_scaled("grad_w", got["grad_w"], want["grad_w"],
                            rtol=2e-5 + GRAD_ROUNDING[weight_dtype or dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_subcenters", [1, 3])
def test_torch_path_half_gemms(monkeypatch, dtype, num_subcenters):
    """The CUDA branch of the chunked path (half GEMM operands, fp32 results and math),
    run on CPU by forcing its operand dtype; mm_fp32_output upcasts exactly here."""
    monkeypatch.setattr(margin_softmax_ref, "_gemm_dtype", lambda embeddings, compute: embeddings.dtype)
    margin = MARGINS["combined"]
    case = rounded_case(build_case(batch=19, num_local=60, num_kept=41, dim=24, num_subcenters=num_subcenters,
                                   seed=13), dtype)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(margin_softmax_stats_torch, case, margin, dtype=dtype, weight_dtype=torch.float32, chunk_size=6)
    for key in ("lse", "target"):
        assert_close_scaled(key, got[key], want[key], rtol=2e-6)
    # d loss / d dot is rounded to the GEMM dtype before dX and dW, as on CUDA.
    for key in ("grad_x", "grad_w"):
        assert_close_scaled(key, got[key], want[key], rtol=2e-5 + GRAD_ROUNDING[dtype])
    assert got["raw_grad_x"].dtype == dtype and got["raw_grad_w"].dtype == torch.float32


def test_gemm_operands_stay_fp32_on_cpu():
    half = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert margin_softmax_ref._gemm_dtype(half, torch.float32) == torch.float32
    assert margin_softmax_ref.fp32_output_gemm(torch.bfloat16, "cpu")
    product = margin_softmax_ref.mm_fp32_output(half + 1, half + 1)
    assert product.dtype == torch.float32 and torch.all(product == 2)


def test_torch_path_one_wide_case_d512():
    margin = MARGINS["arcface"]
    case = build_case(batch=37, num_local=40, num_kept=33, dim=512, num_subcenters=1, seed=2)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(margin_softmax_stats_torch, case, margin, dtype=torch.float32, chunk_size=8)
    for key in ("lse", "target"):
        assert_close_scaled(key, got[key], want[key], rtol=2e-6)
    for key in ("grad_x", "grad_w"):
        assert_close_scaled(key, got[key], want[key], rtol=2e-5)


@pytest.mark.parametrize("chunk_size,num_kept", [(1, 23), (7, 423), (423, 423), (10_000, 423)])
def test_torch_path_chunk_size_does_not_change_result(chunk_size, num_kept):
    margin = MARGINS["sphereface"]
    case = build_case(batch=11, num_local=500, num_kept=num_kept, dim=16, num_subcenters=3, seed=7)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(margin_softmax_stats_torch, case, margin, chunk_size=chunk_size)
    for key in ("lse", "target", "grad_x", "grad_w"):
        assert_close_scaled(key, got[key], want[key], rtol=1e-10)


def test_all_targets_off_rank_and_single_output_backward():
    margin = MARGINS["arcface"]
    case = build_case(batch=9, num_local=30, num_kept=20, dim=16, num_subcenters=3, all_off_rank=True)
    for fn in (margin_softmax_stats_torch, margin_softmax_stats_naive):
        embeddings = case["embeddings"].clone().requires_grad_(True)
        weight = case["weight"].clone().requires_grad_(True)
        lse, target = fn(embeddings, weight, case["class_index"], case["target_position"], 3, margin)
        assert torch.all(target == 0)
        lse.sum().backward()  # grad of target is None in backward
        # Off-rank only: d sum(lse) / d x = scale * softmax-weighted sum of argmax centers.
        rows = case["class_index"][:, None] * 3 + torch.arange(3)
        centers = torch.nn.functional.normalize(case["weight"], dim=1)[rows]  # (k, K, D)
        cos = torch.einsum("bd,kjd->bkj", case["embeddings"], centers)
        best = cos.argmax(dim=2)
        prob = torch.softmax(margin.scale * cos.amax(dim=2), dim=1)
        chosen = centers[torch.arange(len(rows))[None, :], best]  # (B, k, D)
        expected = margin.scale * torch.einsum("bk,bkd->bd", prob, chosen)
        assert_close_scaled("grad_x", embeddings.grad, expected, rtol=1e-10)


@pytest.mark.parametrize("num_subcenters", [1, 3])
def test_torch_path_embedding_gradient_alone(num_subcenters):
    # A frozen center shard: backward skips the weight side entirely; dX must not change.
    margin = MARGINS["arcface"]
    case = build_case(batch=9, num_local=40, num_kept=30, dim=16, num_subcenters=num_subcenters, seed=6)
    grads = []
    for fn, kwargs in ((margin_softmax_stats_torch, {"chunk_size": 7}), (margin_softmax_stats_naive, {})):
        embeddings = case["embeddings"].clone().requires_grad_(True)
        lse, target = fn(embeddings, case["weight"], case["class_index"], case["target_position"],
                         num_subcenters, margin, **kwargs)
        torch.autograd.backward([lse, target], [case["grad_lse"], case["grad_target"]])
        grads.append(embeddings.grad)
    assert_close_scaled("grad_x", grads[0], grads[1], rtol=1e-10)


def test_sparse_gradient_layout():
    margin = MARGINS["combined"]
    case = build_case(batch=6, num_local=50, num_kept=17, dim=16, num_subcenters=3)
    for fn in (margin_softmax_stats_torch, margin_softmax_stats_naive):
        got = run_impl(fn, case, margin, dtype=torch.float32)
        grad = got["raw_grad_w"]
        assert grad.layout == torch.sparse_coo and grad.shape == case["weight"].shape
        grad = grad.coalesce()
        expected_rows = (case["class_index"][:, None] * 3 + torch.arange(3)).reshape(-1)
        assert torch.equal(grad.indices()[0], expected_rows)
        assert grad.values().shape == (17 * 3, 16) and grad.values().dtype == torch.float32
        assert got["raw_grad_x"].layout == torch.strided


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor) and item.layout == torch.strided:
                self.largest = max(self.largest, item.numel())
        return out


def test_torch_path_never_builds_a_batch_by_classes_buffer():
    margin = MARGINS["arcface"]
    batch, num_kept, dim, chunk = 64, 200, 4, 32
    case = build_case(batch, 250, num_kept, dim, num_subcenters=1)
    embeddings = case["embeddings"].float().requires_grad_(True)
    weight = case["weight"].float().requires_grad_(True)
    for fn, should_fit in ((margin_softmax_stats_torch, True), (margin_softmax_stats_naive, False)):
        with _LargestAllocation() as probe:
            lse, target = fn(embeddings, weight, case["class_index"], case["target_position"], 1, margin,
                             chunk_size=chunk)
            (lse.sum() + target.sum()).backward()
        # The weight-gradient rows (k x D = 800) are allowed; a B x k buffer (12800) is not.
        assert (probe.largest < batch * num_kept // 4) == should_fit, (fn.__name__, probe.largest)


def _largest_temporary(fn, case, num_subcenters, chunk_size=None):
    embeddings = case["embeddings"].float().requires_grad_(True)
    weight = case["weight"].float().requires_grad_(True)
    with _LargestAllocation() as probe:
        lse, target = fn(embeddings, weight, case["class_index"], case["target_position"], num_subcenters,
                         MARGINS["arcface"], chunk_size=chunk_size)
        (lse.sum() + target.sum()).backward()
    return probe.largest


def test_default_tile_bounds_center_rows_so_k3_needs_no_more_memory_than_k1(monkeypatch):
    # A tile's temporaries are B x (classes x K) buffers: a default tile counted in classes
    # would make them K times larger. With the default counted in rows they match.
    monkeypatch.setattr(margin_softmax_ref, "DEFAULT_TILE_ROWS", 96)
    batch, num_kept, dim = 64, 200, 4
    largest = {}
    for num_subcenters in (1, 3):
        case = build_case(batch, 250, num_kept, dim, num_subcenters, seed=4)
        largest[num_subcenters] = _largest_temporary(margin_softmax_stats_torch, case, num_subcenters)
    # B x 96 rows = 6144 elements per buffer; weight-gradient rows are 200 x 3 x 4 = 2400.
    assert largest[1] == batch * 96, largest
    assert largest[3] <= 1.1 * largest[1], largest
    # An explicit chunk_size still counts classes: 32 classes x 3 sub-centers = 96 rows.
    assert _largest_temporary(margin_softmax_stats_torch, case, 3, chunk_size=32) == batch * 96


@pytest.mark.parametrize("num_subcenters", [1, 3])
@pytest.mark.parametrize("first_class", [0, 13])
def test_torch_path_contiguous_classes_use_weight_views(num_subcenters, first_class):
    # r = 1 keeps a contiguous run of classes: tiles then read W through slice views
    # instead of a gather. Same numbers as naive, on several tiles with a partial last one.
    margin = MARGINS["combined"]
    num_kept = 50
    case = build_case(batch=19, num_local=first_class + num_kept + 4, num_kept=num_kept, dim=16,
                      num_subcenters=num_subcenters, seed=first_class + num_subcenters)
    case["class_index"] = torch.arange(first_class, first_class + num_kept)
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(margin_softmax_stats_torch, case, margin, chunk_size=16)
    assert_float64_match(got, want)


def test_bad_inputs_name_the_argument():
    margin = MARGINS["arcface"]
    x = torch.randn(4, 8)
    w = torch.randn(12, 8)
    index = torch.tensor([0, 2, 5])
    pos = torch.tensor([0, -1, 2, 1])
    with pytest.raises(TypeError, match="class_index"):
        margin_softmax_stats_torch(x, w, index.int(), pos, 2, margin)
    with pytest.raises(ValueError, match="target_position"):
        margin_softmax_stats_torch(x, w, index, torch.tensor([0, 3, 0, 0]), 2, margin)
    with pytest.raises(ValueError, match="class_index"):
        margin_softmax_stats_torch(x, w, torch.tensor([2, 0, 5]), pos, 2, margin)
    with pytest.raises(ValueError, match="class_index"):
        margin_softmax_stats_naive(x, w, torch.tensor([0, 2, 6]), pos, 2, margin)
    with pytest.raises(ValueError, match="num_subcenters"):
        margin_softmax_stats_torch(x, w, index, pos, 5, margin)
    with pytest.raises(ValueError, match="width"):
        margin_softmax_stats_torch(torch.randn(4, 7), w, index, pos, 2, margin)
    with pytest.raises(ValueError, match="chunk_size"):
        margin_softmax_stats_torch(x, w, index, pos, 2, margin, chunk_size=0)
    with pytest.raises(TypeError, match="margin"):
        margin_softmax_stats_torch(x, w, index, pos, 2, margin=0.5)
    with pytest.raises(ValueError, match="impl"):
        margin_softmax_stats(x, w, index, pos, 2, margin, impl="cuda")


def test_dispatch_auto_uses_torch_on_cpu():
    weight = torch.randn(4, 8)
    assert resolve_impl("auto", weight) == "torch"
    case = build_case(batch=5, num_local=8, num_kept=5, dim=8, num_subcenters=1)
    margin = MARGINS["cosface"]
    want = run_impl(margin_softmax_stats_naive, case, margin)
    got = run_impl(lambda *a: margin_softmax_stats(*a, impl="auto", chunk_size=2), case, margin)
    assert_close_scaled("lse", got["lse"], want["lse"], rtol=1e-12)
    assert_close_scaled("grad_w", got["grad_w"], want["grad_w"], rtol=1e-10)
