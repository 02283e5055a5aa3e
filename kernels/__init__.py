"""Fused ops for the Partial FC head (installed as ``partialfc.kernels``).

``margin_softmax_stats`` is the entry point the head calls; it picks one of three
implementations with the same signature and semantics:

* ``triton`` - fused Triton kernels (``margin_softmax.py``), the CUDA path;
* ``torch``  - class-chunked online softmax in torch (``margin_softmax_ref.py``), the CPU path;
* ``naive``  - full logits with plain autograd, the baseline and test reference.

Importing this package imports triton only if it is installed; no kernel is compiled
until first use.
"""
from __future__ import annotations

from .margin_softmax import margin_softmax_stats_triton, triton_available
from .margin_softmax_ref import margin_softmax_stats_naive, margin_softmax_stats_torch

__all__ = [
    "IMPLS",
    "margin_softmax_stats",
    "margin_softmax_stats_naive",
    "margin_softmax_stats_torch",
    "margin_softmax_stats_triton",
    "resolve_impl",
    "triton_available",
]

IMPLS = ("auto", "triton", "torch", "naive")
_BY_NAME = {
    "triton": margin_softmax_stats_triton,
    "torch": margin_softmax_stats_torch,
    "naive": margin_softmax_stats_naive,
}


def resolve_impl(impl: str, weight) -> str:
    """Concrete implementation name for ``impl`` (``auto``: triton on CUDA if importable, else torch)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if weight.is_cuda and triton_available() else "torch"
    return impl


def margin_softmax_stats(
    embeddings, weight, class_index, target_position, num_subcenters, margin, impl="auto", chunk_size=None
):
    """Per-row ``(lse, target_logit)`` over the kept classes; see ``margin_softmax_ref``.

    ``chunk_size`` counts classes per tile. ``None`` lets each implementation choose: the
    torch path bounds center rows (``DEFAULT_TILE_ROWS``, so K = 3 tiles hold a third of
    the classes), the Triton path autotunes on CUDA.
    """
    fn = _BY_NAME[resolve_impl(impl, weight)]
    if chunk_size is None:
        return fn(embeddings, weight, class_index, target_position, num_subcenters, margin)
    return fn(embeddings, weight, class_index, target_position, num_subcenters, margin, chunk_size=chunk_size)
