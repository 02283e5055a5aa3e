"""Atomic writes: the final name holds the old file or the complete new one, nothing else;
a full disk is an error naming the file."""
import errno
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from full_disk import open_on_full_disk
from partialfc.atomic_io import TEMP_PREFIX, DiskFullError, atomic_output_path, atomic_torch_save, atomic_write_text


def test_final_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output_path(target) as temp_path:
        assert os.path.dirname(temp_path) == str(tmp_path)  # same folder: the rename is atomic
        assert temp_path.endswith("out.bin")  # writers that pick the format by extension see it
        with open(temp_path, "wb") as handle:
            handle.write(b"first half ")
            handle.flush()
            assert not target.exists()
            handle.write(b"second half")
        assert not target.exists()
    assert target.read_bytes() == b"first half second half"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_error_inside_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_output_path(target) as temp_path:
            with open(temp_path, "w") as handle:
                handle.write("new but trunc")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.json"]


def test_interrupt_inside_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "model.pt"
    atomic_torch_save({"step": 1}, target)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_path(target):
            raise KeyboardInterrupt
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["model.pt"]


def test_sigkill_mid_write_leaves_old_file_under_the_final_name(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    child = (
        "import os, signal, sys\n"
        "from partialfc.atomic_io import atomic_output_path\n"
        "with atomic_output_path(sys.argv[1]) as temp_path, open(temp_path, 'w') as handle:\n"
        "    handle.write('half of the new')\n"
        "    handle.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", child, str(target)])
    assert result.returncode == -signal.SIGKILL
    assert target.read_text() == "old"
    leftovers = [name for name in os.listdir(tmp_path) if name != "manifest.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(TEMP_PREFIX)  # hidden, never read


def test_missing_folder_is_a_clear_error(tmp_path):
    target = tmp_path / "nope" / "latest"
    with pytest.raises(ValueError, match=r"cannot write .*nope/latest: output folder does not exist: .*nope"):
        atomic_write_text(target, "step_00000010\n")
    assert os.listdir(tmp_path) == []


def test_helpers_replace_and_round_trip(tmp_path):
    text_path = tmp_path / "latest"
    text_path.write_text("step_00000001\n")
    atomic_write_text(str(text_path), "step_00000002 \u00b5\n")
    assert text_path.read_text(encoding="utf-8") == "step_00000002 \u00b5\n"
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "w.pt")
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["w"], torch.arange(3))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(TEMP_PREFIX)]


def test_result_has_plain_open_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644  # not mkstemp's 0600


def _disk_with_room(monkeypatch, room):
    from partialfc import atomic_io

    monkeypatch.setattr(atomic_io, "open", open_on_full_disk(room), raising=False)


@pytest.mark.parametrize("room", [0, 100, 3000])
def test_disk_full_in_torch_save_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, room):
    # torch.save("path") would report "basic_ios::clear: iostream error" here, and
    # torch.save(file) an "unexpected pos": the ENOSPC itself must come out.
    target = tmp_path / "head_rank00001.pt"
    atomic_torch_save({"step": 1}, target)
    _disk_with_room(monkeypatch, room)
    with pytest.raises(DiskFullError) as caught:
        atomic_torch_save({"w": torch.randn(4096)}, target)
    assert str(caught.value) == f"no space left on device writing {target} ({os.strerror(errno.ENOSPC)})"
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["head_rank00001.pt"]


def test_disk_full_in_text_write(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    _disk_with_room(monkeypatch, 10)
    with pytest.raises(DiskFullError, match=r"no space left on device writing .*manifest\.json \(No space"):
        atomic_write_text(target, "x" * 100)
    monkeypatch.undo()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["manifest.json"]


def test_file_size_limit_is_reported_like_a_full_disk(tmp_path):
    """A real file system, no mock: RLIMIT_FSIZE makes the kernel refuse the write (EFBIG),
    which works as root and without a small tmpfs to fill."""
    child = (
        "import resource, signal, sys, torch\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from partialfc.atomic_io import atomic_torch_save\n"
        "try:\n"
        "    atomic_torch_save({'w': torch.randn(10000)}, sys.argv[1])\n"
        "except OSError as error:\n"
        "    print(type(error).__name__, error.errno, error)\n"
    )
    target = tmp_path / "backbone.pt"
    target.write_bytes(b"old")
    result = subprocess.run([sys.executable, "-c", child, str(target)], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == f"DiskFullError {errno.EFBIG} no space left on device writing {target} " \
                                    f"({os.strerror(errno.EFBIG)})", result.stderr
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["backbone.pt"]
