"""Compose ``gpu.md`` from one ``run_all.sh`` run: versions, step status, tests, bars, tables.

Why a separate step: the GPU session has minutes, so run_all.sh only measures and this
writes what the next reader needs in one file -- which steps finished, the pytest
verdict, issue 15's kernel bars checked against the measured numbers, the fastest impl
per shape (to fill ``partialfc.kernels.AUTO_TABLE``), then the kernel and head reports
as the benchmarks wrote them. It never fails on a missing piece: a step that did not
finish is reported as such.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

if os.path.dirname(os.path.dirname(os.path.abspath(__file__))) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402  (benchmarks/harness.py; benchmarks/ is not a package)
import kernel  # noqa: E402  (benchmarks/kernel.py)

# pytest's closing line, e.g. "=== 3 failed, 50 passed in 80.1s ===" or "56 skipped in 5.3s".
VERDICT = re.compile(r"^=*\s*(\d+ (passed|failed|skipped|errors?|deselected)\b.*) in [\d.]+s")
# Issue 15's bars for the statistics op alone: (K, fwd+bwd ms) at B 1024, D 512, n 1e6, r 1, bf16.
KERNEL_BARS = ((1, 10.0), (3, 30.0))


def _read(path: str) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as handle:
        return handle.read()


def status_lines(path: str) -> list[str]:
    rows = []
    for line in _read(path).splitlines():
        name, code, seconds, command = (line.split("\t", 3) + ["", "", ""])[:4]
        verdict = {"0": "ok", "124": "TIMED OUT", "137": "KILLED (timeout)"}.get(code, f"FAILED (exit {code})")
        rows.append([name, verdict, seconds, f"`{command}`"])
    return [harness.markdown_table(["step", "result", "seconds", "command"], rows)] if rows else ["(no steps ran)"]


def test_lines(log: str) -> list[str]:
    """pytest's final verdict line and every FAILED / ERROR line (the log has the details)."""
    text = _read(log)
    if not text:
        return ["- no test log"]
    verdicts = [line.strip("= ") for line in text.splitlines() if VERDICT.search(line)]
    problems = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    lines = [f"- pytest: {verdict}" for verdict in verdicts] or ["- pytest: no verdict line (stopped early? "
                                                                 "see tests.log)"]
    lines += [f"  - {line[:200]}" for line in problems[:40]]
    return lines


def _timed(results, impl, classes, subs):
    for res in results:
        if (res.get("impl") == impl and res.get("classes") == classes and res.get("subcenters") == subs
                and res.get("batch") == 1024 and res.get("sample_rate") == 1.0 and "forward_s" in res):
            return res
    return None


def kernel_bar_lines(json_path: str) -> list[str]:
    """Issue 15's kernel bars against kernel.json, and the K = 3 vs K = 1 efficiency."""
    text = _read(json_path)
    if not text:
        return ["- no kernel results (kernel.json missing)"]
    data = json.loads(text)
    results = data.get("results", [])
    impls = list(dict.fromkeys(r["impl"] for r in results))
    lines = []
    for subs, bar_ms in KERNEL_BARS:
        timed = [(impl, _timed(results, impl, 1_000_000, subs)) for impl in impls]
        timed = [(impl, res) for impl, res in timed if res]
        if not timed:
            lines.append(f"- fwd+bwd at n 1e6, K {subs}: not measured")
            continue
        impl, best = min(timed, key=lambda item: item[1]["forward_s"] + item[1]["backward_s"])
        total_ms = 1e3 * (best["forward_s"] + best["backward_s"])
        verdict = "meets" if total_ms <= bar_ms else "misses"
        others = ", ".join(f"{name} {1e3 * (res['forward_s'] + res['backward_s']):.1f}" for name, res in timed)
        lines.append(f"- fwd+bwd at n 1e6, K {subs}: best {impl} {total_ms:.1f} ms, {verdict} the bar "
                     f"(<= {bar_ms:.0f} ms); all (ms): {others}")
    for impl in impls:
        one, three = _timed(results, impl, 1_000_000, 1), _timed(results, impl, 1_000_000, 3)
        if one and three:
            lines.append(f"- {impl}: fwd+bwd TFLOP/s at n 1e6, K 1 / K 3 = {one['step_tflops']:.0f} / "
                         f"{three['step_tflops']:.0f}; forward {1e3 * one['forward_s']:.2f} / "
                         f"{1e3 * three['forward_s']:.2f} ms")
    if data.get("matmul_tflops"):
        lines.append(f"- denominator (bf16 torch.matmul 8192^3, this run): {data['matmul_tflops']:.0f} TFLOP/s")
    fastest = kernel.fastest_per_shape(results)
    if fastest:
        lines += ["", "Fastest impl per shape over all kernel runs (for partialfc.kernels.AUTO_TABLE):", "", *fastest]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="gpu.md to write")
    parser.add_argument("--status", required=True, help="run_all.sh's step table (tab-separated)")
    parser.add_argument("--versions", default="", help="markdown lines: versions and device")
    parser.add_argument("--tests-log", default="")
    parser.add_argument("--kernel-json", default="")
    parser.add_argument("--kernel-md", default="")
    parser.add_argument("--head-md", default="")
    parser.add_argument("--command", default="", help="how run_all.sh was invoked")
    parser.add_argument("--elapsed", default="?", help="seconds the whole run took")
    args = parser.parse_args(argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Issue 15 on a GPU: tests and benchmarks of the margin-softmax head", "",
        f"- Commit: {harness.git_commit()}", f"- Date: {date}", f"- Command: `{args.command}`",
        f"- Wall time of the whole run: {args.elapsed} s",
        *(_read(args.versions).strip().splitlines() or ["- versions: not recorded"]), "",
        "## Steps", "", *status_lines(args.status), "",
        "## CUDA tests (`pytest -m cuda`)", "", *test_lines(args.tests_log), "",
        "## Kernel bars (statistics op, B 1024, D 512, bf16, ArcFace, r 1)", "", *kernel_bar_lines(args.kernel_json),
        "",
    ]
    for title, path in (("Kernel benchmark", args.kernel_md), ("Head benchmark", args.head_md)):
        text = _read(path).strip()
        # Demote the reports' own headings below this file's sections.
        body = "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())
        lines += [f"## {title}", "", body or "(not written: see the step table and its log)", ""]
    harness.write_atomic(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
