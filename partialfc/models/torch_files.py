"""Read a torch file a user named, safely, with a one-line reason when it cannot be read.

Checkpoint arguments of the eval, export, clean and invert tools are files from the
user, sometimes from the internet. ``torch.load(weights_only=True)`` never runs code
from the file, but when it refuses one its messages run over many lines and suggest
retrying with ``weights_only=False``, the one thing a user must not do with a file
they do not trust. ``read_weights_only`` turns every failure into a ``ValueError``
that names the file and says in a few words what is wrong with it.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

__all__ = ["read_weights_only"]

_MAX_DETAIL = 160


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:_MAX_DETAIL]
    return ""


def _weights_only_detail(message: str) -> str:
    """The unpickler's own reason ("Unsupported global: GLOBAL os.system ...") from torch's long text."""
    _, found, rest = message.partition("WeightsUnpickler error:")
    detail = _first_line(rest) if found else ""
    # torch goes on with how to allow-list the global; that advice is not for an untrusted file.
    return re.split(r"\.\s+Please use|\s+was not an allowed global", detail)[0]


def describe_load_failure(error: BaseException) -> str:
    """A short phrase for why ``torch.load(weights_only=True)`` failed on a file."""
    message = str(error)
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in message:
        detail = _weights_only_detail(message)
        if detail.startswith("Unsupported global"):
            return (f"it asks to unpickle something other than tensors and plain values ({detail}); "
                    "refused, nothing in it was run")
        return f"not a torch file, or one holding more than tensors and plain values ({detail or 'refused'})"
    if isinstance(error, EOFError):
        return "the file is empty or truncated"
    if isinstance(error, RuntimeError) and "PytorchStreamReader" in message:
        return f"corrupt or truncated torch file ({_first_line(message).split('. ')[0]})"
    return f"cannot be read as a torch file ({type(error).__name__}: {_first_line(message)})"


def read_weights_only(file: Path, mmap: bool = False, what: str = "torch file"):
    """``torch.load(file, weights_only=True)`` on CPU; any failure is a ValueError naming ``file``.

    ``mmap``: map a zip-format file instead of reading it, so a large tensor the caller
    does not use (the class centers in a consolidated file) costs no memory. Legacy
    (non-zip) files cannot be mapped and are read as usual.
    """
    use_mmap = mmap and zipfile.is_zipfile(file)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of foreign files: noise on top of the real error.
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except OSError as error:
        raise ValueError(f"{file}: cannot read the file ({error.strerror or error})") from error
    except Exception as error:  # noqa: BLE001 - torch.load reports a bad file through many types
        raise ValueError(f"{file}: not a {what}: {describe_load_failure(error)}") from error
