"""The backbone file, and the one loader every follow-up tool uses for its CHECKPOINT.

Evaluation, ONNX export, dataset cleaning and inversion all need "the trained
backbone" without the head, optimizer or config of the run. A backbone file is
a torch.save of::

    {"format": "partialfc-backbone/1", "name": <registry name>,
     "kwargs": <build_backbone kwargs>, "state_dict": <tensors, CPU>}

so the loader can rebuild the module by name and load its weights without the
training code or the config. Only plain types are stored, so it loads with
``torch.load(weights_only=True)``.

``load_model`` / ``load_backbone`` accept every form a user has at hand, so all the
tools agree on what CHECKPOINT means: a run directory (``checkpoints/latest``), a
checkpoints root (``latest``), a step directory, ``backbone.pt`` itself, or the one
file ``python -m partialfc.checkpoint consolidate`` writes (``partialfc-consolidated/1``:
the backbone payload under ``"backbone"`` plus the full ``(C, K, D)`` center matrix).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

import torch
from torch import nn

from partialfc.atomic_io import atomic_torch_save
from partialfc.models.registry import build_backbone, get_backbone_factory
from partialfc.models.torch_files import read_weights_only

BACKBONE_FORMAT = "partialfc-backbone/1"
CONSOLIDATED_FORMAT = "partialfc-consolidated/1"  # partialfc.checkpoint.consolidate
BACKBONE_FILENAME = "backbone.pt"
LATEST_FILENAME = "latest"
MANIFEST_FILENAME = "manifest.json"
CHECKPOINTS_DIRNAME = "checkpoints"  # a run directory's checkpoints root
# Prefixes added by wrappers: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_KEYS_SHOWN = 5  # a mismatch report stays one readable line

PathLike = Union[str, os.PathLike]
_PLAIN_TYPES = (str, int, float, bool, type(None))


def _check_plain(value, where: str) -> None:
    """Kwargs must survive weights_only loading: plain scalars, lists, tuples, dicts."""
    if isinstance(value, _PLAIN_TYPES):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict keys must be str, got {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} must be a plain value (str/int/float/bool/None/list/tuple/dict), "
        f"got {type(value).__name__} {value!r}"
    )


def save_backbone(path: PathLike, name: str, kwargs: dict, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write a backbone file atomically (``partialfc.atomic_io``).

    ``name`` must be a registered backbone and ``kwargs`` the arguments it was
    built with. Tensors are detached and moved to CPU; wrapper prefixes are
    kept as given (the loader strips them).
    """
    get_backbone_factory(name)  # unknown name -> ValueError now, not at load time
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__} {kwargs!r}")
    _check_plain(kwargs, "kwargs")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state_dict entries must be str -> Tensor, got {key!r} -> {type(value).__name__}"
            )
        tensors[key] = value.detach().cpu()
    payload = {"format": BACKBONE_FORMAT, "name": name, "kwargs": dict(kwargs), "state_dict": tensors}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, path)


# ---------------------------------------------------------------------------- what a path names
def _step_dir_of(path: Path) -> Path:
    """The step directory meant by directory ``path`` (step dir, checkpoints root or run dir).

    For a root, the newest complete checkpoint (``checkpoint_dirs.newest_complete``, the
    rule training resumes by: ``latest`` is a hint that a crash can leave stale). A root
    of backbone-only step directories (no manifests: exported by hand) falls back to the
    directory ``latest`` names, if it holds a backbone.
    """
    from partialfc.checkpoint_dirs import CheckpointError, newest_complete, step_dirs

    if (path / BACKBONE_FILENAME).is_file():
        return path
    for root in (path, path / CHECKPOINTS_DIRNAME):
        latest = root / LATEST_FILENAME
        if not (latest.is_file() or step_dirs(root)):
            continue
        try:
            found, _warning = newest_complete(root)
        except CheckpointError as error:
            found, incomplete = None, error
        else:
            incomplete = None
        if found is not None:
            return found
        if not latest.is_file():
            raise incomplete
        step_name = latest.read_text(encoding="utf-8", errors="replace").strip()
        # `latest` names a sibling subdirectory; refuse anything that walks elsewhere.
        if not step_name or step_name in (".", "..") or Path(step_name).name != step_name:
            raise ValueError(f"{latest}: expected the name of a step subdirectory, got {step_name!r}")
        candidate = root / step_name / BACKBONE_FILENAME
        if candidate.is_file():
            return root / step_name
        if incomplete is not None:
            raise incomplete
        raise FileNotFoundError(f"{latest} points to {step_name!r}, but {candidate} does not exist")
    raise FileNotFoundError(
        f"{path} holds neither {BACKBONE_FILENAME!r} (a checkpoint step directory) nor complete step_* "
        f"checkpoints or {LATEST_FILENAME!r} (a checkpoints root) nor '{CHECKPOINTS_DIRNAME}/' (a run directory)"
    )


