"""Nothing is lost on checkpoint and resume (issue 14).

* A step already saved is not saved again (the final save after a periodic one used to
  remove the directory ``latest`` named, then die before replacing it); a missing or
  broken ``latest`` resumes from the newest complete checkpoint, and step directories
  of which none is complete are never started over.
* A fresh run into an output that holds a run is refused; ``never`` moves the old run
  aside; a finished run has nothing left to train and writes nothing.
* A full disk on one rank fails the save on every rank, keeps the previous checkpoint
  and ``latest``, and names the file.
* A run resumed on another world size ends where an uninterrupted run at the new global
  batch would, with the lr of the schedule at that point (torchrun, 2 -> 3 ranks).

Most of it runs in-process (one rank, no process group) to stay cheap.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from full_disk import open_on_full_disk
from spawn import run_ranks

from partialfc import checkpoint as ckpt
from partialfc.resume import RunDirectoryError

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.backbone=mobilefacenet_tiny", "model.embedding_size=64", "data.num_classes=13", "data.batch_size=8",
    "data.num_samples=400", "train.log_every=1", "head.sample_rate=0.5", "head.scale=16.0", "optim.warmup_epochs=0.1",
]


# ---------------------------------------------------------------------- helpers
def _head_and_optimizer(weight_value=0.0):
    from partialfc.head import CombinedMargin, PartialFC
    from partialfc.optim import build_optimizer

    head = PartialFC(CombinedMargin.preset("arcface"), 8, 13)
    with torch.no_grad():
        head.weight.fill_(weight_value)
    return head, build_optimizer("sgd", head.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0, row_sparse=True)


def _save(output, step, head, optimizer, keep_last=3):
    return ckpt.save_checkpoint(
        output, step=step, position={"epoch": 0, "batch_in_epoch": step, "samples_in_epoch": 8 * step},
        config_dict={}, backbone_name="mobilefacenet_tiny", backbone_kwargs={"embedding_size": 8},
        backbone_state={"w": torch.zeros(2)}, head=head, engine_state={}, head_optimizer=optimizer,
        keep_last=keep_last)


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes and inode: equal snapshots, nothing touched."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_ino) for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- checkpoint files
def test_saving_a_saved_step_again_writes_nothing(tmp_path):
    """The cause of the lost run: the final save after ``checkpoint_every`` saved the same
    step removed the complete directory ``latest`` named before renaming the new one."""
    head, optimizer = _head_and_optimizer(1.0)
    first = _save(tmp_path, 4, head, optimizer)
    before = _snapshot(tmp_path)
    head2, optimizer2 = _head_and_optimizer(2.0)
    assert _save(tmp_path, 4, head2, optimizer2) == first
    assert _snapshot(tmp_path) == before
    assert ckpt.load_centers(first).flatten().unique().tolist() == [1.0]


def test_an_incomplete_step_directory_is_replaced(tmp_path):
    head, optimizer = _head_and_optimizer(1.0)
    stale = tmp_path / "checkpoints" / "step_00000004"
    stale.mkdir(parents=True)
    (stale / "head_rank00000.pt").write_bytes(b"half")
    final = _save(tmp_path, 4, head, optimizer)
    assert ckpt.checkpoint_problem(final) is None
    assert ckpt.load_centers(final).flatten().unique().tolist() == [1.0]


DAMAGE = {  # what a crash or a user left behind -> the checkpoint to resume from
    "no latest": (lambda root: (root / "latest").unlink(), "step_00000003"),
    "latest names a missing name": (lambda root: (root / "latest").write_text("../../etc\n"), "step_00000003"),
    "no manifest": (lambda root: (root / "step_00000003" / "manifest.json").unlink(), "step_00000002"),
    "manifest not JSON": (lambda root: (root / "step_00000003" / "manifest.json").write_text("{"), "step_00000002"),
    "shard missing": (lambda root: (root / "step_00000003" / "head_rank00000.pt").unlink(), "step_00000002"),
    # Killed between renaming step 3 into place and writing latest: step 3 is complete.
    "latest one behind": (lambda root: (root / "latest").write_text("step_00000002\n"), "step_00000003"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_broken_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, damage):
    head, optimizer = _head_and_optimizer()
    for step in (1, 2, 3):
        _save(tmp_path, step, head, optimizer, keep_last=0)
    root = tmp_path / "checkpoints"
    breaks, expected = DAMAGE[damage]
    breaks(root)
    assert ckpt.find_latest(tmp_path) == root / expected  # None before: a fresh start over the old run
    found, warning = ckpt.newest_complete(root)
    assert found == root / expected
    assert f"{root}/latest " in warning and f"using {expected}, the newest complete checkpoint" in warning


def test_step_directories_without_a_complete_one_are_an_error_not_a_fresh_start(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.newest_complete(root) == (None, None)  # nothing there: a fresh start is fine
    (root / "step_00000005").mkdir(parents=True)
    (root / "step_00000009.tmp").mkdir()
    (root / "latest").write_text("step_00000005\n")
    with pytest.raises(ckpt.CheckpointError, match=r"no complete checkpoint in .*step_00000005 has no manifest"):
        ckpt.newest_complete(root)


# ---------------------------------------------------------------------- disk full on one rank
def _save_with_a_full_disk(rank, world, output):
    from partialfc import atomic_io

    head, optimizer = _head_and_optimizer(1.0)
    head.process_group = None  # the default group
    _save(output, 1, head, optimizer)
    outcomes = []
    # Rank 1's head shard does not fit; then rank 0's `latest` does not (after the rename).
    for step, failing_rank, pattern in ((2, 1, "head_rank"), (3, 0, "latest")):
        if rank == failing_rank:
            atomic_io.open = open_on_full_disk(0, pattern)
        try:
            _save(output, step, head, optimizer)
            outcomes.append(None)
        except ckpt.CheckpointError as exc:
            outcomes.append(str(exc))
        finally:
            atomic_io.__dict__.pop("open", None)
    return outcomes


def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    results = run_ranks(_save_with_a_full_disk, 2, str(tmp_path), timeout=240)
    root = tmp_path / "checkpoints"
    kept = f"{root}/latest still names step_00000001"
    (rank0_step2, rank0_step3), (rank1_step2, rank1_step3) = results
    assert rank1_step2 == (f"checkpoint of step 2 not written: no space left on device writing "
                           f"{root}/step_00000002.tmp/head_rank00001.pt ({os.strerror(errno.ENOSPC)}); {kept}")
    assert rank0_step2 == f"checkpoint of step 2 not written: rank 1 could not write its checkpoint files; {kept}"
    assert rank0_step3.startswith(f"checkpoint of step 3 not written: no space left on device writing {root}/latest")
    assert rank1_step3 == f"checkpoint of step 3 not written: rank 0 could not write its checkpoint files; {kept}"
    assert (root / "latest").read_text() == "step_00000001\n"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert ckpt.checkpoint_problem(root / "step_00000001") is None


# ---------------------------------------------------------------------- the trainer, in-process
@pytest.fixture
def trainer_factory(caplog):
    """Build one-rank trainers in this process; restores the signal handlers they install."""
    from partialfc import run_log
    from partialfc.config import load_config
    from partialfc.distributed.runtime import Runtime
    from partialfc.trainer import Trainer

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    caplog.set_level(logging.INFO, logger="partialfc.train")

    def make(output, *overrides):
        cfg = load_config(ROOT / "configs" / "demo.toml",
                          TINY + ["metrics.enabled=false", "train.progress=off", f"train.output={output}", *overrides])
        trainer = Trainer(cfg, Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None))
        train = trainer.train

        def train_and_close_log():  # as partialfc.train does when its process ends
            try:
                return train()
            finally:
                run_log.detach_log_file()

        trainer.train = train_and_close_log
        return trainer

    yield make
    run_log.detach_log_file()
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _records(output):
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_into_an_output_with_a_run_is_refused_and_touches_nothing(tmp_path, trainer_factory):
    output = tmp_path / "run"
    trainer_factory(output, "train.max_steps=2").train()
    before = _snapshot(output)
    with pytest.raises(RunDirectoryError) as refused:
        trainer_factory(output, "train.max_steps=3").train()
    assert str(refused.value) == (
        f"{output} already holds a run (checkpoints/step_00000002, metrics.jsonl): continue it with --resume auto, "
        f'start over with --set train.resume="never" (the old run is moved aside, nothing is deleted), or choose '
        f"a new train.output")
    assert _snapshot(output) == before


def test_never_moves_the_old_run_aside(tmp_path, trainer_factory):
    output = tmp_path / "run"
    trainer_factory(output, "train.max_steps=2").train()
    old = _snapshot(output)
    trainer_factory(output, "train.max_steps=1", "train.resume=never").train()
    (aside,) = output.glob("superseded_*")
    assert {name: data for name, (data, _) in _snapshot(aside).items()} == {
        name: data for name, (data, _) in old.items()}  # every old file, moved as it was
    assert [r["step"] for r in _records(output)] == [1]
    assert (output / "checkpoints" / "latest").read_text() == "step_00000001\n"
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_a_finished_run_has_nothing_left_to_train(tmp_path, trainer_factory, caplog):
    output = tmp_path / "run"
    trainer_factory(output, "train.max_steps=2").train()
    before = _snapshot(output)
    caplog.clear()
    summary = trainer_factory(output, "train.max_steps=2", "train.resume=auto").train()
    assert summary == {"step": 2, "checkpoint": str(output / "checkpoints" / "step_00000002"), "nothing_left": True}
    assert f"nothing left to train: {output}/checkpoints/step_00000002 is at step 2 of 2" in caplog.text
    assert "nan" not in caplog.text
    assert _snapshot(output) == before


def test_resume_after_the_crash_of_issue_14(tmp_path, trainer_factory, caplog, monkeypatch):
    """``latest`` names step 3, whose directory lost its manifest (the old final save died
    between removing and renaming): resume from step 2, move step 3 aside, log each step
    once; and the final save does not repeat the periodic one of the same step."""
    output = tmp_path / "run"
    trainer_factory(output, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=0").train()
    root = output / "checkpoints"
    (root / "step_00000003" / "manifest.json").unlink()
    caplog.clear()
    saved, save = [], ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: saved.append(k["step"]) or save(*a, **k))
    summary = trainer_factory(output, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_last=0",
                              "train.resume=auto").train()
    assert summary["step"] == 4 and saved == [3, 4]
    assert (f"{root}/latest names 'step_00000003', which has no manifest.json; using step_00000002, the newest "
            f"complete checkpoint") in caplog.text
    assert [r["step"] for r in _records(output)] == [1, 2, 3, 4]
    (aside,) = output.glob("superseded_*")
    assert (aside / "checkpoints" / "step_00000003" / "head_rank00000.pt").is_file()  # kept, not deleted
    assert (root / "latest").read_text() == "step_00000004\n"
    assert all(ckpt.checkpoint_problem(root / f"step_{s:08d}") is None for s in (1, 2, 3, 4))


def test_auto_without_checkpoints_starts_a_clean_log(tmp_path, trainer_factory):
    """A run killed before its first checkpoint left log records of steps that run again."""
    output = tmp_path / "run"
    output.mkdir()
    (output / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    trainer_factory(output, "train.max_steps=1", "train.resume=auto").train()
    assert [(r["step"], r["loss"] != 9.0) for r in _records(output)] == [(1, True)]


def test_resuming_another_runs_checkpoint_into_a_used_output_is_refused(tmp_path):
    from partialfc.resume import plan_start

    elsewhere = tmp_path / "a" / "checkpoints" / "step_00000004"
    elsewhere.mkdir(parents=True)
    (elsewhere / "manifest.json").write_text("{}")
    used = tmp_path / "b"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirectoryError, match=r"b already holds a run \(metrics\.jsonl\), and .*step_00000004 "
                                                r"is from elsewhere: resuming it here would mix two runs"):
        plan_start(used, str(elsewhere))
    assert plan_start(tmp_path / "new", str(elsewhere)).checkpoint == elsewhere


def test_auto_with_only_incomplete_checkpoints_refuses(tmp_path, trainer_factory):
    output = tmp_path / "run"
    trainer_factory(output, "train.max_steps=1").train()
    (output / "checkpoints" / "step_00000001" / "backbone.pt").unlink()
    before = _snapshot(output)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000001 lacks backbone\.pt.*nothing to resume from"):
        trainer_factory(output, "train.max_steps=2", "train.resume=auto").train()
    assert _snapshot(output) == before


# ---------------------------------------------------------------------- another world size (torchrun)
def _poly_lr(base, step, total, warmup):
    """The schedule of optim.schedule = poly (power 2) with linear warmup, independently."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (1.0 - min(1.0, (step - warmup) / max(1, total - warmup))) ** 2


