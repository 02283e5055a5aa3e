"""Shared plumbing for the benchmark scripts: provenance, honest peak memory, ranks, tables.

Why a harness: a benchmark number is only worth keeping with the machine, the commit
and the date it was measured on, and a memory number is only honest if it is taken
the same way every time. Each script (``head.py``, ``kernel.py``, ``loader.py``) owns
its measurements; this module owns everything they share:

* ``machine_info`` / ``git_commit`` / ``utc_date`` / ``provenance_lines``: what was run where.
* ``PeakMemory``: peak memory of a phase above a baseline, per process.
  - CPU: the kernel's resident-set high-water mark. Writing ``5`` to
    ``/proc/self/clear_refs`` resets ``VmHWM`` to the current ``VmRSS``; after the phase,
    ``VmHWM - baseline`` is the largest resident set the phase reached. torch's CPU
    allocator keeps no statistics and tracemalloc cannot see its buffers, so the kernel's
    count is the one that cannot be fooled. Where ``clear_refs`` is not writable (some
    containers) we fall back to ``getrusage(RUSAGE_SELF).ru_maxrss``, which cannot be
    reset: it is only meaningful in a fresh process whose earlier peak was below the
    baseline, and the result is flagged as a lower bound.
  - CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* ``run_ranks``: one fresh set of processes per configuration (``torch.multiprocessing``
  spawn, one process per rank), so a configuration inherits no allocator cache or
  high-water mark from the previous one, and an out-of-memory failure is contained.
  On CPU each rank gets an address-space cap (``RLIMIT_AS``) so a configuration that
  does not fit fails with an allocation error instead of waking the OOM killer.
* ``markdown_table`` / ``write_atomic``: the results file.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import pickle
import platform
import resource
import socket
import subprocess
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from partialfc.atomic_io import atomic_output_path, atomic_write_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 tensor-core peak in TFLOP/s from vendor datasheets (no sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}

MIB = 2**20
# torch.optim pulls in torch._dynamo on first optimizer construction: ~10 s of imports.
FORKSERVER_PRELOAD = ("torch", "torch.distributed", "torch._dynamo", "torch.optim", "partialfc", "partialfc.kernels",
                      "partialfc.optim")


# ------------------------------------------------------------------ provenance
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def total_ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def available_ram_gib() -> float:
    """MemAvailable from /proc/meminfo (what can be used without swapping or evicting others)."""
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    return total_ram_gib()


def machine_info() -> dict:
    """uname, core count, RAM, CPU model, torch version and (if any) the GPUs."""
    uname = platform.uname()
    info = {
        "uname": f"{uname.system} {uname.release} {uname.machine}",
        "nproc": os.cpu_count(),
        "ram_gib": round(total_ram_gib(), 1),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpus"] = f"{len(names)} x {names[0]}"
    return info


def module_at_revision(path: str, revision: str, module_name: str):
    """The module ``path`` (repository-relative) as it was at git ``revision``, loaded from
    a temporary copy: a "before" beside the "after" in one benchmark run. The module must
    import nothing of the package that changed since. ValueError if git cannot show it."""
    import importlib.util

    done = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"cannot read {path} at {revision!r}: {done.stderr.strip()}")
    with tempfile.NamedTemporaryFile("w", suffix="_" + os.path.basename(path), delete=False) as handle:
        handle.write(done.stdout)
    try:
        spec = importlib.util.spec_from_file_location(module_name, handle.name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.unlink(handle.name)
    return module


def revision_spec(spec: str, names, versioned: str, path: str) -> str:
    """argparse type body: ``spec`` is one of ``names``, or ``versioned@REV`` with ``path``
    readable at REV; returned with REV as its short hash (HEAD moves, the table keeps what
    was measured)."""
    import argparse

    name, _, revision = spec.partition("@")
    if name not in names or (revision and name != versioned):
        raise argparse.ArgumentTypeError(f"impl must be one of {tuple(names)} or {versioned}@REV, got {spec!r}")
    if not revision:
        return spec
    done = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise argparse.ArgumentTypeError(f"cannot read {path} at {revision!r}: {done.stderr.strip()}")
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=REPO_ROOT,
                            capture_output=True, text=True).stdout.strip()
    return f"{versioned}@{commit or revision}"


def git_commit(repo_dir: str = REPO_ROOT) -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when the tree has uncommitted changes.

    ``PARTIALFC_COMMIT`` overrides it, for a copy of the tree without its ``.git`` (a
    borrowed GPU machine): the caller states what was copied.
    """
    if os.environ.get("PARTIALFC_COMMIT"):
        return os.environ["PARTIALFC_COMMIT"]

    def git(*args):
        done = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if git("status", "--porcelain") else "")


def utc_date() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def provenance_lines(command: str) -> list[str]:
    """Markdown bullet lines: machine, commit, date and the exact command."""
    info = machine_info()
    lines = [
        f"- Machine: {info['cpu']}, {info['nproc']} cores, {info['ram_gib']} GiB RAM; {info['uname']}",
        f"- Software: Python {info['python']}, torch {info['torch']}",
    ]
    if "gpus" in info:
        lines.append(f"- GPUs: {info['gpus']}")
    lines += [f"- Commit: {git_commit()}", f"- Date: {utc_date()}", f"- Command: `{command}`"]
    return lines


