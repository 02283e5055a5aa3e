"""End-to-end training throughput, two modes.

``--mode engines`` (the default on CPU): the ddp engine vs the deepspeed engine on the
same config. Runs the real entrypoint (``torchrun -m partialfc.train``) once per engine
and reads the run's ``metrics.jsonl``: images/s per log window (all ranks) and the
share of wall time the step loop waited for data. The first window (start-up,
DeepSpeed's set-up) is dropped; the table reports the median of the rest.

``--mode ceiling`` (the default with ``--device cuda``; issue 16): for each backbone and
head shape, in one process and one run,

* the backbone-alone ceiling: the backbone with the trainer's batch, precision and
  memory format, forward + backward + SGD step on one fixed batch already on the
  device -- no data, no head: what the GPU can do;
* the trainer: the real ``Trainer`` (one rank, synthetic data made on the device)
  on the same backbone with the Partial FC head, its images/s per log window (median
  after the first), its data-wait share and, when the trainer logs one, its step-time
  breakdown (``metrics.jsonl``'s ``breakdown``: ``StepTimer.summary()["phases"]``).

The report gives trainer / ceiling and checks issue 16's bars: >= 0.90x the ceiling
measured in the same run, data wait <= 5 % of the step.

    python benchmarks/train.py                                    # CPU: engines, 2 gloo ranks
    python benchmarks/train.py --device cuda                      # one GPU: ceiling vs trainer
    python benchmarks/train.py --mode ceiling --device cpu --quick  # smoke run of the GPU path
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import harness

ENGINES = {
    "ddp": ["train.engine=ddp"],
    "deepspeed (ZeRO-1)": ["train.engine=deepspeed", "train.zero_stage=1"],
    "deepspeed (ZeRO-2)": ["train.engine=deepspeed", "train.zero_stage=2"],
}
# Issue 16's shapes: (classes, sample rate).
HEADS = [(1_000_000, 0.1), (100_000, 1.0)]
BACKBONES = ["iresnet50", "iresnet100"]
RATIO_BAR, WAIT_BAR = 0.90, 0.05
BREAKDOWN = ("data_wait", "backbone_forward", "backbone_backward", "head", "communication", "optimizer", "other")


# ---------------------------------------------------------------------- engines mode
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


def engines_report(args, command: str) -> str:
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
    return "\n".join([
        "# End-to-end training throughput: ddp vs deepspeed", "",
        *harness.provenance_lines(command), f"- Load average (1 min): {harness.load_average()}", "",
        f"Config `{args.config}`, {args.nproc} ranks, {args.steps} steps, median over log windows of "
        f"{args.log_every} steps after the first. Images/s counts all ranks; data wait = share of the step "
        "loop's wall time spent waiting for the next batch.", "",
        harness.markdown_table(["engine", "images/s", "vs ddp", "data wait", "final loss"], rows), "",
    ])


# ---------------------------------------------------------------------- ceiling mode
def backbone_ceiling(name: str, *, device, batch: int, amp: str, channels_last: bool, compile_mode: str,
                     warmup: int, iters: int) -> float:
    """Images/s of the backbone alone: forward + backward + SGD on one batch on the device."""
    import torch

    from partialfc.models import build_backbone
    from partialfc.models.memory_format import images_to_channels_last, module_to_channels_last
    from partialfc.optim import build_optimizer

    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=512, amp_dtype=None if amp == "none" else amp).to(device)
    images = torch.randn(batch, 3, 112, 112, device=device)
    if channels_last:
        module_to_channels_last(model)
        images = images_to_channels_last(images)
    grad = torch.randn(batch, 512, device=device) / batch  # a fixed dL/d embedding, as the head would send
    trained = torch.compile(model) if compile_mode == "backbone" else model
    optimizer = build_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], lr=0.01,
                                momentum=0.9, weight_decay=5e-4)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        trained(images).backward(grad)
        optimizer.step()

    for _ in range(warmup):
        step()
    harness.synchronize(device)
    begin = time.perf_counter()
    for _ in range(iters):
        step()
    harness.synchronize(device)
    seconds = time.perf_counter() - begin
    del model, trained, optimizer, images, grad
    return batch * iters / seconds


def _scratch_root(needed_bytes: int):
    """/dev/shm when it has twice the room needed, else the default temp dir (None)."""
    import shutil

    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > 2 * needed_bytes else None
    except OSError:
        return None


def trainer_run(*, backbone: str, classes: int, rate: float, device, batch: int, amp: str, channels_last: str,
                compile_mode: str, steps: int, log_every: int, head_dtype: str, embedding: int,
                extra: list[str]) -> dict:
    """The real Trainer, one rank, synthetic data on the device; its metrics.jsonl windows."""
    from partialfc.config import load_config
    from partialfc.distributed.runtime import Runtime
    from partialfc.trainer import Trainer

    # The run ends with a checkpoint (head weights + momentum: 4 GiB at 1 M classes): on
    # tmpfs when it has room, so the benchmark does not wait on a disk's fsync.
    checkpoint_bytes = 4 * 2 * classes * embedding + 8 * 10**8
    with tempfile.TemporaryDirectory(prefix="pfc_train_bench_", dir=_scratch_root(checkpoint_bytes)) as workdir:
        config_path = os.path.join(workdir, "bench.toml")
        with open(config_path, "w") as handle:
            handle.write('name = "bench_train"\n')
        output = os.path.join(workdir, "run")
        # Enough samples for the steps in one epoch; labels cover min(samples, classes) ids.
        num_samples = max(batch * (steps + 1), min(classes, 1 << 20))
        overrides = [
            f"model.backbone={backbone}", f"model.embedding_size={embedding}",
            f"head.sample_rate={rate}", f'head.compute_dtype="{head_dtype}"',
            'data.format="synthetic"', f"data.num_classes={classes}", f"data.batch_size={batch}",
            f"data.num_samples={num_samples}",
            f'train.amp="{amp}"', f'train.device="{device.type}"', f'train.output="{output}"',
            "train.epochs=1", f"train.max_steps={steps}", f"train.log_every={log_every}",
            "train.checkpoint_every=0", 'train.progress="off"',
            f'train.channels_last="{channels_last}"', f'train.compile="{compile_mode}"',
            "eval.every=0", *extra,
        ]
        cfg = load_config(config_path, overrides)
        runtime = Runtime(0, 0, 1, device, None)
        trainer = Trainer(cfg, runtime)
        trainer.train()
        with open(os.path.join(output, "metrics.jsonl")) as handle:
            records = [r for r in map(json.loads, handle) if "images_per_s" in r]
        del trainer
    steady = records[1:] or records  # the first window holds start-up (cuDNN / Triton autotuning)
    result = {
        "images_per_s": statistics.median(r["images_per_s"] for r in steady),
        "data_wait": statistics.median(r.get("data_wait_share", float("nan")) for r in steady),
        "loss": records[-1]["loss"] if records else float("nan"),
        "windows": len(steady),
    }
    breakdowns = [r["breakdown"] for r in steady if isinstance(r.get("breakdown"), dict)]
    if breakdowns:
        result["breakdown"] = {name: statistics.median(b.get(name, {}).get("share", 0.0) for b in breakdowns)
                               for name in BREAKDOWN}
    return result


def _rate(images_per_s: float) -> str:
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.1f}"


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ceiling_report(args, command: str) -> str:
    import torch

    from partialfc.models.memory_format import resolve_channels_last

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark  # same setting for ceiling and trainer
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    channels_last = resolve_channels_last(args.channels_last, device)
    memory_format = "channels_last" if channels_last else "NCHW"
    rows, notes = [], []
    for classes, rate in args.heads:
        for backbone in args.backbones:
            label = f"{backbone}, {classes:,} classes, r = {rate}"
            row = [backbone, f"{classes:,}", f"{rate:g}", memory_format]
            try:
                ceiling = backbone_ceiling(backbone, device=device, batch=args.batch, amp=amp,
                                           channels_last=channels_last, compile_mode=args.compile,
                                           warmup=args.ceiling_warmup, iters=args.ceiling_iters)
            except Exception as error:  # record and go on: one failure must not lose the other runs
                ceiling = None
                notes.append(f"- {label}: ceiling failed: {type(error).__name__}: {str(error)[:300]}")
            _free(device)
            try:
                result = trainer_run(backbone=backbone, classes=classes, rate=rate, device=device, batch=args.batch,
                                     amp=amp, channels_last=args.channels_last, compile_mode=args.compile,
                                     steps=args.steps, log_every=args.log_every, head_dtype=args.head_dtype,
                                     embedding=args.embedding, extra=args.overrides)
            except Exception as error:
                result = None
                notes.append(f"- {label}: trainer failed: {type(error).__name__}: {str(error)[:300]}")
            _free(device)
            row.append(_rate(ceiling) if ceiling else "failed")
            if result is None:
                row += ["failed", "-", "-", "-", "-"]
            else:
                ratio = result["images_per_s"] / ceiling if ceiling else float("nan")
                wait = result["data_wait"]
                bars = ratio >= RATIO_BAR and wait <= WAIT_BAR
                breakdown = result.get("breakdown")
                row += [_rate(result["images_per_s"]), f"{ratio:.2f}", f"{100 * wait:.1f} %",
                        "met" if bars else "missed",
                        " / ".join(f"{100 * breakdown[n]:.0f}" for n in BREAKDOWN) if breakdown else "not logged"]
            rows.append(row)
            print(" | ".join(row), flush=True)
    headers = ["backbone", "classes", "r", "memory format", "ceiling img/s", "trainer img/s", "trainer / ceiling",
               "data wait", f"bars (>= {RATIO_BAR:.2f}x, wait <= {100 * WAIT_BAR:.0f} %)",
               "breakdown % (" + " / ".join(BREAKDOWN) + ")"]
    lines = [
        "# Trainer vs backbone-alone ceiling (issue 16)", "",
        *harness.provenance_lines(command), f"- Load average (1 min): {harness.load_average()}", "",
        f"One rank on {device}, batch {args.batch}, amp {amp}, head compute dtype {args.head_dtype}, embedding "
        f"{args.embedding}, train.channels_last = {args.channels_last} ({memory_format}), train.compile = "
        f"{args.compile}, cudnn.benchmark = {args.cudnn_benchmark if device.type == 'cuda' else 'n/a'}.",
        f"Ceiling: the backbone alone, forward + backward + SGD on one batch on the device, {args.ceiling_warmup} "
        f"warm-up + {args.ceiling_iters} timed iterations. Trainer: the real `Trainer` with synthetic data made on "
        f"the device, {args.steps} steps logged every {args.log_every}; images/s and data wait are medians over "
        "the log windows after the first (start-up and autotuning). Data wait = share of the step loop's wall "
        "time spent waiting for the next batch.", "",
        harness.markdown_table(headers, rows), "",
    ]
    if notes:
        lines += ["Failures:", "", *notes, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def _head(text: str):
    classes, rate = text.split(":")
    return int(float(classes)), float(rate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["auto", "engines", "ceiling"], default="auto",
                        help="auto: ceiling with --device cuda, engines otherwise")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run")
    parser.add_argument("--out", default=None, help="report path (default: results/train.md for engines, "
                                                    "results/train_gpu.md for ceiling on cuda)")
    parser.add_argument("--append", action="store_true", help="add this run's report below what --out holds")
    engines = parser.add_argument_group("engines mode")
    engines.add_argument("--config", default="configs/demo.toml")
    engines.add_argument("--nproc", type=int, default=2)
    engines.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ceiling = parser.add_argument_group("ceiling mode")
    ceiling.add_argument("--backbones", nargs="+", default=BACKBONES)
    ceiling.add_argument("--heads", nargs="+", type=_head, default=HEADS, metavar="CLASSES:RATE",
                         help="head shapes, e.g. 1e6:0.1 1e5:1")
    ceiling.add_argument("--batch", type=int, default=128)
    ceiling.add_argument("--amp", choices=["none", "fp16", "bf16"], default=None,
                         help="default: bf16 on cuda, none on cpu")
    ceiling.add_argument("--head-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                         help="head.compute_dtype (default: bf16 on cuda, fp32 on cpu)")
    ceiling.add_argument("--embedding", type=int, default=512)
    ceiling.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    ceiling.add_argument("--compile", choices=["none", "backbone"], default="none")
    ceiling.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    ceiling.add_argument("--ceiling-warmup", type=int, default=10)
    ceiling.add_argument("--ceiling-iters", type=int, default=30)
    ceiling.add_argument("--quick", action="store_true",
                         help="CPU smoke sizes: mobilefacenet_tiny, 1000 classes, batch 8, a few steps")
    parser.add_argument("--steps", type=int, default=None, help="trainer steps (engines: 60, ceiling: 80)")
    parser.add_argument("--log-every", type=int, default=None, help="log window (engines: 10, ceiling: 20)")
    args = parser.parse_args(argv)

    mode = args.mode if args.mode != "auto" else ("ceiling" if args.device == "cuda" else "engines")
    command = ("python benchmarks/train.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if mode == "engines":
        args.steps, args.log_every = args.steps or 60, args.log_every or 10
        text = engines_report(args, command)
        out = args.out or "benchmarks/results/train.md"
    else:
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("--device cuda but torch sees no CUDA device")
        if args.quick:
            args.backbones, args.heads, args.batch, args.embedding = ["mobilefacenet_tiny"], [(1000, 0.5)], 8, 64
            args.ceiling_warmup, args.ceiling_iters = 1, 2
            args.steps, args.log_every = args.steps or 6, args.log_every or 2
        args.steps, args.log_every = args.steps or 80, args.log_every or 20
        args.head_dtype = args.head_dtype or ("bf16" if args.device == "cuda" else "fp32")
        text = ceiling_report(args, command)
        out = args.out or ("benchmarks/results/train_gpu.md" if args.device == "cuda"
                           else "benchmarks/results/train_ceiling_cpu.md")
    if args.append and os.path.exists(out):
        with open(out) as handle:
            text = handle.read().rstrip("\n") + "\n\n" + text
    harness.write_atomic(out, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
