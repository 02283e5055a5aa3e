"""Smoke test of the head benchmark and checks of the harness it stands on.

The benchmark itself is too slow for CI at real sizes; ``--quick`` runs the smallest
configuration on 2 gloo ranks end to end, so a change that breaks the script (or the
head's public signature it uses) fails here. The harness's memory meter is checked
against a known allocation, because every committed memory number depends on it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import harness  # noqa: E402


def test_markdown_table_layout_and_row_check():
    text = harness.markdown_table(["a", "bb"], [[1, "x"], [2.5, "y"]])
    assert text.splitlines() == ["| a | bb |", "|---|---|", "| 1 | x |", "| 2.5 | y |"]
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        harness.markdown_table(["a", "bb"], [[1]])


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.md"
    target.write_text("old")
    harness.write_atomic(str(target), "new text\n")
    assert target.read_text() == "new text\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.md"]


def test_peak_memory_sees_a_known_allocation():
    meter = harness.PeakMemory(torch.device("cpu"))
    meter.set_baseline()
    size_mib = 96 + (os.getpid() % 7) * 8  # an odd size, so a constant answer cannot pass
    with meter.phase() as peak:
        block = torch.ones(size_mib * harness.MIB // 4)  # touched pages: all resident
        del block
    measured = peak["bytes"] / harness.MIB
    if meter.lower_bound:
        assert measured <= size_mib + 16
    else:
        assert size_mib - 1 <= measured <= size_mib + 16, (size_mib, measured)


def test_head_benchmark_quick_writes_the_table(tmp_path):
    out = tmp_path / "head.md"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "head.py"), "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    for needed in ("- Machine:", "- Commit:", "- Date:", "- Command: `python benchmarks/head.py --quick"):
        assert needed in text
    header = next(line for line in text.splitlines() if line.startswith("| classes/rank"))
    assert "step s ours" in header and "time ratio" in header and "optimizer share ours" in header
    row = next(line for line in text.splitlines() if line.startswith("| 1e+03 | 1 | 1.0 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    by_name = dict(zip(columns, cells))
    step_ours, step_base = float(by_name["step s ours"]), float(by_name["step s base"])
    assert step_ours > 0 and step_base > 0
    # The times are printed to 3 decimals (ms) and quick steps last a few ms, so bound the
    # ratio by the rounding of both times, plus the ratio's own rounding to 2 decimals.
    low = (step_ours - 0.0005) / (step_base + 0.0005) - 0.005
    high = (step_ours + 0.0005) / (step_base - 0.0005) + 0.005
    assert low <= float(by_name["time ratio"]) <= high, (by_name, low, high)
    assert by_name["kept rows/rank"] == "1,000"
    assert 0 < float(by_name["optimizer share ours"].rstrip("%")) < 100
    # Both paths see the same seeds and classes, so the report's loss check must be tight.
    gap = float(re.search(r"agree to a relative ([0-9.e+-]+)", text).group(1))
    assert gap < 1e-4


def test_train_benchmark_ceiling_mode_quick_writes_the_table(tmp_path):
    """The GPU benchmark's code path (backbone-alone ceiling, then the real Trainer), at
    CPU smoke sizes: the report must hold one row with both throughputs and their ratio."""
    out = tmp_path / "train_ceiling.md"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "train.py"), "--mode", "ceiling", "--device", "cpu",
         "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "- Command: `python benchmarks/train.py --mode ceiling --device cpu --quick" in text
    header = next(line for line in text.splitlines() if line.startswith("| backbone"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    row = next(line for line in text.splitlines() if line.startswith("| mobilefacenet_tiny"))
    by_name = dict(zip(columns, (cell.strip() for cell in row.strip("|").split("|"))))
    ceiling, trainer = float(by_name["ceiling img/s"]), float(by_name["trainer img/s"])
    assert ceiling > 0 and trainer > 0
    # The ratio is printed from unrounded throughputs: bound it by the rounding of both.
    low, high = (trainer - 0.5) / (ceiling + 0.5) - 0.005, (trainer + 0.5) / max(ceiling - 0.5, 1e-9) + 0.005
    assert low <= float(by_name["trainer / ceiling"]) <= high, by_name
    assert by_name["memory format"] == "NCHW"  # auto is off on CPU
    assert "Failures:" not in text