def _resolve(path: PathLike) -> Tuple[Path, Optional[Path]]:
    """(file to read, checkpoint step directory or None) for a CHECKPOINT argument."""
    path = Path(path)
    if path.is_file():
        return path, None  # a file stands for itself: backbone.pt or a consolidated file
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path is neither a file nor a directory: {path}")
    step_dir = _step_dir_of(path)
    return step_dir / BACKBONE_FILENAME, step_dir


def resolve_backbone_path(path: PathLike) -> Path:
    """The file holding the backbone meant by ``path``.

    A file (a backbone file or a ``checkpoint consolidate`` file) stands for itself; a
    directory is a step directory holding ``backbone.pt``, a checkpoints root, or a run
    directory holding ``checkpoints/`` (for a root: its newest complete checkpoint).
    """
    return _resolve(path)[0]


# ---------------------------------------------------------------------------- checking a payload
def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict:
    state = dict(state_dict)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                stripped = True
    return state


def _looks_like_state_dict(payload: dict) -> bool:
    return bool(payload) and all(isinstance(v, torch.Tensor) for v in payload.values())


def _check_backbone_payload(where: str, payload) -> dict:
    """``payload`` if it is a partialfc-backbone/1 dict; otherwise a ValueError about ``where``."""
    if not isinstance(payload, dict):
        raise ValueError(f"{where}: expected a dict with format {BACKBONE_FORMAT!r}, got {type(payload).__name__}")
    file_format = payload.get("format")
    if file_format != BACKBONE_FORMAT:
        hint = ""
        if file_format is None and _looks_like_state_dict(payload):
            hint = (" (it looks like a bare state dict: write it with partialfc.models.save_backbone, "
                    "which records the architecture too)")
        raise ValueError(
            f"{where}: field 'format' is {file_format!r:.80}, expected {BACKBONE_FORMAT!r} "
            f"or {CONSOLIDATED_FORMAT!r}{hint}"
        )
    for field, kind in (("name", str), ("kwargs", dict), ("state_dict", dict)):
        if not isinstance(payload.get(field), kind):
            raise ValueError(
                f"{where}: field {field!r} must be a {kind.__name__}, got {payload.get(field)!r:.80}"
            )
    for key, value in payload["state_dict"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: state_dict entries must be str -> Tensor, got {key!r:.80} -> "
                             f"{type(value).__name__}")
    return payload


def _check_centers(file: Path, payload: dict) -> torch.Tensor:
    centers = payload.get("centers")
    header = tuple(payload.get(key) for key in ("num_classes", "num_subcenters", "embedding_size"))
    if not isinstance(centers, torch.Tensor) or not centers.is_floating_point():
        raise ValueError(f"{file}: field 'centers' must be a float tensor, got {type(centers).__name__}")
    if tuple(centers.shape) != header:
        raise ValueError(f"{file}: 'centers' has shape {tuple(centers.shape)}, but the file's "
                         f"(num_classes, num_subcenters, embedding_size) is {header}")
    return centers


def _key_list(keys) -> str:
    shown = ", ".join(repr(key) for key in keys[:_MAX_KEYS_SHOWN])
    return f"[{shown}, ...] ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else f"[{shown}]"


