"""The launch scripts in cluster/: which interpreter they run, what they pass it, what they ship.

The scripts are run for real by bash, with stand-ins for python (and srun / scontrol)
that record their arguments, so nothing trains: a new user's path (``make demo``
leaves torch in ``.venv`` only) is checked without a cluster or a training run.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["cluster/local.sh", "cluster/slurm/train.sbatch", "cluster/slurm/test_local_cluster.sh"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the cluster scripts need bash")


def _executable(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def recording_python(path: Path, log: Path, has_torch: bool = True) -> Path:
    """A stand-in interpreter: answers the torch probe, records every other argv to ``log``."""
    probe = "exit 0" if has_torch else "exit 1"
    return _executable(path, f'if [[ "$1" == -c ]]; then {probe}; fi\n'
                             f'printf "%s\\n" "$0" "$@" > "{log}"\n')


@pytest.fixture
def fake_repo(tmp_path):
    """A copy of cluster/ beside a config, and a bin/ with a recording python3 for PATH."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "cluster", repo / "cluster")
    (repo / "cfg.toml").write_text("")
    bin_dir = tmp_path / "bin"
    recording_python(bin_dir / "python3", tmp_path / "system_python.log")
    return repo, bin_dir


def run_script(args, cwd: Path, bin_dir: Path, **env) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "NPROC")}
    environment.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", NPROC="2", **env)
    return subprocess.run(["bash", *map(str, args)], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True, timeout=30)


def test_local_sh_runs_the_project_venv_by_default(fake_repo):
    repo, bin_dir = fake_repo
    venv_log = repo.parent / "venv_python.log"
    venv_python = recording_python(repo / ".venv" / "bin" / "python", venv_log)
    result = run_script([repo / "cluster/local.sh", "cfg.toml", "--max-restarts=1", "--", "--set", "a.b=1"],
                        repo, bin_dir)
    assert result.returncode == 0, result.stderr
    assert venv_log.read_text().splitlines() == [
        str(venv_python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--max-restarts=1", "-m", "partialfc.train", "cfg.toml", "--set", "a.b=1"]
    assert not (repo.parent / "system_python.log").exists()


def test_local_sh_python_override_and_fallback(fake_repo, tmp_path):
    repo, bin_dir = fake_repo
    # No .venv: python3 from PATH.
    assert run_script([repo / "cluster/local.sh", "cfg.toml"], repo, bin_dir).returncode == 0
    assert (tmp_path / "system_python.log").read_text().splitlines()[1:3] == ["-m", "torch.distributed.run"]
    # PYTHON wins over a .venv.
    recording_python(repo / ".venv" / "bin" / "python", tmp_path / "venv_python.log")
    mine = recording_python(tmp_path / "mine" / "python", tmp_path / "mine.log")
    assert run_script([repo / "cluster/local.sh", "cfg.toml"], repo, bin_dir, PYTHON=str(mine)).returncode == 0
    assert (tmp_path / "mine.log").exists() and not (tmp_path / "venv_python.log").exists()


def test_local_sh_without_torch_is_one_line(fake_repo, tmp_path):
    repo, bin_dir = fake_repo
    bare = recording_python(tmp_path / "bare" / "python", tmp_path / "bare.log", has_torch=False)
    result = run_script([repo / "cluster/local.sh", "cfg.toml"], repo, bin_dir, PYTHON=str(bare))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"cluster/local.sh: '{bare}' cannot import torch; run 'make install' (creates {repo}/.venv) "
        "or set PYTHON to an interpreter with partialfc installed"]
    assert not (tmp_path / "bare.log").exists()


def test_train_sbatch_runs_the_project_venv_by_default(fake_repo, tmp_path):
    repo, bin_dir = fake_repo
    venv_python = recording_python(repo / ".venv" / "bin" / "python", tmp_path / "venv_python.log")
    _executable(bin_dir / "scontrol", 'echo node1\n')
    srun_log = tmp_path / "srun.log"
    _executable(bin_dir / "srun", f'printf "%s\\n" "$@" > "{srun_log}"\n')
    result = run_script([repo / "cluster/slurm/train.sbatch", "cfg.toml"], tmp_path, bin_dir,
                        SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", PARTIALFC_ROOT=str(repo), GPUS="0",
                        OUTPUT=str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    srun_args = srun_log.read_text().splitlines()
    command = srun_args[srun_args.index("node-wrapper") + 1:]
    assert command[:3] == [str(venv_python), "-m", "torch.distributed.run"]
    assert command[command.index("-m", 3):][:3] == ["-m", "partialfc.train", "cfg.toml"]


def test_slurm_check_uses_the_shipped_template():
    script = (REPO / "cluster/slurm/test_local_cluster.sh").read_text()
    default = re.search(r'^TEMPLATE=\$\{SLURM_TEMPLATE:-(.+)\}$', script, re.MULTILINE).group(1)
    assert default == "$REPO/cluster/slurm/slurm-local.conf"
    assert "/work/" not in script  # nothing outside the project
    template = (REPO / "cluster/slurm/slurm-local.conf").read_text()
    settings = [line for line in template.splitlines() if line and not line.startswith("#")]
    # Every placeholder the script fills in is there, as `KEY=PLACEHOLDER` or `KEY=RUN/...`.
    for placeholder in ("=HOST", "=CPUS", "=MEM", "=RUN/"):
        assert any(placeholder in line for line in settings), placeholder
    assert any(line.startswith("AuthType=auth/munge") for line in settings)
