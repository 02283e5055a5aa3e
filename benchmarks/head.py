"""Benchmark of the Partial FC head: one training step (forward, backward, optimizer) per rank.

What it answers (issues 4 and 5): at a given number of classes per rank, how much time
and memory does one head step cost with our path -- ``PartialFC(impl="torch"|"auto")``,
chunked logits that never form a ``B x n`` buffer, plus ``RowSparseSGD`` that touches
only the sampled rows -- against the common approach measured in the same run:
``impl="naive"`` (full fp32 logits through plain autograd) plus a dense update of all
rows (the sparse gradient densified with ``.to_dense()`` and stepped with
``torch.optim.SGD``).

How it measures (see ``harness.py`` for the memory method):

* Every (configuration, implementation) runs in fresh processes, one per rank, on a
  real process group (gloo on CPU, nccl on CUDA), so the all-gather, the all-reduces
  and the reduce-scatter of the embedding gradient are all in the step.
* Weights and the momentum buffer are allocated first (momentum pre-filled with zeros,
  which both optimizers accept); that resident set is the baseline. Each step then
  measures the forward+backward phase and the update phase separately: the issue's bar
  is on forward+backward, above weights + gradient rows + momentum.
* Time per step: median over ``--steps`` steps after ``--warmup`` steps, slowest rank.
* A configuration whose weights + momentum alone exceed the per-rank memory cap is
  skipped and says so; one that runs out under the cap is reported as OOM with whatever
  phase it finished.

Run ``python benchmarks/head.py --help``; the commands behind results/head.md and the CUDA
command are in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (sibling module; benchmarks/ is not a package)

BYTES_FP32 = 4
LARGE_STEPS_NOTE = "fewer steps where kept rows per rank >= --large-rows"


# ------------------------------------------------------------------ one rank
def bench_rank(rank: int, world_size: int, partial: dict, case: dict) -> dict:
    """Body of one rank: build the shard and optimizer, then time and measure the steps."""
    from partialfc import CombinedMargin, PartialFC
    from partialfc.distributed.runtime import init_runtime
    from partialfc.optim import RowSparseSGD

    runtime = init_runtime(case["device"], timeout_minutes=case["timeout"] / 60)
    device = runtime.device
    if device.type == "cpu":
        torch.set_num_threads(case["threads"])
    num_local, subcenters, batch = case["classes_per_rank"], case["subcenters"], case["batch"]
    head = PartialFC(
        CombinedMargin.preset("arcface"), case["dim"], num_local * world_size,
        sample_rate=case["sample_rate"], num_subcenters=subcenters,
        impl=case["impl"], chunk_size=case["chunk_size"], seed=0, **case.get("geodesic", {}),
        compute_dtype=getattr(torch, case.get("compute_dtype", "float32")),
    ).to(device)
    weight = head.weight
    dense_update = case["impl"] == "naive"
    optimizer_cls = torch.optim.SGD if dense_update else RowSparseSGD
    optimizer = optimizer_cls([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    # Momentum exists before the baseline, so it counts as state, not as step memory.
    optimizer.state[weight]["momentum_buffer"] = torch.zeros_like(weight)

    generator = torch.Generator(device=device).manual_seed(1234 + rank)
    embeddings = torch.randn(batch, case["dim"], device=device, generator=generator).requires_grad_()
    total_steps = case["warmup"] + case["steps"]
    labels = [torch.randint(0, head.num_classes, (batch,), device=device, generator=generator)
              for _ in range(total_steps)]
    if "geodesic" in case:  # identities in pairs (P x 2 sampling), so the triplet term has positives
        labels = [step_labels.view(-1, 2)[:, :1].expand(-1, 2).reshape(-1) for step_labels in labels]

    meter = harness.PeakMemory(device)
    meter.set_baseline()

    fwd_bwd_s, update_s, losses = [], [], []
    fwd_bwd_peak = update_peak = grad_bytes = 0
    for step in range(total_steps):
        optimizer.zero_grad(set_to_none=True)
        embeddings.grad = None
        with meter.phase() as peak:
            harness.synchronize(device)
            begin = time.perf_counter()
            loss = head(embeddings, labels[step])
            loss.backward()
            harness.synchronize(device)
            middle = time.perf_counter()
        timed = step >= case["warmup"]  # warm-up steps also pay one-time costs (pools, buffers)
        if timed:
            fwd_bwd_peak = max(fwd_bwd_peak, peak["bytes"])
        grad = weight.grad
        # Bytes of the weight gradient as backward left it (sparse: kept rows only).
        grad_bytes = (grad._values() if grad.is_sparse else grad).numel() * grad.element_size()
        # Kept for the report even if the update below runs out of memory.
        partial.update(fwd_bwd_peak=max(partial.get("fwd_bwd_peak", 0), peak["bytes"]),
                       grad_bytes=grad_bytes, kept=head.last_num_sampled, fwd_bwd_s=middle - begin)
        with meter.phase() as peak:
            if dense_update:
                weight.grad = weight.grad.to_dense()  # what the common approach holds and steps
            optimizer.step()
            harness.synchronize(device)
            end = time.perf_counter()
        losses.append(float(loss.detach()))  # after the timed region: a host sync on CUDA
        if timed:
            update_peak = max(update_peak, peak["bytes"])
            fwd_bwd_s.append(middle - begin)
            update_s.append(end - middle)
    state_bytes = 2 * weight.numel() * weight.element_size()
    return {
        "step_s": statistics.median(a + b for a, b in zip(fwd_bwd_s, update_s)),
        "fwd_bwd_s": statistics.median(fwd_bwd_s),
        "update_s": statistics.median(update_s),
        "fwd_bwd_peak": fwd_bwd_peak,
        "update_peak": update_peak,
        "grad_bytes": grad_bytes,
        "state_bytes": state_bytes,
        "kept": head.last_num_sampled,
        "first_loss": losses[0],
        "memory_method": meter.method,
        "lower_bound": meter.lower_bound,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


# ------------------------------------------------------------------ driver
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks (default: 2 on CPU, every visible GPU on CUDA)")
    parser.add_argument("--batch", type=int, default=256, help="embeddings per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", nargs="+", type=float, default=[1e4, 1e5, 1e6], help="classes per rank")
    parser.add_argument("--subcenters", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.1, 1.0], help="sample rates")
    parser.add_argument("--ours-impl", default="auto", choices=("auto", "gemm", "torch", "triton"),
                        help="head impl of our path (auto: partialfc.kernels.AUTO_TABLE)")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="head.compute_dtype of both paths (the embeddings fed to the op; weights stay fp32)")
    parser.add_argument("--chunk-size", type=int, default=None, help="class tile (default: the impl's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (median)")
    parser.add_argument("--large-steps", type=int, default=1, help="timed steps for large configurations")
    parser.add_argument("--large-warmup", type=int, default=0,
                        help="warm-up steps for large configurations (one-time costs are noise there)")
    parser.add_argument("--large-rows", type=float, default=2e5,
                        help="kept rows per rank (classes * K * rate) from which --large-steps applies")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default: cores / ranks)")
    parser.add_argument("--mem-cap-gib", type=float, default=None,
                        help="CPU address-space cap per rank (default: (RAM - 3 GiB) / ranks); 0 = none")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1e3 classes, K=1, r=1, batch 32, D=64, 1+2 steps")
    parser.add_argument("--out", default=None, help="markdown results file (written atomically)")
    parser.add_argument("--append", action="store_true", help="add this run's report below what --out holds")
    parser.add_argument("--geodesic", action="store_true",
                        help="instead of ours vs base: the extra time and memory of each geodesic penalty "
                             "(intra, inter, triplet, all three) over our head without them")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.subcenters, args.rates = [1e3], [1], [1.0]
        args.batch, args.dim, args.warmup, args.steps = 32, 64, 1, 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.world_size is None:
        args.world_size = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.world_size)
    if args.mem_cap_gib is None:
        # A shared machine: never plan for more than is available now, less 1 GiB of slack.
        usable = min(harness.total_ram_gib() - 3, harness.available_ram_gib() - 1)
        args.mem_cap_gib = 0.0 if args.device == "cuda" else max(1.0, usable / args.world_size)
    for name in ("batch", "dim", "warmup", "steps", "large_steps"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    bad_rates = [r for r in args.rates if not 0 < r <= 1]
    if bad_rates:
        raise ValueError(f"--rates must be in (0, 1], got {bad_rates}")
    return args


def run_case(args, classes: int, subcenters: int, rate: float, impl: str) -> dict:
    """One implementation at one configuration on fresh ranks; the merged per-rank result."""
    kept_rows = classes * subcenters * rate
    state_gib = 2 * classes * subcenters * args.dim * BYTES_FP32 / 2**30
    if args.mem_cap_gib and state_gib + 1.0 > args.mem_cap_gib:
        return {"error": f"skipped: weights+momentum {state_gib:.1f} GiB/rank > cap {args.mem_cap_gib:.1f} GiB"}
    case = dict(
        device=args.device, impl=impl, classes_per_rank=classes, subcenters=subcenters, sample_rate=rate,
        batch=args.batch, dim=args.dim, chunk_size=args.chunk_size,
        warmup=args.large_warmup if kept_rows >= args.large_rows else args.warmup,
        steps=args.large_steps if kept_rows >= args.large_rows else args.steps,
        threads=args.threads, timeout=args.timeout, compute_dtype=args.compute_dtype,
    )
    if args.geodesic:
        case["geodesic"] = args.geodesic_weights
    records = harness.run_ranks(bench_rank, args.world_size, case, mem_cap_gib=args.mem_cap_gib,
                                timeout=args.timeout)
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        partial = [r["partial"] for r in records if r.get("partial")]
        merged = {"error": "OOM" if "OOM" in errors else errors[0]}
        if len(partial) == len(records) and all("fwd_bwd_peak" in p for p in partial):
            # Forward+backward finished on every rank; the update (or a later step) failed.
            merged["error"] += " in update"
            merged.update({key: max(p[key] for p in partial)
                           for key in ("fwd_bwd_peak", "grad_bytes", "kept", "fwd_bwd_s")})
        return merged
    values = [r["value"] for r in records]
    merged = dict(values[0])
    for key in ("step_s", "fwd_bwd_s", "update_s", "fwd_bwd_peak", "update_peak", "grad_bytes", "kept"):
        merged[key] = max(v[key] for v in values)  # slowest / largest rank
    merged["steps"] = case["steps"]
    merged["global_batch"] = args.batch * args.world_size
    return merged


def _mib(value) -> str:
    return "-" if value is None else f"{value / harness.MIB:,.0f}"


def _ratio(ours, base) -> str:
    return f"{ours / base:.2f}" if ours is not None and base else "-"


def _short_error(res: dict) -> str:
    """Table cell for a failed case; the full reason goes to the list under the table."""
    return "skipped" if res["error"].startswith("skipped") else res["error"].split(":")[0][:40]


def _cell_time(res: dict) -> str:
    if "step_s" in res:
        return f"{res['step_s']:.3f}"
    if "fwd_bwd_s" in res:
        return f"{_short_error(res)} (fwd+bwd {res['fwd_bwd_s']:.1f})"
    return _short_error(res)


def _peak(res: dict):
    """Largest memory above weights + momentum over the whole step (both phases)."""
    if "update_peak" in res:
        return max(res["fwd_bwd_peak"], res["update_peak"])
    return None


def _fwd_bwd_extra(res: dict):
    """Forward+backward peak above weights + gradient rows + momentum (the issue-5 bar)."""
    if "fwd_bwd_peak" not in res:
        return None
    return max(0, res["fwd_bwd_peak"] - res["grad_bytes"])


def _optimizer_share(res: dict) -> str:
    """Median update time / median step time: how much of the head step the optimizer takes."""
    return f"{res['update_s'] / res['step_s']:.0%}" if "step_s" in res and res["step_s"] else "-"


def _tflops(res: dict, dim: int, subcenters: int):
    """Useful head FLOP/s on CUDA: logits, dX and dW matmuls (6 B k K D), recomputation not counted."""
    if "step_s" not in res:
        return None
    return 6.0 * res["global_batch"] * res["kept"] * subcenters * dim / res["step_s"] / 1e12


def build_report(args, results: list, command: str) -> str:
    headers = ["classes/rank", "K", "r", "kept rows/rank", "W+M MiB/rank",
               "step s ours", "step s base", "time ratio",
               "peak MiB ours", "peak MiB base", "mem ratio",
               "fwd+bwd extra MiB ours", "fwd+bwd extra MiB base", "optimizer share ours", "optimizer share base"]
    cuda = args.device == "cuda"
    if cuda:
        headers += ["TFLOP/s ours", "% bf16 peak"]
    rows, methods, loss_gaps, failures = [], set(), [], []
    for (classes, subcenters, rate), ours, base in results:
        state_bytes = 2 * classes * subcenters * args.dim * BYTES_FP32
        kept = ours.get("kept") or base.get("kept")
        peak_ours, peak_base = _peak(ours), _peak(base)
        row = [f"{classes:.0e}", subcenters, rate, "-" if kept is None else f"{kept * subcenters:,}",
               _mib(state_bytes), _cell_time(ours), _cell_time(base),
               _ratio(ours.get("step_s"), base.get("step_s")),
               _mib(peak_ours) if peak_ours is not None else _short_error(ours),
               _mib(peak_base) if peak_base is not None else _short_error(base),
               _ratio(peak_ours, peak_base), _mib(_fwd_bwd_extra(ours)), _mib(_fwd_bwd_extra(base)),
               _optimizer_share(ours), _optimizer_share(base)]
        if cuda:
            tflops = _tflops(ours, args.dim, subcenters)
            peak = harness.bf16_peak_tflops(ours.get("device_name", ""))
            row += ["-" if tflops is None else f"{tflops:.1f}",
                    "-" if tflops is None or not peak else f"{100 * tflops / peak:.0f}"]
        rows.append(row)
        for name, res in (("ours", ours), ("base", base)):
            if "error" in res:
                failures.append(f"- {classes:.0e} classes/rank, K = {subcenters}, r = {rate}, {name}: {res['error']}")
        for res in (ours, base):
            if "memory_method" in res:
                methods.add(res["memory_method"] + (" (lower bound)" if res["lower_bound"] else ""))
        if "first_loss" in ours and "first_loss" in base:
            loss_gaps.append(abs(ours["first_loss"] - base["first_loss"]) / abs(base["first_loss"]))

    ours_name = f"impl={args.ours_impl} + RowSparseSGD"
    lines = [
        "# Partial FC head: one training step per rank, ours vs the common approach", "",
        *harness.provenance_lines(command),
        f"- Load average (1 min) at start / end: {args.load_start} / {harness.load_average()} "
        "(other jobs on the machine inflate times, not memory)", "",
        f"Setup: {args.world_size} ranks ({args.device}, {'nccl' if args.device == 'cuda' else 'gloo'}), "
        f"batch {args.batch}/rank (global {args.batch * args.world_size}), D = {args.dim}, ArcFace margin, "
        f"SGD lr 0.1 momentum 0.9 wd 5e-4, fp32 weights, head.compute_dtype {args.compute_dtype}. "
        f"Ours: {ours_name}. Base: impl=naive (full fp32 logits, "
        f"plain autograd) + weight gradient densified (.to_dense()) + torch.optim.SGD. "
        f"Time: median of {args.steps} timed steps after {args.warmup} warm-up "
        f"({args.large_steps} after {args.large_warmup} where kept rows/rank >= {args.large_rows:.0e}), "
        "slowest rank. "
        + (f"CPU threads per rank: {args.threads}; address-space cap per rank: {args.mem_cap_gib:.1f} GiB." if not cuda else ""),
        "",
        "Memory (per rank, largest rank): the baseline is the memory in use after the weights and the momentum "
        "buffer are allocated. 'peak' = highest memory above that baseline over the whole step (forward, "
        "backward, densify, optimizer). 'fwd+bwd extra' = peak of forward+backward minus the weight-gradient "
        "rows backward produced, i.e. what the head needs above weights + grad rows + momentum (issue 5's bar). "
        f"Method: {', '.join(sorted(methods)) or '-'}. "
        + ("On CPU, VmHWM is the kernel's resident-set high-water mark; writing 5 to /proc/self/clear_refs "
           "resets it to the current RSS before each phase, and glibc's free heap is trimmed before the "
           "baseline, so it counts every page the phase touched (torch tensors, gloo buffers, allocator slack). "
           if not cuda else "")
        + "Ratios are ours / base (below 1 = ours is better). 'optimizer share' = median time of the update "
        "(ours: RowSparseSGD.step; base: densify + torch.optim.SGD.step) / median time of the whole step.",
        "",
        harness.markdown_table(headers, rows), "",
    ]
    if failures:
        lines += ["Not measured (where the grid stops, and why; 'OOM in update' = forward+backward finished, "
                  "its numbers are in the row, the optimizer step ran out under the cap):", "", *failures, ""]
    if loss_gaps:
        lines += [f"Sanity: the first-step loss of ours and base agree to a relative {max(loss_gaps):.1e} "
                  "(same seeds, same sampled classes).", ""]
    lines += _bar_section(args, results)
    return "\n".join(lines)


def _bar_section(args, results) -> list[str]:
    """Issue 5's bar at the largest K=1, r=1 configuration run."""
    candidates = [(c, o, b) for (c, k, r), o, b in results if k == 1 and r == 1.0]
    if not candidates:
        return []
    classes, ours, base = max(candidates, key=lambda item: item[0])
    wgm = 3 * classes * args.dim * BYTES_FP32  # weights + all-row grads + momentum at r = 1
    lines = [f"## The bar at {classes:.0e} classes per rank, K = 1, r = 1.0", "",
             f"Weights + grads + momentum = {_mib(wgm)} MiB per rank; the bar is extra <= 0.2 x that "
             f"= {_mib(0.2 * wgm)} MiB.", ""]
    for name, res in (("ours", ours), ("naive", base)):
        extra = _fwd_bwd_extra(res)
        if extra is None:
            lines.append(f"- {name}: forward+backward did not complete ({res.get('error')}).")
        else:
            verdict = "meets" if extra <= 0.2 * wgm else "misses"
            tail = f"; the full step then failed: {res['error']}" if "error" in res else ""
            lines.append(f"- {name}: extra {_mib(extra)} MiB = {extra / wgm:.3f} x (W+G+M), {verdict} the bar{tail}.")
    return lines + [""]


