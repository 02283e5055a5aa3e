"""Where a run starts: the output directory's policy and the progress of a resumed run.

``train.resume`` decides what an existing ``train.output`` means:

* ``""`` (default): a fresh run. An output that already holds a run (a step directory
  or a non-empty ``metrics.jsonl``) is refused before any file is touched: a second run
  there would append to the old log, keep the old checkpoints beside the new ones and
  move ``latest`` back.
* ``"never"``: a fresh run; the old run's files are moved into
  ``OUTPUT/superseded_<UTC time>/`` (nothing is deleted).
* ``"auto"``: the newest complete checkpoint (``checkpoint_dirs.newest_complete``);
  none at all is a fresh start; step directories of which none is complete are
  refused rather than written over.
* a checkpoint path: that checkpoint. Resuming into an output that holds another run
  is refused like ``""``.

A resumed run moves step directories newer than its checkpoint aside (a rollback to
an older checkpoint would otherwise mix two futures) and cuts ``metrics.jsonl`` back to
the checkpoint's step, so every step is logged once.

Progress is kept in samples (DESIGN.md: resume and schedules count samples). The step
counter counts optimizer steps and only moves forward, whatever the global batch: the
checkpoint directories, the metrics log, TensorBoard and Prometheus are indexed by it,
and re-expressing it would move it back when the world grows (step 20 on 2 ranks is
step 13 on 3), onto the names of older checkpoints. Each metrics record also carries
``samples``, the axis that is comparable across world sizes. On a new
global batch (another world size or ``data.batch_size``) the position in the epoch is
re-expressed in the new batch (``samples_in_epoch // global_batch``, so up to one
batch of samples is seen again rather than skipped), the lr schedules are set to that
step of the new run's schedule with the base lr scaled like the batch, and the run
ends where an uninterrupted run at this batch would: after the last epoch.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from partialfc.atomic_io import atomic_write_text
from partialfc.checkpoint import gather_ints
from partialfc.checkpoint_dirs import CheckpointError, newest_complete, resolve_checkpoint, step_dirs, step_of

log = logging.getLogger("partialfc.train")

# What a run writes into its output (besides the superseded_* folders themselves).
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.toml", "train.log", "tensorboard")
START_OVER = ('continue it with --resume auto, start over with --set train.resume="never" (the old run is moved '
              'aside, nothing is deleted), or choose a new train.output')


class RunDirectoryError(ValueError):
    """An output directory this run must not write into as asked."""


@dataclass(frozen=True)
class StartPlan:
    """What ``train.resume`` means for this output; computed without writing anything."""
    checkpoint: Optional[Path] = None  # resume from it; None: fresh start
    warning: Optional[str] = None      # about a broken ``latest``
    move_old_run: bool = False         # "never": move RUN_FILES aside
    clear_metrics: bool = False        # "auto" without checkpoints: the log of a run killed before its first one
    newer: tuple = ()                  # step directories newer than ``checkpoint``, to move aside


def run_marks(output: Path) -> list[str]:
    """What shows that ``output`` holds a run: its step directories (newest first, at most
    three named) and a non-empty metrics log."""
    marks = []
    steps = sorted((p for p in (output / "checkpoints").glob("step_*") if p.is_dir()), reverse=True)
    marks += [f"checkpoints/{p.name}" for p in steps[:3]] + (["..."] if len(steps) > 3 else [])
    metrics = output / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        marks.append("metrics.jsonl")
    return marks


def plan_start(output: str | os.PathLike, resume: str) -> StartPlan:
    """Read-only: where this run starts, or a RunDirectoryError / CheckpointError saying why
    it must not start."""
    output = Path(output)
    if resume == "never":
        return StartPlan(move_old_run=any((output / name).exists() for name in RUN_FILES))
    if resume == "":
        marks = run_marks(output)
        if marks:
            raise RunDirectoryError(f"{output} already holds a run ({', '.join(marks)}): {START_OVER}")
        return StartPlan()
    if resume == "auto":
        try:
            checkpoint, warning = newest_complete(output / "checkpoints")
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}: nothing to resume from, and starting over would write over these; "
                                  f"restore a checkpoint, pass one with --resume PATH, or start over with "
                                  f'--set train.resume="never" (the old run is moved aside)') from None
        if checkpoint is None:
            return StartPlan(clear_metrics=(output / "metrics.jsonl").is_file())
    else:
        checkpoint, warning = resolve_checkpoint(resume), None
        if checkpoint.parent.resolve() != (output / "checkpoints").resolve():
            marks = run_marks(output)
            if marks:
                raise RunDirectoryError(f"{output} already holds a run ({', '.join(marks)}), and {checkpoint} is "
                                        f"from elsewhere: resuming it here would mix two runs; choose a new "
                                        f"train.output")
    step = step_of(checkpoint)
    newer = tuple(p for p in step_dirs(output / "checkpoints") if step_of(p) > step)
    return StartPlan(checkpoint=checkpoint, warning=warning, newer=newer)


def agreed_start_plan(output: str | os.PathLike, resume: str, device) -> StartPlan:
    """Collective ``plan_start``: every rank reads the output directory, then all agree in
    one all-gather before anyone writes, so a refusal stops every rank (each with a
    one-line error) and all ranks resume from the same step."""
    try:
        plan = plan_start(output, resume)
        code, error = (-1 if plan.checkpoint is None else step_of(plan.checkpoint)), None
    except ValueError as exc:  # RunDirectoryError, CheckpointError
        plan, code, error = None, -2, exc
    except OSError as exc:  # unreadable: said like the rest, after the others heard of it
        plan, code, error = None, -2, RunDirectoryError(f"cannot read {output}: {exc}")
    codes = gather_ints(code, None, device)
    if error is not None:
        raise error
    if -2 in codes:
        raise RunDirectoryError(f"rank {codes.index(-2)} refused to start (see its error)")
    if len(set(codes)) > 1:
        raise RunDirectoryError(f"ranks disagree on the checkpoint to resume from (its step by rank, -1 for none: "
                                f"{codes}); {output} must be on a file system every rank shares")
    return plan


def carry_out(plan: StartPlan, output: str | os.PathLike, resumed_step: int, *, is_main: bool, device) -> None:
    """Collective: rank 0 makes the writes ``plan`` needs while the others wait; a failure
    there stops every rank."""
    error = None
    if is_main:
        try:
            _carry_out_on_main(plan, Path(output), resumed_step)
        except (OSError, ValueError) as exc:  # reported to every rank first: none is left waiting
            error = exc
    failed = gather_ints(error is not None, None, device)
    if error is not None:
        raise RunDirectoryError(f"cannot prepare {output}: {error}") from error
    if any(failed):
        raise RunDirectoryError(f"rank 0 could not prepare {output} (see its error)")


def _carry_out_on_main(plan: StartPlan, output: Path, resumed_step: int) -> None:
    if plan.move_old_run:
        moved = move_aside(output, [output / name for name in RUN_FILES])
        log.warning("train.resume = never: moved the previous run's files to %s", moved)
    if plan.newer:
        moved = move_aside(output, list(plan.newer), copy=[output / "metrics.jsonl"])
        log.warning("resuming from %s: moved the newer %s to %s", plan.checkpoint.name,
                    ", ".join(p.name for p in plan.newer), moved)
    if plan.clear_metrics:
        truncate_metrics_log(output / "metrics.jsonl", -1)
    elif plan.checkpoint is not None:
        truncate_metrics_log(output / "metrics.jsonl", resumed_step)


def move_aside(output: Path, paths: list, copy: tuple | list = ()) -> Optional[Path]:
    """Move ``paths`` (and copy ``copy``) into a new ``output/superseded_<UTC time>/``,
    keeping their place relative to ``output``; returns that folder (None: nothing there)."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = output / f"superseded_{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = output / f"superseded_{stamp}_{suffix}"
    for path in copy:
        if path.is_file():
            destination = target / path.relative_to(output)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    for path in paths:
        destination = target / path.relative_to(output)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)  # same file system: a rename, nothing is copied or lost
    return target


