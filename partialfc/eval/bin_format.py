"""Reader and writer of the verification ``.bin`` format (LFW, CFP-FP, AgeDB-30 ...).

A ``.bin`` is a pickle of ``(bins, issame)``: ``bins`` holds ``2 * P`` encoded images
(JPEG in the public sets) and ``issame`` holds ``P`` booleans, pair ``i`` being images
``2i`` and ``2i + 1``. The public files come from the internet and pickle can run any
code it is told to, so they are read with an unpickler that refuses every global
lookup: tuples, lists, bytes and bools are built by plain pickle opcodes and need
none, so a genuine file loads and a crafted one stops before anything runs. The one
exception is ``_codecs.encode(text, "latin1")``, which Python 3 uses for bytes at
pickle protocols below 3; it is served by a stand-in that only encodes text.

Files written by Python 2 (the original insightface sets) store images as ``str``;
``encoding="bytes"`` turns them back into ``bytes``.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from partialfc.atomic_io import atomic_output_path

__all__ = [
    "UnsafePickleError",
    "read_bin",
    "write_bin",
    "decode_image",
    "decode_images",
]


class UnsafePickleError(ValueError):
    """A ``.bin`` pickle asked to build something other than tuple/list/bytes/bool."""


def _latin1_encode(text, encoding="latin1"):
    """The one call a protocol-0/1/2 pickle of bytes needs; nothing else is reachable."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(
            f"refusing _codecs.encode({type(text).__name__}, {encoding!r}); only latin1 text is allowed"
        )
    return text.encode("latin1")


class _PairsUnpickler(pickle.Unpickler):
    """Unpickler for ``(bins, issame)``; any global (class, function) is refused."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) == ("_codecs", "encode"):
            # Python 3 writes bytes at protocol < 3 as _codecs.encode(text, "latin1").
            return _latin1_encode
        raise UnsafePickleError(
            f"{self._source}: refusing to load pickle global {module}.{name}; a verification "
            ".bin may only contain tuples, lists, bytes and bools"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source}: refusing pickle persistent id {pid!r}")


def _validate(obj, source: str) -> Tuple[List[bytes], np.ndarray]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(
            f"{source}: expected a pickled (bins, issame) pair, got {type(obj).__name__}"
            + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        )
    bins, issame = obj
    if not isinstance(bins, (tuple, list)):
        raise ValueError(f"{source}: bins must be a list of image bytes, got {type(bins).__name__}")
    if not isinstance(issame, (tuple, list)):
        raise ValueError(f"{source}: issame must be a list of bools, got {type(issame).__name__}")
    for index, item in enumerate(bins):
        if not isinstance(item, (bytes, bytearray)):
            raise ValueError(f"{source}: bins[{index}] is {type(item).__name__}, expected bytes")
    for index, item in enumerate(issame):
        if not isinstance(item, bool):
            raise ValueError(f"{source}: issame[{index}] is {item!r}, expected a bool")
    if len(bins) != 2 * len(issame):
        raise ValueError(
            f"{source}: {len(bins)} images for {len(issame)} pairs; expected exactly 2 per pair"
        )
    if not issame:
        raise ValueError(f"{source}: the file holds no pairs")
    return [bytes(item) for item in bins], np.asarray(issame, dtype=bool)


def read_bin(path: str | os.PathLike) -> Tuple[List[bytes], np.ndarray]:
    """Read a ``.bin`` file safely; returns ``(bins, issame)`` with ``issame`` a bool array."""
    source = os.fspath(path)
    with open(source, "rb") as handle:
        data = handle.read()
    try:
        obj = _PairsUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError as error:
        if str(error).startswith(source):
            raise
        raise UnsafePickleError(f"{source}: {error}") from error
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, IndexError) as error:
        raise ValueError(f"{source}: not a readable verification .bin pickle ({error})") from error
    return _validate(obj, source)


def write_bin(path: str | os.PathLike, bins: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``(bins, issame)`` atomically (``partialfc.atomic_io``)."""
    target = os.fspath(path)
    bins_list = list(bins)
    issame_list = [bool(item) if isinstance(item, (bool, np.bool_)) else item for item in issame]
    _validate((bins_list, issame_list), target)
    with atomic_output_path(target) as temp_path, open(temp_path, "wb") as out:
        pickle.dump(
            ([bytes(item) for item in bins_list], issame_list), out, protocol=pickle.HIGHEST_PROTOCOL
        )


def decode_image(data: bytes, image_size: Tuple[int, int], source: str = "<bytes>") -> np.ndarray:
    """Decode one encoded image to uint8 RGB ``(H, W, 3)``, resized to ``image_size`` (H, W)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            height, width = image_size
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{source}: cannot decode image ({error})") from error


def decode_images(
    bins: Sequence[bytes], image_size: Tuple[int, int] = (112, 112), source: str = "<bins>"
) -> np.ndarray:
    """Decode all images to one uint8 array ``(N, 3, H, W)`` (channels first, RGB)."""
    height, width = image_size
    out = np.empty((len(bins), 3, height, width), dtype=np.uint8)
    for index, data in enumerate(bins):
        out[index] = decode_image(data, image_size, f"{source}: image {index}").transpose(2, 0, 1)
    return out