def _check_state_dict_matches(where: str, name: str, model: nn.Module,
                              state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if expected and not set(expected) & set(state_dict):
        raise ValueError(f"{where}: state_dict does not match the backbone: none of its {len(state_dict)} keys "
                         f"belongs to {name!r} (weights of another architecture?); it has e.g. "
                         f"{_key_list(sorted(state_dict))}")
    problems = []
    if missing:
        problems.append(f"missing keys {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_key_list(unexpected)}")
    mismatched = [key for key in sorted(set(expected) & set(state_dict))
                  if tuple(state_dict[key].shape) != tuple(expected[key].shape)]
    for key in mismatched[:_MAX_KEYS_SHOWN]:
        problems.append(f"shape of {key!r} is {tuple(state_dict[key].shape)}, "
                        f"the model expects {tuple(expected[key].shape)}")
    if len(mismatched) > _MAX_KEYS_SHOWN:
        problems.append(f"{len(mismatched) - _MAX_KEYS_SHOWN} more shape mismatches")
    if problems:
        raise ValueError(f"{where}: state_dict does not match the backbone: " + "; ".join(problems))


def _read_backbone_payload(file: Path, mmap: bool = False) -> Tuple[dict, Optional[dict], str]:
    """(backbone payload, consolidated payload or None, label for messages) of ``file``."""
    payload = read_weights_only(file, mmap=mmap, what=f"{BACKBONE_FORMAT} file (nor a {CONSOLIDATED_FORMAT} one)")
    if isinstance(payload, dict) and payload.get("format") == CONSOLIDATED_FORMAT:
        where = f"{file} (its 'backbone')"
        return _check_backbone_payload(where, payload.get("backbone")), payload, where
    return _check_backbone_payload(str(file), payload), None, str(file)


def _build(where: str, payload: dict) -> Tuple[nn.Module, dict]:
    """(the module rebuilt from the payload, with the stored weights loaded; its state dict)."""
    try:
        model = build_backbone(payload["name"], **payload["kwargs"])
    except (ValueError, TypeError, RuntimeError) as err:
        message = " ".join(str(err).split())
        raise (TypeError if isinstance(err, TypeError) else ValueError)(
            f"{where}: cannot build the stored backbone: {message}") from err
    state_dict = _strip_wrapper_prefixes(payload["state_dict"])
    _check_state_dict_matches(where, payload["name"], model, state_dict)
    return model, state_dict


# ---------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class LoadedModel:
    """A backbone and, where its source stores the head, the class centers.

    ``source`` is what a report should name: the checkpoint step directory when a
    directory was given, otherwise the file read.
    """

    backbone: nn.Module
    centers: Optional[torch.Tensor]
    source: Path


def load_model(path: PathLike, map_location="cpu", centers: bool = False) -> LoadedModel:
    """The one loader behind every CHECKPOINT argument (verification, ijb, export, clean, invert).

    ``path`` is a run directory (``checkpoints/latest``), a checkpoints root
    (``latest``), a step directory, a ``backbone.pt`` file, or the file written by
    ``python -m partialfc.checkpoint consolidate``. Nothing is unpickled beyond tensors
    and plain values. With ``centers=True`` the ``(C, K, D)`` class centers are read
    too when the source has them (a step directory with head shards, a consolidated
    file); otherwise ``LoadedModel.centers`` is None. Every problem is a ValueError
    (TypeError for unusable stored kwargs, FileNotFoundError for a missing path) that
    names the file.
    """
    file, step_dir = _resolve(path)
    # A consolidated file also holds every center: map it, so an unused matrix costs nothing.
    payload, consolidated, where = _read_backbone_payload(file, mmap=True)
    model, state_dict = _build(where, payload)
    model.load_state_dict(state_dict, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    class_centers = None
    if consolidated is not None:
        class_centers = _check_centers(file, consolidated)
        if not centers:
            class_centers = None
    elif centers and step_dir is not None and (step_dir / MANIFEST_FILENAME).is_file():
        class_centers = load_class_centers(step_dir)
    return LoadedModel(model.eval(), class_centers, step_dir if step_dir is not None else file)


def _no_head_error(where: Path) -> ValueError:
    return ValueError(f"{where} holds only a backbone, no class centers: give the checkpoint's run or step "
                      f"directory, or the file 'python -m partialfc.checkpoint consolidate' writes")


def read_head_header(path: PathLike) -> Tuple[Path, dict]:
    """(source, header) of a checkpoint that has the head, for jobs that need the centers (clean).

    ``header`` holds at least ``num_classes``, ``num_subcenters`` and ``embedding_size``:
    the step directory's manifest, or the header fields of a consolidated file. A bare
    backbone file or a directory without ``manifest.json`` is a ValueError.
    """
    file, step_dir = _resolve(path)
    if step_dir is not None:
        if not (step_dir / MANIFEST_FILENAME).is_file():
            raise _no_head_error(step_dir)
        from partialfc.checkpoint import read_manifest  # deferred: checkpoint imports this module

        return step_dir, read_manifest(step_dir)
    payload = read_weights_only(file, mmap=True, what=f"{CONSOLIDATED_FORMAT} file")
    if not (isinstance(payload, dict) and payload.get("format") == CONSOLIDATED_FORMAT):
        raise _no_head_error(file)
    _check_backbone_payload(f"{file} (its 'backbone')", payload.get("backbone"))
    _check_centers(file, payload)
    return file, {key: value for key, value in payload.items() if key not in ("centers", "backbone")}


def load_class_centers(path: PathLike) -> torch.Tensor:
    """The ``(C, K, D)`` class centers of a step directory (any form) or a consolidated file."""
    file, step_dir = _resolve(path)
    if step_dir is not None:
        if not (step_dir / MANIFEST_FILENAME).is_file():
            raise _no_head_error(step_dir)
        from partialfc.checkpoint import load_centers

        return load_centers(step_dir)
    payload = read_weights_only(file, mmap=True, what=f"{CONSOLIDATED_FORMAT} file")
    if not (isinstance(payload, dict) and payload.get("format") == CONSOLIDATED_FORMAT):
        raise _no_head_error(file)
    return _check_centers(file, payload)


def load_backbone(path: PathLike, map_location="cpu") -> nn.Module:
    """Rebuild the backbone stored at ``path`` (any form ``load_model`` takes), in eval mode.

    ``map_location``: when it is a device (str or torch.device) the module is moved there.
    """
    return load_model(path, map_location).backbone


def read_backbone_state(path: PathLike, model: nn.Module, map_location="cpu") -> dict:
    """A stored backbone's state dict, checked against ``model`` but not loaded into it.

    For callers that load through something else (a training engine, which must also
    refresh its own copy of the weights). Same checks as ``load_backbone``: format,
    wrapper prefixes, and a mismatch report naming missing, unexpected and mis-shaped keys.
    """
    file = resolve_backbone_path(path)
    payload, _, where = _read_backbone_payload(file)
    state_dict = _strip_wrapper_prefixes(payload["state_dict"])
    _check_state_dict_matches(where, payload["name"], model, state_dict)
    if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type != "cpu":
        state_dict = {key: value.to(map_location) for key, value in state_dict.items()}
    return state_dict
