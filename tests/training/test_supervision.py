"""A stalled or failing job ends with one clear line per rank.

On 2 gloo ranks under torchrun: a rank stopped with SIGSTOP is named by its peer after
``train.collective_timeout``; a rank that meets a corrupt image prints its one line and
its peer says it stopped because of that rank, with no traceback from either. In one
process: the supervisor's diagnosis (including the NCCL watch thread, which no CPU run
exercises), and the start checks that must fail before anything is written.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from partialfc.config import ConfigError, load_config
from partialfc.distributed.runtime import resolve_collective_timeout
from partialfc.distributed.supervision import PeerSupervisor, is_collective_failure
from test_training import ROOT, TINY  # tests/training is on sys.path (pytest's rootdir-relative import)

OUR_TRACEBACK = re.compile(r'File "[^"]*/partialfc/')  # torchrun's own summary traceback is not ours


def start_job(output: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """torchrun on 2 ranks in its own session; stderr (both ranks and torchrun) to a file."""
    args = [a for o in TINY + ["train.progress=off", *overrides] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "partialfc.train", str(ROOT / "configs" / "demo.toml"), "--set", f"train.output={output}", *args]
    stderr_path = output.parent / f"{output.name}.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    return proc, stderr_path


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The worker process of ``rank``, found by its environment in /proc."""
    children = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} among torchrun's children {children}")


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited worker stays a zombie until torchrun reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.2)


def finish(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # never leave a hung job behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_stopped_rank_is_named_and_the_job_ends(tmp_path):
    output = tmp_path / "stalled"
    proc, stderr_path = start_job(output, "train.max_steps=400", "data.num_samples=4000",
                                  "train.collective_timeout=0.2")
    stopped = None
    try:
        metrics = output / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 180, "step 3")
        rank0, stopped = worker_pid(proc.pid, 0), worker_pid(proc.pid, 1)
        os.kill(stopped, signal.SIGSTOP)
        # 12 s of collective timeout, then the grace period: far below this hang guard
        # (without the fix the job waits 30 minutes).
        wait_for(lambda: not running(rank0), 240, "rank 0 to end after rank 1 was stopped")
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)  # torchrun's SIGTERM cannot reach a stopped process
            except ProcessLookupError:
                pass
        finish(proc)
    stderr = stderr_path.read_text()
    assert proc.returncode != 0
    assert re.search(r"^error \[rank 0\]: rank 1 stopped answering: last heartbeat at step \d+, \d+ s ago "
                     r"\(collective timeout 0\.2 min\)$", stderr, re.MULTILINE), stderr[-3000:]
    assert not OUR_TRACEBACK.search(stderr), stderr[-3000:]


def make_faces(root: Path, identities: int = 13, per_identity: int = 4) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for identity in range(identities):
        folder = root / f"id{identity:03d}"
        folder.mkdir(parents=True)
        for index in range(per_identity):
            pixels = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)


def test_rank_with_bad_data_fails_alone_and_its_peer_says_so(tmp_path):
    """Only rank 1's second batch holds a corrupt image: rank 1 names it and exits; rank 0,
    left inside a collective, names rank 1 -- one line each, no traceback."""
    from partialfc.data.image_folder import ImageFolderSource

    faces = tmp_path / "faces"
    make_faces(faces)
    shard = ImageFolderSource(str(faces), 8, rank=1, world_size=2, seed=0, num_workers=0)
    plan, _ = shard.plan(0)
    corrupt = shard.paths[int(plan[1][0])]
    Path(corrupt).write_bytes(b"this is not a JPEG")
    output = tmp_path / "bad_data"
    proc, stderr_path = start_job(output, "data.format=image_folder", f"data.path={faces}", "data.num_workers=1",
                                  "train.max_steps=3")
    finish(proc)
    stderr = stderr_path.read_text()
    assert proc.returncode != 0
    rank1 = [line for line in stderr.splitlines() if line.startswith("error [rank 1]:")]
    assert len(rank1) == 1 and corrupt in rank1[0], stderr[-3000:]
    assert f"error [rank 0]: stopped because rank 1 failed: {rank1[0].removeprefix('error [rank 1]: ')}" \
        in stderr.splitlines(), stderr[-3000:]
    assert not OUR_TRACEBACK.search(stderr), stderr[-3000:]
    assert "Connection closed by peer" not in stderr and "Connection reset by peer" not in stderr


# ---------------------------------------------------------------------- one process
def wait_for_exits(exits: list, count: int) -> None:
    wait_for(lambda: len(exits) >= count, 30, f"{count} watch-thread exit(s)")


def test_watch_thread_names_the_stalled_peer(capsys):
    """The NCCL path: this rank holds a batch (so it waits in a collective) and no step
    finishes for the timeout; the peer whose heartbeat stopped is named."""
    store, exits = dist.HashStore(), []
    peer = PeerSupervisor(store, 1, 2, 0.01)
    armed = []
    me = PeerSupervisor(store, 0, 2, 0.01, watch=True, grace_seconds=0.5, exit_process=exits.append,
                        on_arm=lambda: armed.append(1))
    peer.beat(7)
    me.beat(8)
    me.beat(9)  # arming happens once
    me.batch_arrived()
    with me.working_alone():  # rank 0's evaluation, which the peers wait for: not a stall
        time.sleep(2.0)
        assert exits == []
    wait_for_exits(exits, 1)
    me.close()
    assert exits == [3] and armed == [1]
    assert re.fullmatch(r"error \[rank 0\]: rank 1 stopped answering: last heartbeat at step 7, \d+ s ago "
                        r"\(collective timeout 0\.01 min\)\n", capsys.readouterr().err)


