"""Smoke test of ``benchmarks/optim.py``: a tiny before/after run writes the table.

The committed numbers come from a minutes-long run; here the smallest shard runs end to
end through the shared harness (one fresh process per case), with the row-sparse
optimizer of the working tree against the same file at HEAD, so a change that breaks the
script or the optimizers' constructor signature fails here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "optim.py")


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_before_after_run_writes_the_table(tmp_path):
    out = tmp_path / "optim.md"
    out.write_text("# Earlier results\n\nkept as they were\n")
    done = _run("--impls", "rowsparse", "rowsparse@HEAD", "--rows", "300", "--dim", "8", "--rates", "0.5",
                "--warmup", "0", "--steps", "1", "--accumulate", "2", "--out", str(out), "--append")
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Earlier results\n\nkept as they were\n\n## Row-sparse optimizer")
    for needed in ("- Machine:", "- Commit:", "- Date:", "- Load average", "- Command: `python benchmarks/optim.py"):
        assert needed in text
    header = next(line for line in text.splitlines() if line.startswith("| optimizer |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = [dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|"))))
            for line in text.splitlines() if line.startswith("| sgd |") or line.startswith("| adamw |")]
    assert len(rows) == 4, text
    before = next(name for name in columns if name.startswith("time vs rowsparse@"))
    for row in rows:
        assert float(row["step s"]) >= 0 and row["kept rows/pass"] == "150"
        if "@" in row["impl"]:
            assert row[before] == "1.00"  # the earlier revision against itself
    # Same seeds, same lazy semantics: both revisions end on the same weights.
    gap = float(re.search(r"agree to a relative ([0-9.]+e[+-][0-9]+)", text).group(1))
    assert gap < 1e-6


def test_unknown_revision_is_a_one_line_error():
    done = _run("--impls", "rowsparse@no-such-revision")
    assert done.returncode != 0 and "cannot read partialfc/optim.py at 'no-such-revision'" in done.stderr
    assert "Traceback" not in done.stderr
