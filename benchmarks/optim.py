"""Benchmark of the head's optimizer step alone: time and peak extra memory per implementation.

What it answers (issue 15): what does one ``RowSparseSGD`` / ``RowSparseAdamW`` step cost
on a head shard, in time and in memory above the weights, the optimizer state and the
gradient, and how does that compare with the implementation at an earlier revision
(``rowsparse@REV``) and with the common approach (``torch``: the gradient densified with
``.to_dense()`` and stepped by ``torch.optim.SGD`` / ``AdamW``), all in one run.

How it measures:

* Every (case, implementation) runs in a fresh process (``harness.run_ranks`` with one
  rank), under an address-space cap on CPU, so nothing carries over between them.
* The gradient reaches ``.grad`` the way the head's does: a backward pass whose
  ``autograd.Function`` returns a sparse COO tensor over sorted kept rows (which autograd
  stores without the "coalesced" flag). Kept rows are a sorted random subset of
  ``rate * rows`` rows, all rows at ``rate = 1``. ``--accumulate A`` runs A backward
  passes with different subsets before each step (gradient accumulation: duplicated,
  unordered rows that must be summed).
* Weights, state (pre-filled with zeros, so the first step allocates nothing) and the
  gradient exist before the baseline; the peak is ``harness.PeakMemory`` around
  ``optimizer.step()`` (the densify of ``torch`` included), the largest over the timed steps.
* Time: median over ``--steps`` steps after ``--warmup``; ``cpu s`` is the process CPU
  time (other jobs on a shared box inflate it less than wall time).
* ``rowsparse@REV`` loads ``partialfc/optim.py`` as it was at git revision REV. Every
  implementation starts from the same seeds; the report states how far the row-sparse
  ones' final weights disagree (``torch`` decays unsampled rows too, so it differs at r < 1).

CPU (what results/head.md's "Row-sparse optimizer" section holds):
    python benchmarks/optim.py --impls rowsparse rowsparse@2d5de25 torch --rows 1e5 --dim 512 \
        --rates 0.1 1.0 --optimizers sgd adamw --out benchmarks/results/head.md --append
"""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import statistics
import sys
import time

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (sibling module; benchmarks/ is not a package)