GEODESIC_VARIANTS = {
    "none": {},
    "intra": {"intra_weight": 1.0},
    "inter": {"inter_weight": 1.0},
    "triplet": {"triplet_weight": 1.0},
    "all three": {"intra_weight": 1.0, "inter_weight": 1.0, "triplet_weight": 1.0},
}


def run_geodesic(args, command: str, write=print) -> None:
    """Our head with each geodesic penalty switched on, against the same head without them.

    ``write(report)`` gets the report after every configuration, so a long run keeps what it measured.
    """
    headers = ["classes/rank", "K", "r", "terms", "step s", "extra s", "extra time",
               "fwd+bwd peak MiB", "extra MiB", "extra MiB / W+M"]
    rows, failures, methods = [], [], set()
    for classes in args.classes:
        for subcenters in args.subcenters:
            for rate in args.rates:
                key = (int(classes), subcenters, rate)
                state_bytes = 2 * key[0] * subcenters * args.dim * BYTES_FP32
                results = {}
                for name, weights in GEODESIC_VARIANTS.items():
                    args.geodesic_weights = weights
                    results[name] = res = run_case(args, *key, args.ours_impl)
                    off = results["none"]
                    if "error" in res:
                        failures.append(f"- {key[0]:.0e} classes/rank, K = {subcenters}, r = {rate}, {name}: "
                                        f"{res['error']}")
                        rows.append([f"{key[0]:.0e}", subcenters, rate, name, _cell_time(res)] + ["-"] * 5)
                        continue
                    extra_s = res["step_s"] - off["step_s"] if "step_s" in off else None
                    extra_b = res["fwd_bwd_peak"] - off["fwd_bwd_peak"] if "fwd_bwd_peak" in off else None
                    rows.append([f"{key[0]:.0e}", subcenters, rate, name, f"{res['step_s']:.3f}",
                                 "-" if extra_s is None else f"{extra_s:+.3f}",
                                 "-" if extra_s is None else f"{extra_s / off['step_s']:+.0%}",
                                 _mib(res["fwd_bwd_peak"]), "-" if extra_b is None else f"{extra_b / harness.MIB:+,.0f}",
                                 "-" if extra_b is None else f"{extra_b / state_bytes:+.3f}"])
                    methods.add(res["memory_method"])
                    print(f"classes/rank={key[0]:.0e} K={subcenters} r={rate} {name}: {rows[-1][4]} s, "
                          f"{rows[-1][7]} MiB", flush=True)
                write(_geodesic_report(args, command, headers, rows, failures, methods))


