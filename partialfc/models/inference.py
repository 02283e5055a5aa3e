"""The backbone file: one self-describing file that every follow-up tool loads.

Evaluation, ONNX export, dataset cleaning and inversion all need "the trained
backbone" without the head, optimizer or config of the run. A backbone file is
a torch.save of::

    {"format": "partialfc-backbone/1", "name": <registry name>,
     "kwargs": <build_backbone kwargs>, "state_dict": <tensors, CPU>}

so the loader can rebuild the module by name and load its weights without the
training code or the config. Only plain types are stored, so it loads with
``torch.load(weights_only=True)``.

``load_backbone`` accepts the file itself, a checkpoint step directory holding
``backbone.pt``, or a checkpoints root holding a text file ``latest`` that names
the step directory to use.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

from partialfc.atomic_io import atomic_torch_save
from partialfc.models.registry import build_backbone, get_backbone_factory

BACKBONE_FORMAT = "partialfc-backbone/1"
BACKBONE_FILENAME = "backbone.pt"
LATEST_FILENAME = "latest"
# Prefixes added by wrappers: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

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


def resolve_backbone_path(path: PathLike) -> Path:
    """The backbone file meant by ``path`` (file, step dir, or root with ``latest``)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"backbone path does not exist: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"backbone path is neither a file nor a directory: {path}")

    candidate = path / BACKBONE_FILENAME
    if candidate.is_file():
        return candidate
    latest = path / LATEST_FILENAME
    if not latest.is_file():
        raise FileNotFoundError(
            f"{path} holds neither {BACKBONE_FILENAME!r} (a checkpoint step directory) "
            f"nor {LATEST_FILENAME!r} (a checkpoints root)"
        )
    step_name = latest.read_text(encoding="utf-8").strip()
    # `latest` names a sibling subdirectory; refuse anything that walks elsewhere.
    if not step_name or step_name in (".", "..") or Path(step_name).name != step_name:
        raise ValueError(f"{latest}: expected the name of a step subdirectory, got {step_name!r}")
    candidate = path / step_name / BACKBONE_FILENAME
    if not candidate.is_file():
        raise FileNotFoundError(f"{latest} points to {step_name!r}, but {candidate} does not exist")
    return candidate


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


def _read_backbone_file(file: Path, map_location) -> dict:
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, UnicodeDecodeError) as err:
        # torch.load reports a non-torch or unsafe file through any of these
        # (KeyError / EOFError come from its legacy-format fallback).
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{file}: not a {BACKBONE_FORMAT} file; torch.load(weights_only=True) failed with "
            f"{type(err).__name__}: {first_line[:200]}"
        ) from err
    if not isinstance(payload, dict):
        raise ValueError(f"{file}: expected a dict with format {BACKBONE_FORMAT!r}, got {type(payload).__name__}")
    file_format = payload.get("format")
    if file_format != BACKBONE_FORMAT:
        raise ValueError(f"{file}: field 'format' is {file_format!r}, expected {BACKBONE_FORMAT!r}")
    for field, kind in (("name", str), ("kwargs", dict), ("state_dict", dict)):
        if not isinstance(payload.get(field), kind):
            raise ValueError(
                f"{file}: field {field!r} must be a {kind.__name__}, got {payload.get(field)!r:.80}"
            )
    return payload


def _check_state_dict_matches(file: Path, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key in sorted(set(expected) & set(state_dict)):
        if tuple(state_dict[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"shape of {key!r} is {tuple(state_dict[key].shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    if problems:
        raise ValueError(f"{file}: state_dict does not match the backbone: " + "; ".join(problems))


def load_backbone(path: PathLike, map_location="cpu") -> nn.Module:
    """Rebuild the backbone stored at ``path`` and return it in eval mode.

    ``path`` is a backbone file, a checkpoint step directory holding
    ``backbone.pt``, or a checkpoints root whose ``latest`` file names the step
    directory. ``map_location`` is passed to torch.load; when it is a device
    (str or torch.device) the returned module is moved there too.
    """
    file = resolve_backbone_path(path)
    payload = _read_backbone_file(file, map_location)
    try:
        model = build_backbone(payload["name"], **payload["kwargs"])
    except (ValueError, TypeError) as err:
        raise type(err)(f"{file}: cannot build the stored backbone: {err}") from err
    state_dict = _strip_wrapper_prefixes(payload["state_dict"])
    _check_state_dict_matches(file, model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def read_backbone_state(path: PathLike, model: nn.Module, map_location="cpu") -> dict:
    """A stored backbone's state dict, checked against ``model`` but not loaded into it.

    For callers that load through something else (a training engine, which must also
    refresh its own copy of the weights). Same checks as ``load_backbone``: format,
    wrapper prefixes, and a mismatch report naming missing, unexpected and mis-shaped keys.
    """
    file = resolve_backbone_path(path)
    payload = _read_backbone_file(file, map_location)
    state_dict = _strip_wrapper_prefixes(payload["state_dict"])
    _check_state_dict_matches(file, model, state_dict)
    return state_dict
