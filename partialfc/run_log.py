"""Where a run's log lines go: every rank's console, and ``OUTPUT/train.log`` on rank 0.

The console is what torchrun or SLURM captures, often per node and per job, so it
scatters across requeues; ``train.log`` stays in the run directory and is appended to
by every start of the same run (each start writes a marker line), so one file tells
the whole story of a run. Only rank 0 writes it: the ranks of a multi-node job share
the directory, and concurrent appends from many hosts to one file on a network file
system interleave or get lost. Other ranks' warnings and errors stay on their console.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

LOG_FILE_NAME = "train.log"
_FILE_ONLY = logging.getLogger("partialfc.log_file")
_FILE_ONLY.propagate = False  # lines for the file alone (the error already printed on the console)
_handler: Optional[logging.Handler] = None


def _formatter(rank: int, date_format: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", datefmt=date_format)


def configure_console(rank: int) -> None:
    """INFO lines from rank 0, warnings and errors from every rank, on stderr."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"%(asctime)s [rank {rank}] "
                        "%(message)s", datefmt="%H:%M:%S")


def attach_log_file(output: str | os.PathLike, rank: int) -> Path:
    """Append this process's log records to ``output/train.log`` from now on, after a start marker."""
    global _handler
    detach_log_file()
    path = Path(output) / LOG_FILE_NAME
    _handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    _handler.setFormatter(_formatter(rank, "%Y-%m-%d %H:%M:%S"))  # a file outlives a day
    logging.getLogger().addHandler(_handler)
    _FILE_ONLY.addHandler(_handler)
    _FILE_ONLY.setLevel(logging.INFO)
    command = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else "?"
    _FILE_ONLY.info("==== start (pid %d): %s", os.getpid(), command)
    return path


def log_to_file_only(line: str) -> None:
    """Put ``line`` in train.log (if one is open) without printing it again."""
    if _handler is not None:
        _FILE_ONLY.error(line)


def detach_log_file() -> None:
    global _handler
    if _handler is None:
        return
    logging.getLogger().removeHandler(_handler)
    _FILE_ONLY.removeHandler(_handler)
    _handler.close()
    _handler = None
