"""Benchmark of the margin-softmax statistics: time of forward+backward and peak extra memory.

Why it is shaped like this:

* Every (case, round) runs in a fresh process (``harness.run_ranks`` with one rank), so one
  case's allocations, thread pools or an out-of-memory failure of the naive path cannot
  distort the next; on CPU the process gets an address-space cap (``--mem-cap-gb``) so a
  case that does not fit fails with an allocation error we report as OOM.
* Memory: ``harness.PeakMemory`` (CPU: the kernel's resident-set high-water mark reset
  before the step; CUDA: ``max_memory_allocated``), above the inputs. It counts everything
  the step touched, including the sparse weight-gradient values, which are reported
  separately as ``grad rows`` since the issue's bar excludes them.
* Time on a shared CPU box is noisy: each case reports the median over ``--rounds``
  fresh processes of the median over the steps in each, next to the process CPU time
  (all threads), which other jobs inflate less than wall time, and the 1-minute load
  average when the case started. ``vs naive`` divides by the naive path's time at the
  same shape in the same run.
* ``--impls torch@REV`` loads ``kernels/margin_softmax_ref.py`` as it was at git revision
  REV and times its chunked path: before / after of a change in one run, same machine
  state. Every impl's ``sum(lse)`` is recorded, and the report states how far the impls
  at one shape disagree.
* CUDA: after ``--warmup`` steps (compilation, autotune), forward and backward are timed
  apart with CUDA events around each, median over ``--repeats`` steps. Useful FLOPs:
  forward ``2 * B * k * K * D`` (the logits), backward ``4 * B * k * K * D`` (dX and dW);
  recomputations are not counted. The denominator of "% of matmul" is a bf16
  ``torch.matmul`` of two 8192 x 8192 matrices timed in a fresh process of the same run
  (printed above the table), not a datasheet number.
* ``gemm:compute`` is the gemm impl with its logit tile in the GEMM dtype instead of fp32
  (``margin_softmax_gemm.TILE_DTYPE``), to measure what the extra precision costs.

CPU (what results/kernel.md holds; one table per command, ``--append`` adds one):
    OMP_NUM_THREADS=1 python benchmarks/kernel.py --impls torch torch@HEAD naive --batch 256 \
        --classes 1e4 1e5 --subcenters 1 3 --sample-rate 0.1 1.0 --rounds 3 --threads 1 \
        --out benchmarks/results/kernel.md
CUDA (same script; ``--dry-run`` lists the cases without running anything, anywhere):
    python benchmarks/kernel.py --device cuda --impls gemm triton torch naive --dtype bfloat16 --batch 1024 \
        --classes 1e5 1e6 --subcenters 1 3 --sample-rate 1.0 --repeats 10
Triton tiles compiled for a GPU arch without a GPU (registers, spills, shared memory):
    python benchmarks/kernel.py --compile-check sm_90 --dim 512 --subcenters 1 3 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (sibling module; benchmarks/ is not a package)

IMPLS = ("gemm", "gemm:compute", "triton", "torch", "naive")
MATMUL_SIZE = 8192
REF_PATH = "kernels/margin_softmax_ref.py"


# ------------------------------------------------------------------ implementations
def impl_function(spec: str):
    """The callable behind an ``--impls`` entry: an impl name or ``torch@REV``."""
    from partialfc.kernels import margin_softmax_stats

    if spec == "gemm:compute":
        from partialfc.kernels import margin_softmax_gemm

        margin_softmax_gemm.TILE_DTYPE = "compute"  # this process runs one case only
        spec = "gemm"
    if "@" not in spec:
        return lambda *args, **kwargs: margin_softmax_stats(*args, impl=spec, **kwargs)
    module = harness.module_at_revision(REF_PATH, spec.split("@", 1)[1], "margin_softmax_ref_at_revision")
    return module.margin_softmax_stats_torch


def check_impl_spec(spec: str) -> str:
    """argparse type: a known impl, or torch@REV with REV readable by git (named by its short hash)."""
    return harness.revision_spec(spec, IMPLS, "torch", REF_PATH)


# ------------------------------------------------------------------ one case, one process
def bench_case(rank: int, world_size: int, partial: dict, case: dict) -> dict:
    """Build inputs, measure one step's peak memory, then time ``repeats`` more steps."""
    import torch.nn.functional as F

    from partialfc.head.margins import CombinedMargin

    fn = impl_function(case["impl"])
    device = torch.device(case["device"])
    if device.type == "cpu" and case["threads"]:
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    batch, dim, classes, subs = case["batch"], case["dim"], case["classes"], case["subcenters"]
    weight = torch.nn.Parameter(torch.randn(classes * subs, dim, device=device) * 0.01)
    kept = max(1, round(case["sample_rate"] * classes))
    if kept == classes:  # what PartialFC keeps at r = 1
        class_index = torch.arange(classes, device=device)
    else:
        class_index = torch.randperm(classes, device=device)[:kept].sort().values
    target_position = torch.randint(0, kept, (batch,), device=device)
    embeddings = F.normalize(torch.randn(batch, dim, device=device), dim=1).to(dtype).requires_grad_()
    margin = CombinedMargin.preset("arcface")
    grad_lse = torch.ones(batch, device=device) / batch
    grad_target = -grad_lse

    def step(rows=weight, kept_index=class_index):
        rows.grad = None
        embeddings.grad = None
        lse, target = fn(embeddings, rows, kept_index, target_position.clamp_max(kept_index.shape[0] - 1),
                         subs, margin, chunk_size=case["chunk_size"])
        torch.autograd.backward([lse, target], [grad_lse, grad_target])
        return lse

    # One-time costs (thread pools, BLAS buffers, compilation) land in a small step on
    # the same code path; on CUDA also in --warmup full steps (autotune runs at the real shape).
    small = min(classes, 1000)
    step(torch.nn.Parameter(weight.detach()[: small * subs].clone()), torch.arange(small, device=device))
    for _ in range(case["warmup"] if device.type == "cuda" else 0):
        step()
    meter = harness.PeakMemory(device)
    meter.set_baseline()
    wall, cpu, forward_ms, backward_ms = [], [], [], []
    with meter.phase() as peak:
        harness.synchronize(device)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        lse = step()
        harness.synchronize(device)
        end, end_cpu = time.perf_counter(), time.process_time()
    partial["peak_extra_bytes"] = peak["bytes"]
    if device.type == "cpu":  # no compilation or autotune on CPU: the measured step counts
        wall.append(end - begin)
        cpu.append(end_cpu - begin_cpu)
    for _ in range(case["repeats"]):
        harness.synchronize(device)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        if device.type == "cuda":
            forward, backward = timed_step(fn, embeddings, weight, class_index, target_position, subs, margin,
                                           case["chunk_size"], grad_lse, grad_target)
            forward_ms.append(forward)
            backward_ms.append(backward)
        else:
            step()
        harness.synchronize(device)
        wall.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - begin_cpu)
    seconds = statistics.median(wall)
    flops = 2.0 * batch * kept * subs * dim  # one B x (k K) x D product
    timing = {}
    if forward_ms:
        forward_s, backward_s = statistics.median(forward_ms) / 1e3, statistics.median(backward_ms) / 1e3
        timing = {"forward_s": forward_s, "backward_s": backward_s, "forward_tflops": flops / forward_s / 1e12,
                  "backward_tflops": 2 * flops / backward_s / 1e12,
                  "step_tflops": 3 * flops / (forward_s + backward_s) / 1e12}
    return {
        **timing,
        "seconds": seconds,
        "cpu_seconds": statistics.median(cpu),
        "peak_extra_bytes": peak["bytes"],
        "grad_rows_bytes": kept * subs * dim * weight.element_size(),
        "weight_bytes": weight.numel() * weight.element_size(),
        "tflops": 6.0 * batch * kept * subs * dim / seconds / 1e12,
        "lse_sum": float(lse.detach().double().sum()),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "memory_method": meter.method,
    }


