"""Per-rank batch sizes for the head's all-gather, communicated only when they can differ.

``all_gather`` needs equal shapes, so the head's gather first all-gathers every
rank's batch size and reads it on the host (``.tolist()``): a collective plus a host
sync, every step. In training the sizes cannot differ: every ``BatchSource`` yields
exactly ``data.batch_size`` samples per rank per step (``drop_last``; corrupt
samples are replaced, not dropped), and the trainer splits that into
``train.accumulate`` equal micro-batches. Callers that know the size pass it as
``expected_size``: nothing is communicated and nothing is read back. Callers that do
not (tools, tests with uneven batches) keep the gather.

A rank whose batch breaks the promise raises here instead of entering a collective
with a shape the others do not expect (which would fail later and less clearly, or
hang). The other ranks then block in their next collective until the process-group
timeout or until the launcher tears the job down -- the same outcome as any rank's
exception mid-step, and only on a contract violation.
"""
from __future__ import annotations

from typing import Optional

import torch

from partialfc.distributed import collectives


def batch_sizes(local_size: int, device: torch.device, group=None, expected_size: Optional[int] = None) -> list:
    """Every rank's batch size, in rank order (host ints).

    With ``expected_size`` (the size every rank was promised), check this rank's
    size against it and return ``[expected_size] * world_size``: no collective, no
    host sync. Without it, all-gather the sizes (one tiny collective and one host
    sync).
    """
    world = collectives.world_size(group)
    if expected_size is not None:
        if local_size != expected_size:
            raise ValueError(f"rank {collectives.rank(group)} holds a batch of {local_size} rows where every rank "
                             f"was promised {expected_size} (data.batch_size / train.accumulate)")
        return [expected_size] * world
    if not collectives.is_distributed(group):
        return [local_size]
    local = torch.tensor([local_size], device=device)
    return collectives.all_gather_no_grad(local, group).tolist()  # host sync: sizes may differ


__all__ = ["batch_sizes"]