def _geodesic_report(args, command, headers, rows, failures, methods) -> str:
    lines = [
        "# Partial FC head: extra cost of the geodesic penalties (intra, inter, triplet)", "",
        *harness.provenance_lines(command),
        f"- Load average (1 min) at start / end: {args.load_start} / {harness.load_average()}", "",
        f"Setup: {args.world_size} ranks ({args.device}), batch {args.batch}/rank (global "
        f"{args.batch * args.world_size}, identities in pairs so triplets have positives), D = {args.dim}, "
        f"ArcFace, impl={args.ours_impl} + RowSparseSGD, each weight 1.0. One training step of the head "
        f"(forward, backward, optimizer); time: median of {args.steps} steps after {args.warmup} warm-up "
        f"({args.large_steps} after {args.large_warmup} where kept rows/rank >= {args.large_rows:.0e}), slowest "
        f"rank. 'extra' = this row minus the 'none' row of the same configuration (the head without "
        f"penalties). 'fwd+bwd peak' = peak memory of forward+backward above weights + momentum, gradient "
        f"rows included (method: {', '.join(sorted(methods)) or '-'}); 'W+M' = weights + momentum of the "
        "shard.", "",
        harness.markdown_table(headers, rows), "",
    ]
    if failures:
        lines += ["Not measured:", "", *failures, ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    base_impl = "naive"
    results = []
    args.load_start = harness.load_average()
    command = "python benchmarks/head.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    command = command.strip()
    previous = ""
    if args.out and args.append and os.path.exists(args.out):
        with open(args.out) as existing:
            previous = existing.read()
    if args.geodesic:
        def write(report):
            if previous:
                report = previous.rstrip("\n") + "\n\n" + report.replace("# ", "## ", 1)
            harness.write_atomic(args.out, report)

        run_geodesic(args, command, write if args.out else print)
        return
    print(f"# {args.world_size} ranks on {args.device}; columns: ours | base", flush=True)
    for classes in args.classes:
        for subcenters in args.subcenters:
            for rate in args.rates:
                key = (int(classes), subcenters, rate)
                ours = run_case(args, *key, args.ours_impl)
                base = run_case(args, *key, base_impl)
                results.append((key, ours, base))
                if args.out:  # after every configuration, so a long run keeps what it measured
                    write_report(args, results, previous, command)
                print(f"classes/rank={key[0]:.0e} K={subcenters} r={rate}: "
                      f"{_cell_time(ours)} s, {_mib(_peak(ours))} MiB | "
                      f"{_cell_time(base)} s, {_mib(_peak(base))} MiB", flush=True)
    if args.out:
        write_report(args, results, previous, command)
        print(f"wrote {args.out}", flush=True)
    else:
        print(build_report(args, results, command))


def write_report(args, results, previous: str, command: str) -> None:
    report = build_report(args, results, command)
    if previous:
        report = previous.rstrip("\n") + "\n\n" + report.replace("# ", "## ", 1)
    harness.write_atomic(args.out, report)


if __name__ == "__main__":
    main()