def test_resume_on_more_ranks_ends_where_the_new_world_size_would(tmp_path):
    """2 ranks x 8 images for 11 steps (176 samples of epoch 0), then 3 ranks x 8: 176 // 24
    = batch 7 of the 10 per epoch on 3 ranks, so 13 steps remain of 2 epochs, at the lr of
    the 3-rank schedule from its step 7. Before: the 3-rank run took step 11 as its schedule
    position and stopped at step 20 of 20 after batch 6 of epoch 1 (4 batches never ran),
    at the lr of the 16-image batch."""
    from test_training import train

    output = tmp_path / "run"
    common = ("data.num_samples=240", "train.epochs=2")
    train(output, *common, "train.max_steps=11", nproc=2)

    refused = train(output, *common, nproc=3, check=False)  # no --resume: the output holds a run
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error [rank")]
    assert sorted(line[:13] for line in errors) == ["error [rank 0", "error [rank 1", "error [rank 2"], errors
    assert all("already holds a run" in line and "--resume auto" in line for line in errors)

    resumed = train(output, *common, "train.resume=auto", nproc=3)
    assert "world size 2 -> 3 (global batch 16 -> 24): step 11 is step 7 of 20" in resumed.stderr
    records = [r for r in _records(output) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 25))  # each step once, the counter never goes back
    assert [r["samples"] for r in records] == [16 * s for s in range(1, 12)] + [176 + 24 * k for k in range(1, 14)]
    base = 0.1 * 24 / 64  # demo: lr 0.1 at 64 images; 3 x 8 images now
    warmup, total = 1, 20  # 0.1 epochs of 10 steps; 2 epochs
    for k, record in enumerate(records[11:], start=1):  # lr after the schedule's step 7 + k
        assert record["lr"] == pytest.approx(_poly_lr(base, 7 + k, total, warmup), rel=1e-9, abs=1e-12), record
    assert records[-1]["lr"] == 0.0 and records[-1]["epoch"] == 1
    assert not any(math.isnan(r["loss"]) for r in records)
    manifest = ckpt.read_manifest(output)
    assert manifest["step"] == 24 and manifest["world_size"] == 3
    assert manifest["position"] == {"epoch": 2, "batch_in_epoch": 0, "samples_in_epoch": 0,
                                    "samples_seen": 176 + 24 * 13, "global_batch": 24}

    again = train(output, *common, "train.resume=auto", nproc=3)
    assert "nothing left to train" in again.stderr and "nan" not in again.stderr
    assert len(_records(output)) == 24


def test_a_torn_metrics_line_does_not_stop_the_resume(tmp_path, trainer_factory):
    """A crash or a full disk mid-append leaves half a record at the end of metrics.jsonl:
    the resume drops it with the records past the checkpoint instead of failing."""
    output = tmp_path / "run"
    trainer_factory(output, "train.max_steps=2").train()
    with open(output / "metrics.jsonl", "a") as log_file:
        log_file.write('{"step": 3, "lo')
    summary = trainer_factory(output, "train.max_steps=3", "train.resume=auto").train()
    assert summary["step"] == 3
    assert [r["step"] for r in _records(output)] == [1, 2, 3]


def test_a_full_disk_while_logging_is_one_error_naming_the_file(tmp_path, trainer_factory, monkeypatch):
    import partialfc.atomic_io as atomic_io
    from full_disk import open_on_full_disk

    output = tmp_path / "run"
    trainer = trainer_factory(output, "train.max_steps=2")
    monkeypatch.setattr(atomic_io, "open", open_on_full_disk(0, "metrics.jsonl"), raising=False)
    with pytest.raises(ValueError, match=f"no space left on device writing {output}/metrics.jsonl"):
        trainer.train()
