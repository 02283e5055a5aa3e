"""Fused ops for the Partial FC head (installed as ``partialfc.kernels``).

``margin_softmax_stats`` is the entry point the head calls; it picks one of four
implementations with the same signature and semantics:

* ``gemm``   - class chunks on library GEMMs (cuBLAS tensor cores on CUDA) with one fused
  Triton elementwise pass per chunk (``margin_softmax_gemm.py``);
* ``triton`` - fully fused Triton kernels (``margin_softmax.py``);
* ``torch``  - class-chunked online softmax in torch (``margin_softmax_ref.py``), the CPU path;
* ``naive``  - full logits with plain autograd, the baseline and test reference.

``auto`` picks by ``AUTO_TABLE`` (device, embedding dtype, kept center rows), whose rows
each name the measurement behind them.

Importing this package imports triton only if it is installed; no kernel is compiled
until first use.
"""
from __future__ import annotations

from .margin_softmax import margin_softmax_stats_triton, triton_available
from .margin_softmax_gemm import margin_softmax_stats_gemm
from .margin_softmax_ref import margin_softmax_stats_naive, margin_softmax_stats_torch

__all__ = [
    "AUTO_TABLE",
    "IMPLS",
    "margin_softmax_stats",
    "margin_softmax_stats_gemm",
    "margin_softmax_stats_naive",
    "margin_softmax_stats_torch",
    "margin_softmax_stats_triton",
    "resolve_impl",
    "triton_available",
]

IMPLS = ("auto", "gemm", "triton", "torch", "naive")
_BY_NAME = {
    "gemm": margin_softmax_stats_gemm,
    "triton": margin_softmax_stats_triton,
    "torch": margin_softmax_stats_torch,
    "naive": margin_softmax_stats_naive,
}

# What ``auto`` runs where Triton is importable; the first matching row wins, and
# anything unmatched (CPU, or no triton) runs ``torch``. A row is
# (device type, embedding dtypes, least kept center rows, impl, evidence). Rows must
# rest on measurements: benchmarks/gpu/run_all.sh writes the fastest impl per shape of
# its run (summary.md) to refill this table from a GPU.
AUTO_TABLE = (
    ("cuda", ("bfloat16", "float16"), 0, "triton",
     "issue 15, one H200, B 1024, D 512, bf16: triton is correct there (fwd+bwd 9.8 ms at n 1e5, "
     "93 ms at n 1e6, K 1) and faster than chunked torch; gemm has not run on a GPU yet (a chunked "
     "prototype of its design with unfused torch ops took 57-68 ms at n 1e6): switch this row to "
     "gemm once benchmarks/gpu/run_all.sh shows it winning"),
    ("cuda", ("float32",), 0, "triton", "the default before issue 15; fp32 on CUDA not compared yet"),
)


def resolve_impl(impl: str, weight, embeddings_dtype=None, kept_center_rows: int = 0) -> str:
    """Concrete implementation name for ``impl``: ``auto`` looks it up in AUTO_TABLE.

    ``embeddings_dtype`` defaults to the weight's dtype; ``kept_center_rows`` is
    ``class_index.numel() * K`` (a shape, so no host sync).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if not triton_available():
        return "torch"
    # getattr: a non-tensor argument falls through to torch, whose validation names it.
    weight_device = getattr(getattr(weight, "device", None), "type", None)
    dtype = str(embeddings_dtype or getattr(weight, "dtype", "")).removeprefix("torch.")
    for device_type, dtypes, least_rows, name, _evidence in AUTO_TABLE:
        if weight_device == device_type and dtype in dtypes and kept_center_rows >= least_rows:
            return name
    return "torch"


def margin_softmax_stats(
    embeddings, weight, class_index, target_position, num_subcenters, margin, impl="auto", chunk_size=None
):
    """Per-row ``(lse, target_logit)`` over the kept classes; see ``margin_softmax_ref``.

    ``chunk_size`` counts classes per tile. ``None`` lets each implementation choose: the
    torch path bounds center rows (``DEFAULT_TILE_ROWS``, so K = 3 tiles hold a third of
    the classes), the gemm path bounds the bytes of its B x chunk buffers
    (``margin_softmax_gemm.TILE_BYTES``), the Triton path autotunes on CUDA.
    """
    # A wrong argument type must reach the implementation's validation and its message.
    known = hasattr(class_index, "numel") and isinstance(num_subcenters, int)
    kept = class_index.numel() * num_subcenters if known else 0
    fn = _BY_NAME[resolve_impl(impl, weight, getattr(embeddings, "dtype", None), kept)]
    if chunk_size is None:
        return fn(embeddings, weight, class_index, target_position, num_subcenters, margin)
    return fn(embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size=chunk_size)
