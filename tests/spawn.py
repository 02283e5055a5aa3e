"""Run a function on W gloo ranks in fresh processes and collect what each returns.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initializes a
gloo group on a free localhost port, calls ``fn(rank, world_size, *args)`` on each
and returns the list of results in rank order. A failure on any rank re-raises in the
test with that rank's traceback; ranks still running after ``timeout`` seconds are
killed and the test fails. ``fn`` must be importable (module level).
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        result["value"] = fn(rank, world_size, *args)
    except BaseException:  # report every failure to the parent
        result["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()
        # The result is on disk: leave without interpreter finalization, which can abort a
        # process that just ran collectives (see partialfc.distributed.runtime.exit_process).
        os._exit(0)


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0):
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:  # a hung rank must fail the test, not hang it
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise AssertionError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks did not finish "
                                     f"within {timeout:.0f} s")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                result = pickle.load(f)  # written by our own child processes
            if "error" in result:
                raise AssertionError(f"rank {rank} failed:\n{result['error']}")
            results.append(result["value"])
        return results
