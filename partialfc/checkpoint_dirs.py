"""Checkpoint directories of a run: which exist, which are complete, which to resume from.

A step directory is complete when its ``manifest.json`` parses, has the current format
and every file it implies exists (the rank-0 files and the head shards it lists). A run
killed while saving leaves a ``step_*.tmp`` directory (ignored here) or, with older
versions, a step directory without a manifest; ``latest`` may then be missing or name
it, and a kill between the rename and the ``latest`` write leaves it one behind. So
``latest`` is a hint: ``newest_complete`` takes the newest complete step directory and
says why when ``latest`` does not name it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

FORMAT = "partialfc-checkpoint/2"  # /2: engine state in torch format, any engine
RANK0_FILES = ("backbone.pt", "backbone_optimizer.pt")  # besides the head shards the manifest lists
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or from another model."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(step_dir: str | os.PathLike) -> int:
    """The step of a checkpoint directory: from a ``step_*`` name, else from its manifest."""
    step_dir = Path(step_dir)
    match = _STEP_DIR.fullmatch(step_dir.name)
    if match:
        return int(match.group(1))
    try:
        return int(json.loads((step_dir / "manifest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{step_dir}: cannot tell its step ({exc})") from None


def checkpoint_problem(step_dir: Path) -> Optional[str]:
    """Why ``step_dir`` is not a complete checkpoint (e.g. "has no manifest.json"), or None."""
    step_dir = Path(step_dir)
    manifest_file = step_dir / "manifest.json"
    if not manifest_file.is_file():
        return "has no manifest.json" if step_dir.is_dir() else "does not exist"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as exc:
        return f"has an unreadable manifest.json ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        return f"has a manifest.json of format {found!r}, not {FORMAT!r}"
    try:
        files = [*RANK0_FILES, *(shard["file"] for shard in manifest["head_shards"])]
    except (KeyError, TypeError):
        return "has a manifest.json without head shards"
    missing = [name for name in files if not (step_dir / name).is_file()]
    return f"lacks {', '.join(missing)}" if missing else None


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """The ``step_*`` directories of a checkpoints root, oldest first (``.tmp`` ones left out)."""
    found = []
    for path in Path(root).glob("step_*"):
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def newest_complete(root: str | os.PathLike) -> tuple[Optional[Path], Optional[str]]:
    """``(checkpoint, warning)``: where a run in checkpoints root ``root`` resumes from.

    The newest complete step directory, by its manifest and files. ``latest`` is only a
    hint (written after the step directory is renamed into place, so a kill in between
    leaves it one checkpoint behind): when it does not name that directory, the warning
    says what was wrong with it. ``(None, None)`` when there are no step directories at
    all; a CheckpointError when there are some but none is complete: starting over would
    write over them.
    """
    root = Path(root)
    latest = root / "latest"
    if latest.is_file():
        name = latest.read_text(errors="replace").strip()
        problem = checkpoint_problem(root / name) if _STEP_DIR.fullmatch(name) else "is not a step directory"
        why = f"{latest} names {name!r}, which {problem}" if problem else f"{latest} names the older {name!r}"
    else:
        name, why = None, f"{latest} is missing"
    candidates = step_dirs(root)
    problems = []
    for step_dir in reversed(candidates):
        problem = checkpoint_problem(step_dir)
        if problem is None:
            if step_dir.name == name:
                return step_dir, None
            return step_dir, f"{why}; using {step_dir.name}, the newest complete checkpoint"
        problems.append(f"{step_dir.name} {problem}")
    if not candidates:
        return None, None
    raise CheckpointError(f"no complete checkpoint in {root} ({why}; {'; '.join(problems)})")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory from a step directory, a checkpoints root or a run directory
    (for a root: ``newest_complete``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if (path / "manifest.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file() or step_dirs(root):
            found, _ = newest_complete(root)
            if found is not None:
                return found
    raise CheckpointError(f"no checkpoint at {str(path)!r} (no manifest.json, no 'latest' file, no step directory)")


def find_latest(output: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a run directory resumes from (``newest_complete``), or None."""
    try:
        return newest_complete(Path(output) / "checkpoints")[0]
    except CheckpointError:
        return None