def load_average() -> str:
    """1-minute load average, e.g. ``"1.93"``: a benchmark on a busy machine should say so."""
    with contextlib.suppress(OSError, AttributeError):
        return f"{os.getloadavg()[0]:.2f}"
    return "unknown"


def bf16_peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in device_name), None)


# ------------------------------------------------------------------ memory
def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def current_rss_bytes() -> int:
    return _proc_status_bytes("VmRSS")


def release_free_heap() -> None:
    """Give glibc's cached free heap back to the OS so a baseline is not inflated (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of phases above a baseline, in bytes, for this process and device.

    Call ``set_baseline()`` once the state that should not count is allocated (for the
    head: weights and momentum), then ``with meter.phase() as peak:`` around each phase;
    ``peak["bytes"]`` is the highest usage the phase reached minus the baseline.
    ``method`` names what was used; ``lower_bound`` is True for the ru_maxrss fallback.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.baseline = None
        if self.device.type == "cuda":
            self.method, self.lower_bound = "cuda max_memory_allocated", False
        elif _reset_hwm():
            self.method, self.lower_bound = "VmHWM reset via /proc/self/clear_refs", False
        else:
            self.method, self.lower_bound = "ru_maxrss delta (not resettable)", True

    def _now(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return current_rss_bytes()

    def set_baseline(self) -> int:
        if self.device.type == "cpu":
            release_free_heap()
        self.baseline = self._now()
        if self.device.type == "cpu" and self.lower_bound:
            # ru_maxrss is in kB on Linux; whatever peaked before now is not ours to count.
            self.baseline = max(self.baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return self.baseline

    @contextlib.contextmanager
    def phase(self):
        if self.baseline is None:
            raise RuntimeError("PeakMemory.phase() before set_baseline()")
        result = {"bytes": None}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not self.lower_bound:
            _reset_hwm()
        yield result
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif not self.lower_bound:
            peak = _proc_status_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["bytes"] = max(0, peak - self.baseline)


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA), so a wall-clock reading covers it; no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def is_out_of_memory(error: BaseException) -> bool:
    """True for allocation failures on CPU (including under RLIMIT_AS) and CUDA."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return "can't allocate memory" in text or "out of memory" in text or "not enough memory" in text


# ------------------------------------------------------------------ ranks
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank, world_size, port, out_dir, mem_cap_bytes, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if mem_cap_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (mem_cap_bytes, mem_cap_bytes))
    record = {"partial": {}}
    try:
        record["value"] = fn(rank, world_size, record["partial"], *args)
    except BaseException as error:  # every failure goes back to the parent, OOM named as such
        record["error"] = "OOM" if is_out_of_memory(error) else f"{type(error).__name__}: {error}"[:300]
        record["traceback"] = traceback.format_exc()
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    with atomic_output_path(path) as temp_path, open(temp_path, "wb") as handle:
        pickle.dump(record, handle)
    # The process group is torn down by process exit; a peer stuck in a collective with a
    # failed rank is terminated by the parent.
    os._exit(0)


def run_ranks(fn, world_size: int, *args, mem_cap_gib: float = 0.0, timeout: float = 3600.0,
              grace: float = 20.0) -> list[dict]:
    """Run ``fn(rank, world_size, partial, *args)`` on ``world_size`` fresh spawned processes.

    ``fn`` must be importable by module name and set up its own process group (the
    environment has MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK). It may fill the
    dict ``partial`` with measurements as it goes; they are returned even if it fails.
    Returns one record per rank: ``{"value": ...}`` or ``{"error": "OOM" | message,
    "partial": {...}}``. When one rank has failed, the others get ``grace`` seconds
    (they may be blocked in a collective) before they are terminated.
    """
    cap = int(mem_cap_gib * 2**30)
    # forkserver: torch is imported once in the server and each rank forks from it, a fresh
    # address space without paying the torch import (seconds on a loaded 2-core box) per rank.
    mp.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    with tempfile.TemporaryDirectory(prefix="pfc_bench_") as out_dir:
        context = mp.start_processes(_rank_entry, args=(world_size, free_port(), out_dir, cap, fn, args),
                                     nprocs=world_size, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        failed_at = None
        while True:
            try:
                if context.join(timeout=1.0):
                    break
            except mp.ProcessExitedException:
                break  # a rank died (e.g. killed by a signal): what it wrote, if anything, is below
            records = [_read_record(out_dir, rank) for rank in range(world_size)]
            if failed_at is None and any(r is not None and "error" in r for r in records):
                failed_at = time.monotonic()
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now - failed_at > grace):
                break
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(10)
        results = []
        for rank, process in enumerate(context.processes):
            record = _read_record(out_dir, rank)
            if record is None:
                code = process.exitcode
                reason = ("killed by signal %d (OOM killer?)" % -code if code and code < 0
                          else "timeout" if time.monotonic() > deadline else f"no result, exit code {code}")
                record = {"error": reason, "partial": {}}
            results.append(record)
        return results


def _read_record(out_dir: str, rank: int):
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as handle:
        return pickle.load(handle)  # written by our own child process


# ------------------------------------------------------------------ output
def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; cells are str()-ed, numbers should be pre-formatted."""
    if any(len(row) != len(headers) for row in rows):
        raise ValueError(f"every row needs {len(headers)} cells, got lengths {sorted({len(r) for r in rows})}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically, creating its folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)
