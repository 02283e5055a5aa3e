"""Smoke test of ``benchmarks/kernel.py``: the documented commands parse and a tiny run reports.

The real grid takes minutes; here one tiny CPU configuration runs end to end (fresh
process per case through the shared harness), and the documented CUDA command is
checked with ``--dry-run``, which plans the cases without touching a device.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "kernel.py")


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the benchmark runs real paths, not the interpreter
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_documented_cuda_command_parses_without_a_gpu():
    done = _run("--device", "cuda", "--impls", "triton", "torch", "--dtype", "bfloat16", "--batch", "1024",
                "--classes", "1e5", "1e6", "--subcenters", "1", "3", "--sample-rate", "1.0", "--repeats", "10",
                "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "8 cases x 1 round(s) on cuda; nothing run" in done.stdout
    # Without --dry-run the CUDA branch is chosen at run time and refuses cleanly here.
    import torch

    if not torch.cuda.is_available():
        done = _run("--device", "cuda", "--classes", "1e3")
        assert done.returncode != 0 and "needs a visible GPU" in done.stderr


def test_tiny_cpu_run_writes_the_table(tmp_path):
    out = tmp_path / "kernel.md"
    done = _run("--impls", "torch", "naive", "--batch", "8", "--dim", "16", "--classes", "300",
                "--subcenters", "1", "3", "--sample-rate", "0.5", "--repeats", "1", "--threads", "1",
                "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    for needed in ("- Machine:", "- Commit:", "- Date:", "- Load average", "- Command: `python benchmarks/kernel.py"):
        assert needed in text
    rows = [line for line in text.splitlines() if line.startswith("| torch |") or line.startswith("| naive |")]
    assert len(rows) == 4, text
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[5]) > 0  # fwd+bwd seconds: the case ran
    naive_rows = [row for row in rows if row.startswith("| naive |")]
    assert all("| 1.00 |" in row for row in naive_rows)  # vs naive, of naive itself
    gap = float(text.split("agree to a relative ")[1].split(".\n")[0].rstrip("."))
    assert gap < 1e-5


def _benchmark_module(name):
    benchmarks = os.path.join(REPO, "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    return importlib.import_module(name)


def _fake_cuda_result(impl, subs, forward_ms, backward_ms):
    flops = 2.0 * 1024 * 1_000_000 * subs * 512
    forward_s, backward_s = forward_ms / 1e3, backward_ms / 1e3
    return dict(impl=impl, batch=1024, classes=1_000_000, subcenters=subs, sample_rate=1.0, errors=[],
                forward_s=forward_s, backward_s=backward_s, forward_tflops=flops / forward_s / 1e12,
                backward_tflops=2 * flops / backward_s / 1e12, step_tflops=3 * flops / (forward_s + backward_s) / 1e12,
                peak_extra_bytes=2**30, grad_rows_bytes=2**31, lse_sum=1.0 + 1e-7 * subs, seconds=0.1)


def test_cuda_report_and_summary_from_recorded_results(tmp_path):
    """The GPU-only report code (no GPU here): tables, fastest impl per shape, issue 15's bars."""
    kernel = _benchmark_module("kernel")
    results = [_fake_cuda_result("gemm", 1, 3.0, 6.0), _fake_cuda_result("naive", 1, 40.0, 84.0),
               _fake_cuda_result("gemm", 3, 12.0, 24.0), _fake_cuda_result("naive", 3, 120.0, 250.0),
               dict(impl="triton", batch=1024, classes=1_000_000, subcenters=3, sample_rate=1.0, errors=["OOM"])]
    args = argparse.Namespace(repeats=5, warmup=2, dtype="bfloat16", matmul_tflops=700.0, device="cuda")
    report = kernel.build_report(args, results, "python benchmarks/kernel.py --device cuda", "0.1")
    assert "Denominator: bf16 torch.matmul 8192^3 in this run = 700 TFLOP/s" in report
    row = next(line for line in report.splitlines() if line.startswith("| gemm | 1024 | 1e+06 | 1 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[5:9] == ["3.00", "6.00", "9.00", "0.07"]  # fwd, bwd, total ms, vs naive (9 / 124)
    assert float(cells[-1]) == pytest.approx(100 * 3 * 2 * 1024 * 1e6 * 512 / 9e-3 / 1e12 / 700, abs=0.05)
    assert "| triton | 1024 | 1e+06 | 3 | 1.0 | OOM |" in report
    assert "- B 1024, 1e+06 classes, K 1, r 1.0: gemm (9.0 ms)" in report

    # benchmarks/gpu is not a package: load summarize.py by path.
    spec = importlib.util.spec_from_file_location("summarize", os.path.join(REPO, "benchmarks", "gpu", "summarize.py"))
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    (tmp_path / "kernel.json").write_text(json.dumps(dict(matmul_tflops=700.0, results=results)))
    (tmp_path / "status.tsv").write_text("tests\t0\t95\tpytest -m cuda\n"
                                         "kernel\t124\t190\tpython benchmarks/kernel.py\n")
    (tmp_path / "tests.log").write_text("FAILED tests/kernels/test_cuda.py::test_x - boom\n"
                                        "=== 1 failed, 55 passed in 80.1s ===\n")
    (tmp_path / "kernel.md").write_text(report)
    summarize.main(["--out", str(tmp_path / "gpu.md"), "--status", str(tmp_path / "status.tsv"),
                    "--tests-log", str(tmp_path / "tests.log"), "--kernel-json", str(tmp_path / "kernel.json"),
                    "--kernel-md", str(tmp_path / "kernel.md"), "--command", "bash benchmarks/gpu/run_all.sh out"])
    text = (tmp_path / "gpu.md").read_text()
    assert "| kernel | TIMED OUT | 190 |" in text
    assert "- pytest: 1 failed, 55 passed in 80.1s" in text and "FAILED tests/kernels/test_cuda.py::test_x" in text
    assert "K 1: best gemm 9.0 ms, meets the bar (<= 10 ms)" in text
    assert "K 3: best gemm 36.0 ms, misses the bar (<= 30 ms)" in text
    assert "### Margin-softmax statistics on CUDA" in text  # the report, demoted below gpu.md's sections
    assert "(not written: see the step table and its log)" in text  # no head report
