"""Atomic writes: the final name holds the old file or the complete new one, nothing else."""
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from partialfc.atomic_io import TEMP_PREFIX, atomic_output_path, atomic_torch_save, atomic_write_text


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
