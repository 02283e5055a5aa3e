"""Process-group set-up from the torchrun environment, and device choice.

Nothing happens at import: ``init_runtime`` is called by the entrypoint only. Under
``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set) it initializes the default
group -- nccl on CUDA, gloo on CPU unless overridden; without it, one process runs
with no group and every collective in the package is the identity.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _choose_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if device != "cpu":
        raise ValueError(f"train.device must be auto, cuda or cpu, got {device!r}")
    return torch.device("cpu")


def init_runtime(device: str = "auto", backend: str = "auto", timeout_minutes: float = 30.0,
                 require_group: bool = False) -> Runtime:
    """Device and process group from torchrun's environment (one process without it).

    A single process normally runs without a process group; ``require_group`` gives it
    a group of one (DeepSpeed cannot run without one), rendezvoused in memory, so
    ``python -m partialfc.train`` works without torchrun either way.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _choose_device(device, local_rank)
    if world_size == 1 and not require_group:
        return Runtime(0, 0, 1, chosen, None)
    if backend == "auto":
        backend = "nccl" if chosen.type == "cuda" else "gloo"
    if backend == "nccl" and chosen.type != "cuda":
        raise ValueError("train.backend = 'nccl' needs CUDA devices; use gloo on CPU")
    if world_size == 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=chosen if chosen.type == "cuda" else None)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend=backend, timeout=timeout, device_id=chosen if chosen.type == "cuda" else None,
            **_restart_scoped_store(rank, world_size, timeout),
        )
    return Runtime(dist.get_rank(), local_rank, dist.get_world_size(), chosen, backend)


def _restart_scoped_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun's agent store, keys of a restarted worker group must not meet the
    keys of the group that died: gloo would find the dead ranks' addresses and fail to
    connect (seen as 'connectFullMesh ... Connection refused' after --max-restarts). A
    prefix per restart count keeps every generation's rendezvous apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"partialfc/restart{restart}", store), "rank": rank,
            "world_size": world_size}


def shutdown_runtime() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