def truncate_metrics_log(metrics_file: Path, step: int) -> None:
    """Drop records past ``step`` (all for -1): those steps are about to run again, so after
    a crash and restart the log still has each step exactly once. Rewritten only when
    something is dropped."""
    if not metrics_file.is_file():
        return
    lines = [line for line in metrics_file.read_text(errors="replace").splitlines() if line.strip()]
    kept = [line for line in lines if _record_step(line) <= step] if step >= 0 else []
    if len(kept) != len(lines):
        atomic_write_text(metrics_file, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> float:
    """A metrics record's step; a line that is not a record (torn by a crash or a full disk
    mid-append) counts as past every step, so truncation drops it instead of failing."""
    try:
        record = json.loads(line)
    except ValueError:
        return float("inf")
    return record.get("step", 0) if isinstance(record, dict) else float("inf")


# ---------------------------------------------------------------------------- progress
@dataclass(frozen=True)
class Progress:
    """Where a resumed run stands, in this run's global batch."""
    step: int                # optimizer steps taken so far (the counter; never re-expressed)
    epoch: int
    batch_in_epoch: int      # in batches of this run's global batch
    samples_seen: int        # images trained on so far, all epochs
    stop_step: int           # the counter's value when this run ends
    schedule_step: int       # the lr schedule's position: steps of this run's global batch
    saved_global_batch: int
    saved_world_size: int

    @property
    def steps_left(self) -> int:
        return self.stop_step - self.step


def progress_on_resume(manifest: dict, *, global_batch: int, steps_per_epoch: int, epochs: int,
                       max_steps: int) -> Progress:
    """The position of ``manifest`` re-expressed in ``global_batch`` (see the module doc)."""
    position, step = manifest["position"], manifest["step"]
    # Checkpoints from before samples were recorded: one global batch throughout.
    saved_batch = position.get("global_batch") or manifest["world_size"] * manifest["config"]["data"]["batch_size"]
    epoch = position["epoch"]
    batch_in_epoch = position["samples_in_epoch"] // global_batch
    if batch_in_epoch >= steps_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    steps_left = max(0, (epochs - epoch) * steps_per_epoch - batch_in_epoch)
    stop_step = step + steps_left if not max_steps else max(step, min(step + steps_left, max_steps))
    return Progress(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                    samples_seen=position.get("samples_seen", step * saved_batch), stop_step=stop_step,
                    schedule_step=epoch * steps_per_epoch + batch_in_epoch, saved_global_batch=saved_batch,
                    saved_world_size=manifest["world_size"])


def set_schedule_step(scheduler, step: int, batch_ratio: float) -> None:
    """Put a LambdaLR at ``step`` of its (this run's) schedule, its base lrs scaled by
    ``batch_ratio`` (the linear scaling rule, new global batch / old): every group's lr
    becomes ``base_lr * lambda(step)``, as if stepped ``step`` times from the start."""
    scheduler.base_lrs = [base * batch_ratio for base in scheduler.base_lrs]
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
    scheduler.last_epoch = step - 1
    scheduler.step()  # recomputes each group's lr from the lambda at last_epoch + 1 = step


def rescale_message(progress: Progress, *, world_size: int, global_batch: int, total_steps: int, lr: float) -> str:
    """One log line saying how a run resumed on another global batch continues."""
    world = (f"world size {progress.saved_world_size} -> {world_size}" if progress.saved_world_size != world_size
             else f"world size {world_size}")
    return (f"{world} (global batch {progress.saved_global_batch} -> {global_batch}): step {progress.step} is "
            f"step {progress.schedule_step} of {total_steps} in steps of {global_batch} samples (epoch "
            f"{progress.epoch}, batch {progress.batch_in_epoch}); the lr schedule continues from there "
            f"(lr {lr:.6g}), {progress.steps_left} steps left, this run ends at step {progress.stop_step}")
