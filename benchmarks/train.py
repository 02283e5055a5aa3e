"""End-to-end training throughput: the ddp engine vs the deepspeed engine, same run.

Runs the real entrypoint (``torchrun -m partialfc.train``) once per engine on the same
config and reads the run's ``metrics.jsonl``: images/s per log window (all ranks) and
the share of wall time the step loop waited for data. The first window (start-up,
DeepSpeed's set-up) is dropped; the table reports the median of the rest.

    python benchmarks/train.py                     # CPU demo, 2 gloo ranks
    python benchmarks/train.py --nproc 8 --config configs/ms1mv3_r100.toml --steps 200   # a GPU node
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import harness

ENGINES = {
    "ddp": ["train.engine=ddp"],
    "deepspeed (ZeRO-1)": ["train.engine=deepspeed", "train.zero_stage=1"],
    "deepspeed (ZeRO-2)": ["train.engine=deepspeed", "train.zero_stage=2"],
}


def run(config: str, nproc: int, steps: int, log_every: int, overrides: list[str], output: str) -> list[dict]:
    sets = overrides + [f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.output={output}",
                        "train.checkpoint_every=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "partialfc.train", config, *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(cmd, cwd=harness.REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "images_per_s" in r]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results/train.md")
    args = parser.parse_args(argv)

    rows = []
    for engine in args.engines:
        with tempfile.TemporaryDirectory() as output:
            records = run(args.config, args.nproc, args.steps, args.log_every, args.overrides + ENGINES[engine],
                          output)
        steady = records[1:] or records
        images = statistics.median(r["images_per_s"] for r in steady)
        wait = statistics.median(r["data_wait_share"] for r in steady)
        rows.append([engine, f"{images:.1f}", f"{100 * wait:.1f} %", f"{records[-1]['loss']:.4f}"])
        print(f"{engine}: {images:.1f} img/s, data wait {100 * wait:.1f} %", flush=True)
    base = float(rows[0][1])
    for row in rows:
        row.insert(2, f"{float(row[1]) / base:.2f}")
    command = "python benchmarks/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "# End-to-end training throughput: ddp vs deepspeed", "",
        *harness.provenance_lines(command.strip()), f"- Load average (1 min): {harness.load_average()}", "",
        f"Config `{args.config}`, {args.nproc} ranks, {args.steps} steps, median over log windows of "
        f"{args.log_every} steps after the first. Images/s counts all ranks; data wait = share of the step "
        "loop's wall time spent waiting for the next batch.", "",
        harness.markdown_table(["engine", "images/s", "vs ddp", "data wait", "final loss"], rows), "",
    ])
    harness.write_atomic(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