def test_watch_thread_of_a_rank_starved_by_its_loader(capsys):
    """Rank 1 waits for its data loader (it is the culprit and says so); rank 0, waiting in
    a collective, names rank 1 as the rank that failed."""
    store, exits = dist.HashStore(), []
    starved = PeerSupervisor(store, 1, 2, 0.01, watch=True, grace_seconds=3, exit_process=exits.append)
    waiting = PeerSupervisor(store, 0, 2, 0.01, watch=True, grace_seconds=3, exit_process=exits.append)
    starved.beat(4)  # next: ask the loader, which never answers
    waiting.beat(4)
    waiting.batch_arrived()
    wait_for_exits(exits, 2)
    starved.close()
    waiting.close()
    lines = sorted(capsys.readouterr().err.splitlines())
    starved_line = ("the data loader gave no batch for 0.01 min after step 4; the other ranks wait for this one "
                    "(collective timeout 0.01 min)")
    assert lines == [f"error [rank 0]: stopped because rank 1 failed: {starved_line}",
                     f"error [rank 1]: {starved_line}"]


def test_collective_failure_diagnosis_in_the_main_thread():
    gloo_timeout = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                                "18000ms for recv operation to complete")
    gloo_closed = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                               "[127.0.0.1]:2432")
    # A peer that published its own failure is named as the cause.
    store = dist.HashStore()
    PeerSupervisor(store, 2, 3, 1.0).publish_failure("error [rank 2]: bad label")
    PeerSupervisor(store, 1, 3, 1.0).beat(5)
    me = PeerSupervisor(store, 0, 3, 1.0, grace_seconds=0.3)
    assert me.explain_collective_failure(gloo_closed) == "stopped because rank 2 failed: bad label"
    # Peers that never say their collective failed stopped answering; one that did is not blamed.
    store = dist.HashStore()
    PeerSupervisor(store, 1, 3, 1.5)  # started, never finished a step
    survivor = PeerSupervisor(store, 2, 3, 1.5, grace_seconds=0.3)
    survivor.beat(3)
    survivor.explain_collective_failure(gloo_timeout)
    line = PeerSupervisor(store, 0, 3, 1.5, grace_seconds=0.3).explain_collective_failure(gloo_timeout)
    assert re.fullmatch(r"rank 1 stopped answering: no step finished yet \(started \d+ s ago\) "
                        r"\(collective timeout 1\.5 min\)", line), line
    # Every rank reports the failure: nobody stopped, the connection between them broke.
    store = dist.HashStore()
    PeerSupervisor(store, 1, 2, 1.0, grace_seconds=0.3).explain_collective_failure(gloo_closed)
    line = PeerSupervisor(store, 0, 2, 1.0, grace_seconds=0.3).explain_collective_failure(gloo_closed)
    assert line.endswith("on every rank; none stopped, so the connection between them failed "
                         "(its connection closed)"), line


def test_which_errors_count_as_a_collective_failure():
    closed = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:46773: "
                          "Connection reset by peer.")
    assert is_collective_failure(closed)
    try:
        try:
            raise closed
        except RuntimeError as inner:
            raise RuntimeError("backward failed") from inner
    except RuntimeError as wrapped:
        assert is_collective_failure(wrapped)  # followed through the cause chain
    assert is_collective_failure(dist.DistStoreError("wait timeout after 1000ms"))
    assert not is_collective_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_collective_failure(ValueError("label 17 is outside [0, 13)"))


def test_collective_timeout_setting(tmp_path):
    import torch

    assert resolve_collective_timeout(0, torch.device("cpu")) == 5.0
    assert resolve_collective_timeout(0.0, torch.device("cuda")) == 10.0
    assert resolve_collective_timeout(0.25, torch.device("cpu")) == 0.25
    with pytest.raises(ValueError, match="collective_timeout"):
        resolve_collective_timeout(-1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.collective_timeout = -2.0 must be >= 0"):
        load_config(ROOT / "configs" / "demo.toml", ["train.collective_timeout=-2"])
    assert load_config(ROOT / "configs" / "demo.toml", ["train.collective_timeout=2"]).train.collective_timeout == 2.0


# ---------------------------------------------------------------------- start checks, in-process
def run_main(monkeypatch, *overrides: str) -> int:
    from partialfc.train import main

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = [a for o in TINY + ["train.max_steps=1", *overrides] for a in ("--set", o)]
    return main([str(ROOT / "configs" / "demo.toml"), *args])


def test_output_that_is_a_file_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me\n")
    assert run_main(monkeypatch, f"train.output={taken}") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error [rank 0]: train.output = {str(taken)!r} is a file; choose a directory"]
    assert taken.read_text() == "keep me\n"
    assert run_main(monkeypatch, f"train.output={taken / 'run'}") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error [rank 0]: train.output = {str(taken / 'run')!r} is under {str(taken)!r}, which is a file; "
        "choose a directory"]


@pytest.mark.parametrize("problem", ["missing", "not_a_pickle", "directory"])
def test_eval_set_is_checked_at_start(tmp_path, monkeypatch, capsys, problem):
    """A ``.bin`` that cannot be used fails at start, naming it -- not at the first
    evaluation (here: never, as eval.every is past the last step)."""
    path = tmp_path / "lfw.bin"
    if problem == "not_a_pickle":
        path.write_bytes(b"\x00" * 64)
    elif problem == "directory":
        path.mkdir()
    output = tmp_path / "run"
    assert run_main(monkeypatch, f'eval.sets=["{path}"]', "eval.every=1000", f"train.output={output}") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [rank 0]: eval.sets: ") and str(path) in lines[0], lines
    assert not output.exists()  # refused before the run directory was made
