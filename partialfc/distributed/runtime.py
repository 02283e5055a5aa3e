"""Process-group set-up from the torchrun environment, and device choice.

Nothing happens at import: ``init_runtime`` is called by the entrypoint only. Under
``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set) it initializes the default
group -- nccl on CUDA, gloo on CPU unless overridden; without it, one process runs
with no group and every collective in the package is the identity.

Timeouts: start-up (rendezvous, building the model and data, the first step) is
allowed ``timeout_minutes`` -- ranks legitimately drift apart there (imports, index
scans, NCCL communicator set-up). With ``collective_timeout`` given (the trainer),
the first heartbeat shortens the group's timeout to it, and a ``PeerSupervisor``
(``supervision.py``) names the rank a failed collective waited for.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from partialfc.distributed.supervision import PeerSupervisor

DEFAULT_COLLECTIVE_TIMEOUT_MINUTES = {"cuda": 10.0, "cpu": 5.0}
"""``train.collective_timeout = 0``: long enough for a checkpoint write or an evaluation
on rank 0 while the others wait; short enough that a stalled job ends within minutes."""
STARTUP_TIMEOUT_MINUTES = 10.0
"""Rendezvous, building and the first step (at least the collective timeout)."""
NCCL_WATCHDOG_MARGIN_MINUTES = 1.0
"""NCCL's own timeout is this much later than ours, so the supervisor's watch thread
reports the stalled rank before the NCCL watchdog tears the process down."""


def _inactive_supervisor() -> PeerSupervisor:
    return PeerSupervisor(None, 0, 1, 1.0)


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    supervisor: PeerSupervisor = field(default_factory=_inactive_supervisor, compare=False, repr=False)

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


def resolve_collective_timeout(minutes: float, device: torch.device) -> float:
    """``train.collective_timeout`` in minutes; 0 picks the device's default."""
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0:
        raise ValueError(f"train.collective_timeout must be a number of minutes >= 0, got {minutes!r}")
    return float(minutes) or DEFAULT_COLLECTIVE_TIMEOUT_MINUTES[device.type]


def init_runtime(device: str = "auto", backend: str = "auto", timeout_minutes: float = 30.0,
                 require_group: bool = False, collective_timeout: float | None = None) -> Runtime:
    """Device and process group from torchrun's environment (one process without it).

    A single process normally runs without a process group; ``require_group`` gives it
    a group of one (DeepSpeed cannot run without one), rendezvoused in memory, so
    ``python -m partialfc.train`` works without torchrun either way.

    ``timeout_minutes`` bounds start-up; ``collective_timeout`` (minutes, 0: the
    device's default; None: no supervision) every collective after the first step.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _choose_device(device, local_rank)
    collective_minutes = None if collective_timeout is None else resolve_collective_timeout(collective_timeout, chosen)
    if world_size == 1 and not require_group:
        return Runtime(0, 0, 1, chosen, None)
    if backend == "auto":
        backend = "nccl" if chosen.type == "cuda" else "gloo"
    if backend == "nccl" and chosen.type != "cuda":
        raise ValueError("train.backend = 'nccl' needs CUDA devices; use gloo on CPU")
    if world_size == 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=chosen if chosen.type == "cuda" else None)
    startup_minutes = max(timeout_minutes, collective_minutes or 0.0)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=startup_minutes)
        dist.init_process_group(
            backend=backend, timeout=timeout, device_id=chosen if chosen.type == "cuda" else None,
            **_restart_scoped_store(rank, world_size, timeout),
        )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    supervisor = _inactive_supervisor()
    if collective_minutes is not None and world_size > 1:
        supervisor = _build_supervisor(rank, world_size, backend, collective_minutes)
    return Runtime(rank, local_rank, world_size, chosen, backend, supervisor)


def _build_supervisor(rank: int, world_size: int, backend: str, minutes: float) -> PeerSupervisor:
    """Heartbeats in the rendezvous store (a client of its own: the group's stays untouched).

    With NCCL the group's timeout is set a margin past ours and a watch thread reports
    (see supervision.py); gloo raises a timed-out collective in the main thread.
    """
    group_minutes = minutes + (NCCL_WATCHDOG_MARGIN_MINUTES if backend == "nccl" else 0.0)

    def arm() -> None:
        # Private but stable since torch 2.2 (torchtitan shortens its timeout after the
        # first step the same way); without it the start-up timeout stays in force.
        try:
            from torch.distributed.distributed_c10d import _set_pg_timeout
        except ImportError:
            return
        _set_pg_timeout(datetime.timedelta(minutes=group_minutes))

    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    store = None
    if address and port:
        store = dist.TCPStore(address, int(port), world_size, is_master=False,
                              timeout=datetime.timedelta(minutes=minutes))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return PeerSupervisor(store, rank, world_size, minutes, prefix=f"partialfc/restart{restart}/supervision",
                          on_arm=arm, watch=backend == "nccl")


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


def shutdown_runtime(runtime: Runtime | None = None, abandon: bool = False) -> None:
    """Destroy the group; ``abandon`` after a failed collective only lets the process exit
    (tearing down a group whose peer is gone can block, NCCL's especially)."""
    if runtime is not None:
        runtime.supervisor.close()
    if not abandon and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that ran collectives, skipping the interpreter's finalization.

    gloo's worker threads drop each finished collective's tensors themselves; when that
    drop is the last reference to a tensor with a Python object, it needs the GIL. If the
    interpreter is finalizing by then, the thread is torn down inside a C++ destructor
    and the process aborts ("terminate called without an active exception", exit -6):
    seen at the end of about 1 run in 12 of the 2-rank demo, after the run had finished
    and checkpointed. A last barrier before ``destroy_process_group`` only narrowed that
    window (gloo runs two worker threads), and the group's C++ object outlives
    ``destroy_process_group``. Everything worth keeping is written and flushed by then,
    so the entrypoints flush and leave with ``os._exit``.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
