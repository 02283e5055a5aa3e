"""Benchmark of the margin-softmax statistics: time of forward+backward and peak extra memory.

Why it is shaped like this:

* Every case runs in its own subprocess, so one case's allocations (or an out-of-memory
  failure of the naive path) cannot distort the next, and a memory cap can be set.
* CPU memory: torch's CPU allocator keeps no peak statistics and tracemalloc does not see
  its buffers, so we read the kernel's resident-set high-water mark. After the inputs
  are built, ``/proc/self/clear_refs`` (value 5) resets ``VmHWM``; after one forward +
  backward, ``peak extra = VmHWM - VmRSS(before)``. That counts everything the step
  touched, including the sparse weight-gradient values (reported separately as
  ``grad rows``, since the issue's bar excludes them). Large buffers are mmap'd by glibc
  and returned on free, so the high-water mark is a fair "largest live set".
* CPU cap: ``RLIMIT_AS`` (virtual address space) of the worker, ``--mem-cap-gb``, so a
  naive case that would need more fails with an allocation error that we report as OOM
  instead of waking the kernel's OOM killer on a shared machine.
* CUDA: ``torch.cuda.max_memory_allocated`` above the baseline, CUDA-event timing, and
  achieved TFLOP/s. Useful FLOPs are ``6 * B * k * K * D`` (forward logits, dX, dW; the
  backward's recomputation is not counted), compared with the device's dense bf16 peak
  (``--peak-tflops`` or a small table of known devices).

CPU (what results/kernel.md holds):
    python benchmarks/kernel.py --impls torch naive --batch 256 --classes 1e4 1e5 1e6 \
        --subcenters 1 3 --repeats 0 --mem-cap-gb 15 --out benchmarks/results/kernel.md
CUDA (same script; triton is picked for embeddings in bf16):
    python benchmarks/kernel.py --device cuda --impls triton torch --dtype bfloat16 --batch 1024 \
        --classes 100000 1000000 --subcenters 1 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

# Dense bf16 tensor-core peak in TFLOP/s (vendor datasheets, without sparsity).
_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _run_case(case: dict) -> dict:
    """Worker body: build inputs, measure one step's memory, then time ``repeats`` steps."""
    import torch
    import torch.nn.functional as F

    from partialfc.head.margins import CombinedMargin
    from partialfc.kernels import margin_softmax_stats

    torch.manual_seed(0)
    device = torch.device(case["device"])
    dtype = getattr(torch, case["dtype"])
    batch, dim, classes, subs = case["batch"], case["dim"], case["classes"], case["subcenters"]
    weight = torch.nn.Parameter(torch.randn(classes * subs, dim, device=device) * 0.01)
    kept = max(1, round(case["sample_rate"] * classes))
    class_index = torch.randperm(classes, device=device)[:kept].sort().values
    target_position = torch.randint(0, kept, (batch,), device=device)
    embeddings = F.normalize(torch.randn(batch, dim, device=device), dim=1).to(dtype).requires_grad_()
    margin = CombinedMargin.preset("arcface")
    grad_lse = torch.ones(batch, device=device) / batch
    grad_target = -grad_lse

    def step(rows=weight, kept_index=class_index):
        rows.grad = None
        embeddings.grad = None
        lse, target = margin_softmax_stats(
            embeddings, rows, kept_index, target_position.clamp_max(kept_index.shape[0] - 1), subs,
            margin, impl=case["impl"], chunk_size=case["chunk_size"],
        )
        torch.autograd.backward([lse, target], [grad_lse, grad_target])

    # One-time costs (thread pools, BLAS buffers, kernel compilation) land in a small
    # warm-up step on the same code path, not in the measured one.
    small = min(classes, 1000)
    step(torch.nn.Parameter(weight.detach()[: small * subs].clone()), torch.arange(small, device=device))

    result = {"grad_rows_mb": kept * subs * dim * weight.element_size() / 2**20,
              "weight_mb": weight.numel() * weight.element_size() / 2**20}
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        result["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        for _ in range(case["warmup"]):
            step()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(case["repeats"]):
            start.record()
            step()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
    else:
        base_kib = _proc_status_kib("VmRSS")
        if not _reset_peak_rss():
            result["note"] = "VmHWM not resettable: peak includes setup"
        begin = time.perf_counter()
        step()
        times = [time.perf_counter() - begin]  # no compile or autotune on CPU: the first step counts
        result["peak_extra_mb"] = (_proc_status_kib("VmHWM") - base_kib) / 1024
        for _ in range(case["repeats"]):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    times.sort()
    result["seconds"] = times[len(times) // 2]
    useful_flops = 6.0 * batch * kept * subs * dim
    result["tflops"] = useful_flops / result["seconds"] / 1e12
    return result


def _worker_main(case_json: str) -> None:
    case = json.loads(case_json)
    if case["device"] == "cpu" and case["mem_cap_gb"] > 0:
        cap = int(case["mem_cap_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        result = _run_case(case)
    except (RuntimeError, MemoryError) as err:  # allocation failure under the cap
        message = str(err).splitlines()[0][:120]
        result = {"error": "OOM" if "alloc" in message.lower() or isinstance(err, MemoryError) else message}
    print("RESULT " + json.dumps(result))


def _launch(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f}s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
    return {"error": f"worker exit {done.returncode}: {tail}"}


def _device_peak(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((peak for key, peak in _BF16_PEAK_TFLOPS.items() if key in name), None)


def _machine_line(args) -> str:
    import torch

    if args.device == "cuda":
        hw = torch.cuda.get_device_name()
    else:
        hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "uncommitted"
    return (f"{hw}; Python {platform.python_version()}, torch {torch.__version__}; commit {commit}; "
            f"{datetime.date.today().isoformat()}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--impls", nargs="+", default=["torch", "naive"], choices=("triton", "torch", "naive"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch", nargs="+", type=int, default=[256])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    parser.add_argument("--subcenters", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--sample-rate", nargs="+", type=float, default=[1.0])
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the measured one")
    parser.add_argument("--warmup", type=int, default=2, help="CUDA only (compilation, autotune)")
    parser.add_argument("--mem-cap-gb", type=float, default=14.0, help="CPU address-space cap per case; 0 = none")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (else looked up)")
    parser.add_argument("--out", help="write a markdown table here (atomically)")
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return

    peak = _device_peak(args)
    header = "| impl | B | classes | K | rate | fwd+bwd s | peak extra MB | grad rows MB | weights MB | TFLOP/s |"
    if peak:
        header += " % bf16 peak |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print(header, flush=True)
    for batch in args.batch:
        for classes in args.classes:
            for subs in args.subcenters:
                for rate in args.sample_rate:
                    for impl in args.impls:
                        case = dict(device=args.device, impl=impl, dtype=args.dtype, batch=batch, dim=args.dim,
                                    classes=int(classes), subcenters=subs, sample_rate=rate,
                                    chunk_size=args.chunk_size, repeats=args.repeats, warmup=args.warmup,
                                    mem_cap_gb=args.mem_cap_gb)
                        res = _launch(case, args.timeout)
                        head = f"| {impl} | {batch} | {int(classes):.0e} | {subs} | {rate} |"
                        if "error" in res:
                            row = head + f" {res['error']} | - | - | - | - |" + (" - |" if peak else "")
                        else:
                            row = head + (f" {res['seconds']:.3f} | {res['peak_extra_mb']:.0f} | "
                                          f"{res['grad_rows_mb']:.0f} | {res['weight_mb']:.0f} | {res['tflops']:.3f} |")
                            if peak:
                                row += f" {100 * res['tflops'] / peak:.1f} |"
                        lines.append(row)
                        print(row, flush=True)
    if args.out:
        command = "python " + " ".join(["benchmarks/kernel.py"] + (argv if argv is not None else sys.argv[1:]))
        text = "\n".join([
            "# Margin-softmax statistics: forward + backward", "",
            f"Machine: {_machine_line(args)}", "", f"Command: `{command}`", "",
            "Peak extra = resident-set high-water mark above the set after building the inputs "
            "(CPU) or max_memory_allocated above baseline (CUDA); it includes the sparse "
            "weight-gradient values ('grad rows'). OOM = allocation failed under "
            f"--mem-cap-gb {args.mem_cap_gb} of address space. Times: median over the steps run "
            "(CPU: the memory-measured step plus --repeats more; CUDA: --repeats after warm-up).", "",
            *lines, "",
        ])
        tmp = args.out + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