def timed_step(fn, embeddings, weight, class_index, target_position, subs, margin, chunk_size, grad_lse,
               grad_target) -> tuple[float, float]:
    """(forward ms, backward ms) of one step, from CUDA events recorded around each half."""
    weight.grad = None
    embeddings.grad = None
    start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    positions = target_position.clamp_max(class_index.shape[0] - 1)
    start.record()
    lse, target = fn(embeddings, weight, class_index, positions, subs, margin, chunk_size=chunk_size)
    middle.record()
    torch.autograd.backward([lse, target], [grad_lse, grad_target])
    end.record()
    end.synchronize()
    return start.elapsed_time(middle), middle.elapsed_time(end)


def bench_matmul(rank: int, world_size: int, partial: dict, size: int) -> dict:
    """TFLOP/s of a bf16 ``torch.matmul`` of two size x size matrices: the run's denominator."""
    device = torch.device("cuda")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    repeats = 20
    for _ in range(repeats):
        torch.matmul(a, b)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    return {"tflops": 2.0 * size**3 / seconds / 1e12, "device_name": torch.cuda.get_device_name(device)}


def software_line() -> str:
    """Triton and CUDA versions (harness's provenance names Python and torch)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"- Triton {triton_version}, CUDA {torch.version.cuda or '-'}"


# ------------------------------------------------------------------ compile check (no GPU needed)
def compile_check(args) -> list[str]:
    """Compile the Triton kernels' tiles for a CUDA arch with ptxas; report their resources.

    Needs no GPU (triton's bundled ptxas and cuobjdump do the work), so on a CPU-only
    machine it is the one GPU-side fact we can check: which tiles compile for the target
    and whether they spill registers (STACK > 0) or exceed shared memory. Covers the fused
    kernel's autotune survivors and the gemm path's elementwise passes at their CUDA tiles.
    """
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from partialfc.kernels import margin_softmax as module
    from partialfc.kernels import margin_softmax_gemm as gemm
    from partialfc.kernels import margin_softmax_tiles as tiles

    arch = int(args.compile_check.removeprefix("sm_"))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    element = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[args.dtype]
    dot = {"float32": (tl.float32, "ieee"), "float16": (tl.float16, None), "bfloat16": (tl.bfloat16, None)}[args.dtype]
    floats = ("scale", "m1", "m2", "m3", "cos_m2", "sin_m2", "arc_threshold", "arc_fallback")
    lines = []

    def check(kernel, pointers, constexprs, num_warps, num_stages, label):
        signature = {arg: "constexpr" if arg in constexprs else "*" + pointers.get(arg, "fp32")
                     if arg.endswith("_ptr") else "fp32" if arg in floats else "i32" for arg in kernel.arg_names}
        label = f"sm_{arch} D={args.dim} {args.dtype} {label} warps {num_warps} stages {num_stages}"
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
        except Exception as error:  # report and go on: one failing tile is a finding
            lines.append(f"{label}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            return
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                                   capture_output=True, text=True).stdout
        resources = next((line.split("Resource usage:")[-1].strip() for line in usage.splitlines()
                          if "REG:" in line), usage.strip()[-120:])
        lines.append(f"{label}: shared {compiled.metadata.shared} B; {resources}")
        print(lines[-1], flush=True)

    d_pad = max(16, triton.next_power_of_2(args.dim))
    for subs, (name, kernel, candidates, full_width) in itertools.product(args.subcenters, (
            ("forward", module._forward_kernel, tiles.FORWARD_CANDIDATES, "none"),
            ("dx", module._backward_dx_kernel, tiles.DX_CANDIDATES, "dx"),
            ("dw", module._backward_dw_kernel, tiles.DW_CANDIDATES, "dw"))):
        consts = dict(NUM_SUB=subs, K_PAD=triton.next_power_of_2(subs), MARGIN=module.MARGIN_KIND["arcface"],
                      D_PAD=d_pad, DOT_DTYPE=dot[0], DOT_PRECISION=dot[1])
        configs = [triton.Config(dict(BLOCK_B=b, BLOCK_R=r, BLOCK_D=d), num_warps=w, num_stages=st)
                   for b, r, d, w, st in candidates]
        for config in tiles.prune_configs(configs, {}, full_width, **consts):
            tile = config.kwargs
            check(kernel, dict(x_ptr=element, class_ptr="i64", target_ptr="i64"), dict(consts, **tile),
                  config.num_warps, config.num_stages,
                  f"K={subs} triton {name:7s} B{tile['BLOCK_B']} R{tile['BLOCK_R']} D{tile['BLOCK_D']}")
    # gemm: the elementwise tile passes (fp32 logit tile, dS in the GEMM dtype) and the row passes.
    tile = gemm.CUDA_TILE
    for subs in args.subcenters:
        consts = dict(NUM_SUB=subs, K_PAD=triton.next_power_of_2(subs), BLOCK_B=tile["BLOCK_B"],
                      BLOCK_R=tile["BLOCK_R"])
        label = f"K={subs} gemm {{:7s}} B{tile['BLOCK_B']} R{tile['BLOCK_R']}"
        check(gemm._chunk_stats_kernel, dict(target_ptr="i64"), consts, tile["num_warps"], 1, label.format("stats"))
        check(gemm._chunk_grad_kernel, dict(grad_ptr=element, target_ptr="i64", target_sub_ptr="i64"), consts,
              tile["num_warps"], 1, label.format("dS"))
    block_rows = max(1, gemm.ROW_PASS_VALUES // d_pad)
    check(gemm._gather_rows_kernel, dict(rows_ptr="i64", out_ptr=element), dict(BLOCK_R=block_rows, D_PAD=d_pad),
          gemm.ROW_PASS_WARPS, 1, f"gemm gather  R{block_rows}")
    check(gemm._rows_backward_kernel, dict(g_ptr=element, w_ptr=element), dict(BLOCK_R=block_rows, D_PAD=d_pad),
          gemm.ROW_PASS_WARPS, 1, f"gemm rows-bwd R{block_rows}")
    return lines


# ------------------------------------------------------------------ driver
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--impls", nargs="+", default=["torch", "naive"], type=check_impl_spec,
                        help=f"any of {IMPLS}, or torch@REV: the chunked path at git revision REV")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch", nargs="+", type=int, default=[256])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    parser.add_argument("--subcenters", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--sample-rate", nargs="+", type=float, default=[1.0])
    parser.add_argument("--chunk-size", type=int, default=None, help="classes per tile (default: the impl's)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per case; medians across them")
    parser.add_argument("--warmup", type=int, default=2, help="CUDA only: full steps before measuring")
    parser.add_argument("--threads", type=int, default=0, help="CPU torch threads per case (0 = torch default)")
    parser.add_argument("--mem-cap-gb", type=float, default=14.0, help="CPU address-space cap per case; 0 = none")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case and round")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (else looked up)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exit (no device needed)")
    parser.add_argument("--compile-check", metavar="sm_XY",
                        help="compile the Triton kernels' tiles for this CUDA arch (no GPU needed) and exit")
    parser.add_argument("--out", help="write the report (markdown) here, atomically")
    parser.add_argument("--append", action="store_true",
                        help="append the report to --out (and the results to --json) instead of replacing them")
    parser.add_argument("--json", help="also write the per-case results as JSON here (what benchmarks/gpu reads)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (args.dry_run or args.compile_check) and not torch.cuda.is_available():
        parser.error("--device cuda needs a visible GPU (use --dry-run to check a command without one)")
    return args


def make_cases(args) -> list[dict]:
    cases = []
    for batch, classes, subs, rate, impl in itertools.product(
            args.batch, args.classes, args.subcenters, args.sample_rate, args.impls):
        cases.append(dict(device=args.device, impl=impl, dtype=args.dtype, batch=batch, dim=args.dim,
                          classes=int(classes), subcenters=subs, sample_rate=rate, chunk_size=args.chunk_size,
                          repeats=args.repeats, warmup=args.warmup, threads=args.threads))
    return cases


def _shape(case: dict) -> tuple:
    return case["batch"], case["classes"], case["subcenters"], case["sample_rate"]


def run_cases(args, cases: list[dict], on_progress=None) -> list[dict]:
    """Every case ``--rounds`` times, rounds outermost (a slow spell hits every impl alike).

    ``on_progress(summaries)`` is called after every case with what has run so far, so a
    run stopped by a time limit keeps its finished cases.
    """
    runs = [[] for _ in cases]
    for round_index in range(args.rounds):
        for case, case_runs in zip(cases, runs):
            load = harness.load_average()
            record = harness.run_ranks(bench_case, 1, case, mem_cap_gib=args.mem_cap_gb if args.device == "cpu" else 0,
                                       timeout=args.timeout)[0]
            record["load"] = load
            case_runs.append(record)
            value = record.get("value")
            if value and "forward_s" in value:
                shown = f"fwd {1e3 * value['forward_s']:.2f} ms, bwd {1e3 * value['backward_s']:.2f} ms"
            else:
                shown = f"{value['seconds']:.3f} s" if value else record["error"]
            print(f"round {round_index + 1}/{args.rounds} {case['impl']:>12} B={case['batch']} classes={case['classes']:.0e} "
                  f"K={case['subcenters']} r={case['sample_rate']}: {shown} (load {load})", flush=True)
            if on_progress is not None:
                on_progress([summarize(c, r) for c, r in zip(cases, runs) if r])
    return [summarize(case, case_runs) for case, case_runs in zip(cases, runs)]


def summarize(case: dict, records: list[dict]) -> dict:
    values = [r["value"] for r in records if "value" in r]
    errors = [r["error"] for r in records if "error" in r]
    summary = dict(case, loads=[r["load"] for r in records], errors=errors, rounds=len(values))
    if values:
        for key in ("seconds", "cpu_seconds", "peak_extra_bytes", "tflops", "forward_s", "backward_s",
                    "forward_tflops", "backward_tflops", "step_tflops"):
            if key in values[0]:
                summary[key] = statistics.median(v[key] for v in values)
        for key in ("grad_rows_bytes", "weight_bytes", "lse_sum", "device_name", "memory_method"):
            summary[key] = values[0][key]
    return summary


def _lse_spread(results: list[dict]) -> float:
    """Largest relative disagreement of sum(lse) between impls at one shape (a sanity check)."""
    spread = []
    for res in results:
        same = [r["lse_sum"] for r in results if _shape(r) == _shape(res) and "lse_sum" in r]
        if same:
            spread.append((max(same) - min(same)) / max(abs(v) for v in same))
    return max(spread, default=0.0)


def fastest_per_shape(results: list[dict]) -> list[str]:
    """'shape: impl (ms)' for every shape, the line a GPU run leaves for kernels.AUTO_TABLE."""
    lines = []
    for shape in dict.fromkeys(_shape(r) for r in results):
        timed = [r for r in results if _shape(r) == shape and "forward_s" in r]
        if timed:
            best = min(timed, key=lambda r: r["forward_s"] + r["backward_s"])
            batch, classes, subs, rate = shape
            lines.append(f"- B {batch}, {classes:.0e} classes, K {subs}, r {rate}: {best['impl']} "
                         f"({1e3 * (best['forward_s'] + best['backward_s']):.1f} ms)")
    return lines


def build_cuda_report(args, results: list[dict], command: str) -> str:
    """CUDA table: forward and backward apart (CUDA events), useful TFLOP/s, % of the run's matmul."""
    matmul = args.matmul_tflops
    naive = {_shape(r): r["forward_s"] + r["backward_s"] for r in results if r["impl"] == "naive" and "forward_s" in r}
    headers = ["impl", "B", "classes", "K", "r", "fwd ms", "bwd ms", "fwd+bwd ms", "vs naive", "peak extra MB",
               "grad rows MB", "fwd TFLOP/s", "bwd TFLOP/s", "fwd+bwd TFLOP/s", "% of matmul"]
    rows = []
    for res in results:
        head = [res["impl"], res["batch"], f"{res['classes']:.0e}", res["subcenters"], res["sample_rate"]]
        if "forward_s" not in res:
            rows.append(head + [(res["errors"] or ["no timed step"])[0][:80]] + ["-"] * (len(headers) - 6))
            continue
        total = res["forward_s"] + res["backward_s"]
        base = naive.get(_shape(res))
        rows.append(head + [f"{1e3 * res['forward_s']:.2f}", f"{1e3 * res['backward_s']:.2f}", f"{1e3 * total:.2f}",
                            f"{total / base:.2f}" if base else "-", f"{res['peak_extra_bytes'] / harness.MIB:.0f}",
                            f"{res['grad_rows_bytes'] / harness.MIB:.0f}", f"{res['forward_tflops']:.0f}",
                            f"{res['backward_tflops']:.0f}", f"{res['step_tflops']:.0f}",
                            f"{100 * res['step_tflops'] / matmul:.1f}" if matmul else "-"])
    lines = [
        "# Margin-softmax statistics on CUDA: forward and backward", "",
        *harness.provenance_lines(command), software_line(),
        f"- Denominator: bf16 torch.matmul {MATMUL_SIZE}^3 in this run = "
        + (f"{matmul:.0f} TFLOP/s" if matmul else "not measured"), "",
        f"Times: CUDA events around forward and around backward, median over --repeats {args.repeats} steps "
        f"after --warmup {args.warmup} (compilation, autotune), {args.dtype} embeddings, fp32 weights, ArcFace. "
        "Useful FLOPs: forward 2 B k K D, backward 4 B k K D (recomputations not counted). "
        "'% of matmul' = fwd+bwd TFLOP/s / the denominator. Peak extra = max_memory_allocated above the inputs "
        "in one step, including the weight-gradient rows ('grad rows'). 'vs naive' = fwd+bwd time / naive's. "
        "gemm:compute = gemm with its logit tile in the GEMM dtype instead of fp32. "
        f"Sanity: at every shape the impls' sum(lse) agree to a relative {_lse_spread(results):.1e}.", "",
        harness.markdown_table(headers, rows), "",
        "Fastest impl per shape (for partialfc.kernels.AUTO_TABLE):", "", *fastest_per_shape(results), "",
    ]
    return "\n".join(lines)


def build_report(args, results: list[dict], command: str, load_start: str) -> str:
    if args.device == "cuda":
        return build_cuda_report(args, results, command)
    peak = args.peak_tflops or harness.bf16_peak_tflops(next((r.get("device_name", "") for r in results), ""))
    naive_seconds = {_shape(r): r["seconds"] for r in results if r["impl"] == "naive" and "seconds" in r}
    headers = ["impl", "B", "classes", "K", "r", "fwd+bwd s", "cpu s", "vs naive", "peak extra MB",
               "grad rows MB", "weights MB", "TFLOP/s", "load"]
    if peak:
        headers.append("% bf16 peak")
    rows, spread = [], []
    for res in results:
        head = [res["impl"], res["batch"], f"{res['classes']:.0e}", res["subcenters"], res["sample_rate"]]
        loads = "/".join(res["loads"])
        if "seconds" not in res:
            rows.append(head + [res["errors"][0]] + ["-"] * (len(headers) - 7) + [loads])
            continue
        base = naive_seconds.get(_shape(res))
        row = head + [f"{res['seconds']:.3f}", f"{res['cpu_seconds']:.3f}",
                      f"{res['seconds'] / base:.2f}" if base else "-",
                      f"{res['peak_extra_bytes'] / harness.MIB:.0f}", f"{res['grad_rows_bytes'] / harness.MIB:.0f}",
                      f"{res['weight_bytes'] / harness.MIB:.0f}", f"{res['tflops']:.3f}", loads]
        if peak:
            row.append(f"{100 * res['tflops'] / peak:.1f}")
        rows.append(row)
        same = [r["lse_sum"] for r in results if _shape(r) == _shape(res) and "lse_sum" in r]
        spread.append((max(same) - min(same)) / max(abs(v) for v in same))
    method = next((r["memory_method"] for r in results if "memory_method" in r), "-")
    lines = [
        "# Margin-softmax statistics: forward + backward", "",
        *harness.provenance_lines(command),
        f"- Load average (1 min) at start / end: {load_start} / {harness.load_average()}", "",
        f"Peak extra = memory above the inputs during one forward+backward ({method}); it includes "
        "the sparse weight-gradient values ('grad rows'). OOM = allocation failed under "
        f"--mem-cap-gb {args.mem_cap_gb} of address space (CPU). 'fwd+bwd s' / 'cpu s': wall / process "
        f"CPU time (all threads), median over {args.rounds} round(s) (fresh processes) of the median "
        f"over each round's steps (CPU: the memory-measured step plus --repeats {args.repeats}; CUDA: "
        f"--repeats after --warmup {args.warmup}). 'vs naive': wall time / naive's at the same shape. "
        "'load': 1-min load average as each round of the case started. "
        f"Sanity: at every shape the impls' sum(lse) agree to a relative {max(spread, default=0.0):.1e}.", "",
        harness.markdown_table(headers, rows), "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compile_check:
        compile_check(args)
        return
    cases = make_cases(args)
    if args.dry_run:
        for case in cases:
            print(case)
        print(f"{len(cases)} cases x {args.rounds} round(s) on {args.device}; nothing run (--dry-run)")
        return
    load_start = harness.load_average()
    args.matmul_tflops = None
    if args.device == "cuda":
        record = harness.run_ranks(bench_matmul, 1, MATMUL_SIZE, timeout=args.timeout)[0]
        args.matmul_tflops = record.get("value", {}).get("tflops")
        print(f"denominator: bf16 torch.matmul {MATMUL_SIZE}^3 = "
              + (f"{args.matmul_tflops:.0f} TFLOP/s" if args.matmul_tflops else f"failed: {record.get('error')}"),
              flush=True)
    command = "python benchmarks/kernel.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    previous, previous_json = "", {}
    if args.out and args.append and os.path.exists(args.out):
        with open(args.out) as handle:
            previous = handle.read().rstrip("\n") + "\n\n"
    if args.json and args.append and os.path.exists(args.json):
        with open(args.json) as handle:
            previous_json = json.load(handle)

    def write_outputs(results):
        if args.out:
            harness.write_atomic(args.out, previous + build_report(args, results, command, load_start))
        if args.json:
            record = dict(commands=previous_json.get("commands", []) + [command],
                          matmul_tflops=args.matmul_tflops or previous_json.get("matmul_tflops"),
                          results=previous_json.get("results", []) + results)
            harness.write_atomic(args.json, json.dumps(record, indent=1, default=str))

    results = run_cases(args, cases, on_progress=write_outputs)
    print(build_report(args, results, command, load_start))
    write_outputs(results)


if __name__ == "__main__":
    main()