IMPLS = ("rowsparse", "torch")
OPTIM_PATH = "partialfc/optim.py"
SETTINGS = {"sgd": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
            "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)}


# ------------------------------------------------------------------ implementations
def optimizer_class(spec: str, name: str):
    """The optimizer class behind an ``--impls`` entry for ``name`` (sgd or adamw)."""
    if spec == "torch":
        return {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    if spec == "rowsparse":
        from partialfc import optim as module
    else:
        module = harness.module_at_revision(OPTIM_PATH, spec.split("@", 1)[1], "optim_at_revision")
    return {"sgd": module.RowSparseSGD, "adamw": module.RowSparseAdamW}[name]


def check_impl_spec(spec: str) -> str:
    """argparse type: a known impl, or rowsparse@REV with REV readable by git (named by its short hash)."""
    return harness.revision_spec(spec, IMPLS, "rowsparse", OPTIM_PATH)


class _RowGradient(torch.autograd.Function):
    """Backward hands ``weight`` a sparse COO gradient over sorted ``rows``, as the head's does."""

    @staticmethod
    def forward(ctx, weight, rows, values):
        ctx.save_for_backward(rows, values)
        ctx.shape = tuple(weight.shape)
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output):
        rows, values = ctx.saved_tensors
        grad = torch.sparse_coo_tensor(rows[None], values, ctx.shape, is_coalesced=True, check_invariants=False)
        return grad, None, None


# ------------------------------------------------------------------ one case, one process
def bench_case(rank: int, world_size: int, partial: dict, case: dict) -> dict:
    """Weights, state and gradient first; then the peak memory and time of each optimizer step."""
    device = torch.device(case["device"])
    if device.type == "cpu" and case["threads"]:
        torch.set_num_threads(case["threads"])
    rows, dim, name, impl = case["rows"], case["dim"], case["optimizer"], case["impl"]
    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(rows, dim, device=device, generator=generator) * 0.01)
    optimizer = optimizer_class(impl, name)([weight], **SETTINGS[name])
    state = optimizer.state[weight]
    if name == "sgd":
        state["momentum_buffer"] = torch.zeros_like(weight)
    else:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(weight), torch.zeros_like(weight)
        if impl == "torch":
            state["step"] = torch.zeros((), dtype=torch.float32)
        else:
            state["row_step"] = torch.zeros(rows, dtype=torch.float64, device=device)
    kept = max(1, round(case["rate"] * rows))

    def make_grad():
        weight.grad = None
        for _ in range(case["accumulate"]):
            if kept == rows:
                index = torch.arange(rows, device=device)
            else:
                index = torch.randperm(rows, device=device, generator=generator)[:kept].sort().values
            values = torch.randn(kept, dim, device=device, generator=generator)
            _RowGradient.apply(weight, index, values).backward()

    make_grad()
    meter = harness.PeakMemory(device)
    meter.set_baseline()  # weights + state + one step's gradient
    wall, cpu, peaks = [], [], []
    for step in range(case["warmup"] + case["steps"]):
        if step:
            make_grad()
        with meter.phase() as peak:
            harness.synchronize(device)
            begin, begin_cpu = time.perf_counter(), time.process_time()
            if impl == "torch":
                weight.grad = weight.grad.to_dense()  # what the common approach holds and steps
            optimizer.step()
            harness.synchronize(device)
            end, end_cpu = time.perf_counter(), time.process_time()
        if step >= case["warmup"]:
            wall.append(end - begin)
            cpu.append(end_cpu - begin_cpu)
            peaks.append(peak["bytes"])
            partial["peak_bytes"] = max(peaks)
    return {
        "seconds": statistics.median(wall),
        "cpu_seconds": statistics.median(cpu),
        "peak_bytes": max(peaks),
        "weight_bytes": weight.numel() * weight.element_size(),
        "kept": kept,
        "weight_sum": float(weight.detach().double().sum()),
        "memory_method": meter.method,
    }


# ------------------------------------------------------------------ driver
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--impls", nargs="+", default=["rowsparse", "torch"], type=check_impl_spec,
                        help=f"any of {IMPLS}, or rowsparse@REV: partialfc/optim.py at git revision REV")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=("sgd", "adamw"))
    parser.add_argument("--rows", nargs="+", type=float, default=[1e5], help="rows of the head shard (classes * K)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rates", nargs="+", type=float, default=[0.1, 1.0], help="fraction of rows kept per step")
    parser.add_argument("--accumulate", type=int, default=1, help="backward passes per step (gradient accumulation)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--threads", type=int, default=1, help="CPU torch threads (default 1: one rank's share)")
    parser.add_argument("--mem-cap-gb", type=float, default=8.0, help="CPU address-space cap per case; 0 = none")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    parser.add_argument("--out", help="write the report (markdown) here, atomically")
    parser.add_argument("--append", action="store_true", help="add the report below what --out holds")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a visible GPU")
    bad = [r for r in args.rates if not 0 < r <= 1]
    if bad:
        parser.error(f"--rates must be in (0, 1], got {bad}")
    for option in ("dim", "accumulate", "steps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be >= 1, got {getattr(args, option)}")
    return args


def make_cases(args) -> list[dict]:
    return [dict(device=args.device, impl=impl, optimizer=name, rows=int(rows), dim=args.dim, rate=rate,
                 accumulate=args.accumulate, warmup=args.warmup, steps=args.steps, threads=args.threads)
            for name, rows, rate, impl in itertools.product(args.optimizers, args.rows, args.rates, args.impls)]


def _shape(case: dict) -> tuple:
    return case["optimizer"], case["rows"], case["rate"]


