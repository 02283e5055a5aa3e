"""Build the run's objects from the config: margin, head, backbone arguments.

Kept apart from ``trainer.py`` (the order of events) so tools, tests and benchmarks
build the same head as a training run without the step loop.
"""
from __future__ import annotations

from pathlib import Path

import torch

from partialfc.config import Config
from partialfc.head import CombinedMargin, PartialFC


def build_margin(head_cfg) -> CombinedMargin:
    overrides = {k: getattr(head_cfg, k) for k in ("scale", "m1", "m2", "m3") if getattr(head_cfg, k) is not None}
    return CombinedMargin.preset(head_cfg.margin, **overrides)


def backbone_kwargs(cfg: Config) -> dict:
    return {
        "embedding_size": cfg.model.embedding_size,
        "dropout": cfg.model.dropout,
        "amp_dtype": None if cfg.train.amp == "none" else cfg.train.amp,
    }


HEAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def head_compute_dtype(compute_dtype: str, amp: str, device_type: str) -> torch.dtype:
    """head.compute_dtype as a torch dtype; "auto" is bf16 on CUDA with bf16 amp, else fp32.

    With bf16 amp the backbone's embeddings are bf16 already, so the head's GEMMs lose
    nothing more by taking them so (tensor cores, half the all-gather). Not fp16 with fp16
    amp: the head's backward is not loss-scaled (the GradScaler scales the backbone's
    gradient only), and its softmax gradient entries, about scale * p / batch, fall below
    fp16's smallest normals at large class counts. On CPU half GEMMs are slower than fp32
    ones, so auto stays fp32 there. An explicit bf16/fp16 is taken as asked.
    """
    if compute_dtype != "auto":
        return HEAD_DTYPES[compute_dtype]
    return torch.bfloat16 if device_type == "cuda" and amp == "bf16" else torch.float32


def build_head(cfg: Config, num_classes: int, process_group=None, device_type: str = "cpu") -> PartialFC:
    return PartialFC(
        build_margin(cfg.head), cfg.model.embedding_size, num_classes,
        sample_rate=cfg.head.sample_rate, num_subcenters=cfg.head.num_subcenters,
        process_group=process_group, impl=cfg.head.impl, chunk_size=cfg.head.chunk_size, seed=cfg.train.seed,
        compute_dtype=head_compute_dtype(cfg.head.compute_dtype, cfg.train.amp, device_type),
        intra_weight=cfg.head.intra_weight, inter_weight=cfg.head.inter_weight,
        triplet_weight=cfg.head.triplet_weight, triplet_margin=cfg.head.triplet_margin,
    )


def check_output_dir(output: Path) -> None:
    """``train.output`` must be a directory or creatable as one: said before anything is built or written."""
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == output else f"is under {str(path)!r}, which is a file"
                raise ValueError(f"train.output = {str(output)!r} {where}; choose a directory")
            return
