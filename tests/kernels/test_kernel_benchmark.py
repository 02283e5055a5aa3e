"""Smoke test of ``benchmarks/kernel.py``: the documented commands parse and a tiny run reports.

The real grid takes minutes; here one tiny CPU configuration runs end to end (fresh
process per case through the shared harness), and the documented CUDA command is
checked with ``--dry-run``, which plans the cases without touching a device.
"""
from __future__ import annotations

import os
import subprocess
import sys

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