def run_cases(args, cases: list[dict]) -> list[dict]:
    results = []
    for case in cases:
        load = harness.load_average()
        record = harness.run_ranks(bench_case, 1, case, mem_cap_gib=args.mem_cap_gb if args.device == "cpu" else 0,
                                   timeout=args.timeout)[0]
        result = dict(case, load=load, **record.get("value", {}))
        if "error" in record:
            result["error"] = record["error"]
        results.append(result)
        shown = (f"{result['seconds']:.4f} s, {result['peak_bytes'] / harness.MIB:.0f} MiB"
                 if "seconds" in result else result["error"])
        print(f"{case['impl']:>20} {case['optimizer']} rows={case['rows']:.0e} r={case['rate']}: {shown} "
              f"(load {load})", flush=True)
    return results


def build_report(args, results: list[dict], command: str, load_start: str) -> str:
    before = next((impl for impl in args.impls if "@" in impl), None)
    reference = {_shape(r): r for r in results if r["impl"] == before and "seconds" in r}
    headers = ["optimizer", "rows", "r", "kept rows/pass", "impl", "step s", "cpu s", "peak extra MiB",
               "extra / weights"]
    if before:
        headers += [f"time vs {before}", f"memory vs {before}"]
    headers.append("load")
    rows, spread = [], []
    for res in results:
        head = [res["optimizer"], f"{res['rows']:.0e}", res["rate"],
                f"{max(1, round(res['rate'] * res['rows'])):,}", res["impl"]]
        if "seconds" not in res:
            rows.append(head + [res["error"]] + ["-"] * (len(headers) - len(head) - 2) + [res["load"]])
            continue
        row = head + [f"{res['seconds']:.4f}", f"{res['cpu_seconds']:.4f}", f"{res['peak_bytes'] / harness.MIB:,.1f}",
                      f"{res['peak_bytes'] / res['weight_bytes']:.3f}"]
        if before:
            base = reference.get(_shape(res))
            row += [f"{res['seconds'] / base['seconds']:.2f}" if base else "-",
                    f"{res['peak_bytes'] / base['peak_bytes']:.3f}" if base and base["peak_bytes"] else "-"]
        rows.append(row + [res["load"]])
        # torch.optim decays every row of a dense gradient, so only lazy impls must agree.
        same = [r["weight_sum"] for r in results
                if _shape(r) == _shape(res) and "weight_sum" in r and r["impl"].startswith("rowsparse")]
        if same:
            spread.append((max(same) - min(same)) / max(max(abs(v) for v in same), 1e-30))
    method = next((r["memory_method"] for r in results if "memory_method" in r), "-")
    settings = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in SETTINGS[name].items())
                         for name in args.optimizers)
    lines = [
        "# Row-sparse optimizer: the update step alone", "",
        *harness.provenance_lines(command),
        f"- Load average (1 min) at start / end: {load_start} / {harness.load_average()}", "",
        f"One optimizer step on a ({'/'.join(f'{r:.0e}' for r in args.rows)} x {args.dim}) fp32 head shard, "
        f"{args.device}, {args.threads} thread(s); {settings}. The gradient arrives through autograd as the "
        f"head's does (sparse COO over sorted kept rows, {args.accumulate} backward pass(es) per step). "
        "'rowsparse' is partialfc.optim now, 'rowsparse@REV' the same file at git revision REV, 'torch' the "
        "gradient densified and stepped by torch.optim. 'peak extra' = highest memory during the step above "
        f"weights + state + gradient ({method}), the largest over {args.steps} timed steps after {args.warmup} "
        "warm-up; 'step s' / 'cpu s' = median wall / process CPU time. Ratios divide by the earlier "
        "revision's number at the same shape (below 1 = better now). 'load' = 1-min load average as the "
        f"case started. Sanity: at every shape the rowsparse impls' final weight sums agree to a relative "
        f"{max(spread, default=0.0):.1e}.", "",
        harness.markdown_table(headers, rows), "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    load_start = harness.load_average()
    results = run_cases(args, make_cases(args))
    command = "python benchmarks/optim.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = build_report(args, results, command, load_start)
    print(report)
    if args.out:
        previous = ""
        if args.append and os.path.exists(args.out):
            with open(args.out) as handle:
                previous = handle.read().rstrip("\n") + "\n\n"
            report = report.replace("# ", "## ", 1)  # a section of the file it joins
        harness.write_atomic(args.out, previous + report)
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
