"""How ``margin_softmax.py`` picks its tiles and class splits (plain Python, no kernels).

Kept apart from the kernels because it is policy, not math: which tiles the CUDA
autotuner may try for a given width D and sub-center count K, how many class splits keep
the GPU busy, and the tiny fixed tiles of the CPU interpreter. Everything here is
checked on CPU (``tests/kernels/test_margin_softmax_triton.py``); the register budgets
were calibrated by compiling the kernels for sm_90 / sm_80 with ptxas, which needs no GPU
(``python benchmarks/kernel.py --compile-check sm_90 --dim 512 --subcenters 1 3``).

A tile is ``BLOCK_B`` embedding rows x ``BLOCK_R`` center rows (``BLOCK_R // K_PAD``
classes), with dots tiled over ``BLOCK_D`` columns of the embedding width.
"""
from __future__ import annotations

__all__ = [
    "DW_CANDIDATES",
    "DX_CANDIDATES",
    "DX_PARTIAL_BYTES",
    "EXPLICIT_CHUNK_BLOCKS",
    "FORWARD_CANDIDATES",
    "INTERPRET_BLOCKS",
    "prune_configs",
    "split_plan",
]

# (BLOCK_B, BLOCK_R, BLOCK_D, num_warps, num_stages) candidates for CUDA; autotune times the
# ones prune_configs keeps for the actual D and K. Large tiles only survive for small D.
FORWARD_CANDIDATES = [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 4, 4),
                      (128, 128, 32, 8, 3)]
DX_CANDIDATES = [(64, 64, 64, 8, 2), (32, 64, 64, 8, 2), (32, 32, 64, 8, 2), (16, 32, 64, 4, 2)]
DW_CANDIDATES = [(64, 64, 64, 8, 2), (64, 32, 64, 8, 2), (32, 32, 64, 8, 2), (32, 16, 64, 4, 2)]
# Tiles for an explicit chunk_size on CUDA (BLOCK_R = chunk_size * K_PAD); fits D <= 512.
EXPLICIT_CHUNK_BLOCKS = dict(BLOCK_B=32, BLOCK_D=64)
# Interpreter tiles: small, so tests with a few dozen classes still cross many tiles,
# several splits and partial blocks in every dimension.
INTERPRET_BLOCKS = dict(BLOCK_B=16, BLOCK_R=16, BLOCK_D=16)
# Cap of the backward's per-split dX partials (splits x B x D fp32); fewer splits beyond it.
# At batch 1024 x D 512 that is 32 splits (64 MiB), against ~6 GiB of weights, gradient
# rows and momentum at a million classes.
DX_PARTIAL_BYTES = 64 * 2**20

# Values per thread a config may hold in registers: the [BLOCK_B, BLOCK_R] logit tile (the
# backward keeps several live copies of it: probabilities, masks, routed gradient), the
# D-blocked operands, and (backward) a full-width fp32 accumulator and the full-width
# operand of its update. With D = 128 and 512, K = 1 and 3, bf16, configs within these
# bounds compiled for sm_90 without register spills (at most 24 bytes); those beyond
# spilled hundreds of bytes.
_TILE_VALUES = {"none": 32, "dx": 8, "dw": 8}
_OPERAND_VALUES = 32
_FULL_WIDTH_VALUES = 64


def prune_configs(configs, named_args, full_width, **constexprs):
    """Candidates whose register estimate fits at this D and K; never empty.

    The signature is triton.autotune's ``early_config_prune`` (plus ``full_width``, bound
    by the caller), which passes the launch's constexprs (``D_PAD``, ``K_PAD``) as keywords.
    ``full_width`` names the kernel's full-width (``D_PAD``) blocks: "dx" (a [BLOCK_B, D]
    accumulator updated from [BLOCK_R, D] rows of W), "dw" (a [BLOCK_R, D] accumulator
    updated from [BLOCK_B, D] rows of X) or "none" (forward).
    """
    d_pad, k_pad = constexprs["D_PAD"], constexprs["K_PAD"]
    kept = []
    for config in configs:
        block_b, block_r, block_d = (config.kwargs[k] for k in ("BLOCK_B", "BLOCK_R", "BLOCK_D"))
        threads = 32 * config.num_warps
        accumulator, operand = {"dx": (block_b, block_r), "dw": (block_r, block_b), "none": (0, 0)}[full_width]
        fits = (block_r >= k_pad and block_d <= d_pad
                and block_b * block_r <= _TILE_VALUES[full_width] * threads
                and (block_b + block_r) * block_d <= _OPERAND_VALUES * threads
                and max(accumulator, operand) * d_pad <= _FULL_WIDTH_VALUES * threads)
        if fits:
            kept.append(config)
    if kept:
        return kept
    import triton  # only reached through triton.autotune, so triton is installed

    # Nothing fits (very wide D or many sub-centers): the smallest tile, which may spill.
    return [triton.Config(dict(BLOCK_B=16, BLOCK_R=max(16, k_pad), BLOCK_D=min(32, d_pad)),
                          num_warps=4, num_stages=2)]


def split_plan(batch, num_kept, dim, target_programs, nominal_block_b, min_classes_per_split):
    """(splits, classes_per_split): enough (row block, split) programs to fill the device.

    Splits are contiguous class ranges independent of the tile size (autotune may pick
    any tile; a tile crossing a split's end is masked), never empty, at least
    ``min_classes_per_split`` classes where possible, and capped so the dX partials stay
    within ``DX_PARTIAL_BYTES``.
    """
    row_blocks = -(-batch // nominal_block_b)
    splits = min(-(-num_kept // min_classes_per_split), -(-target_programs // row_blocks),
                 DX_PARTIAL_BYTES // max(1, batch * dim * 4))
    classes_per_split = max(1, -(-num_kept // max(1, splits)))
    return max(1, -(-num_kept // classes_per_split)), classes_per_split
