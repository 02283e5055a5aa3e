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
import pickletools
from typing import List, Sequence, Tuple

import numpy as np

from partialfc.atomic_io import atomic_output_path
from partialfc.data.decode import MAX_IMAGE_PIXELS, decode_rgb

__all__ = [
    "UnsafePickleError",
    "read_bin",
    "parse_bin",
    "write_bin",
    "decode_image",
    "decode_images",
    "MAX_IMAGE_PIXELS",
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


# Every opcode a pickle of (bins, issame) needs at any protocol, from Python 2 or 3, and
# a few harmless ones. The rest (BUILD, object creation, extension codes, out-of-band
# buffers, bytearrays ...) is refused before unpickling starts: find_class alone stops
# code from running, but the C unpickler still does odd things with a crafted stream
# (a protocol-5 buffer over a bytearray prints "SystemError: deallocated bytearray" to
# stderr, for one).
_ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "NONE",
    # Not in a pair list, but harmless: let the structure check name what was found.
    "FLOAT", "BINFLOAT", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "GLOBAL", "STACK_GLOBAL", "REDUCE",  # only for _codecs.encode, checked by name
})


def _check_opcodes(data: bytes, source: str) -> None:
    """Refuse, before anything is unpickled, every opcode and global a pair list does not need."""
    strings: List[str] = []  # the last two text arguments: STACK_GLOBAL's module and name
    for opcode, argument, position in pickletools.genops(data):
        if opcode.name not in _ALLOWED_OPCODES:
            raise UnsafePickleError(
                f"{source}: refusing pickle opcode {opcode.name} at byte {position}; a verification "
                ".bin may only contain tuples, lists, bytes and bools"
            )
        if opcode.name in ("GLOBAL", "STACK_GLOBAL"):
            if opcode.name == "GLOBAL":
                module, _, name = argument.partition(" ")
            else:  # module and name were pushed as the two texts before it
                module, name = (["?", "?"] + strings)[-2:]
            if (module, name) != ("_codecs", "encode"):
                raise UnsafePickleError(
                    f"{source}: refusing to load pickle global {module}.{name}; a verification "
                    ".bin may only contain tuples, lists, bytes and bools"
                )
        elif isinstance(argument, str):
            strings = [strings[-1], argument] if strings else [argument]


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
        return parse_bin(handle.read(), source)


def parse_bin(data: bytes, source: str = "<bytes>") -> Tuple[List[bytes], np.ndarray]:
    """``read_bin`` on the file's bytes; ``source`` names it in errors."""
    try:
        _check_opcodes(data, source)
        obj = _PairsUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError as error:
        if str(error).startswith(source):
            raise
        raise UnsafePickleError(f"{source}: {error}") from error
    except Exception as error:  # noqa: BLE001
        # Only plain opcodes and _latin1_encode can run here, so whatever else goes wrong
        # (truncation, a mangled opcode calling a list, a length field of 2**60 bytes:
        # UnpicklingError, EOFError, TypeError, AttributeError, OverflowError, MemoryError ...)
        # is a damaged file, not a bug to show a traceback for.
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise ValueError(f"{source}: not a readable verification .bin pickle ({detail})") from error
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
    """Decode one encoded image to uint8 RGB ``(H, W, 3)``, resized to ``image_size`` (H, W).

    Through ``partialfc.data.decode.decode_rgb``, the training loaders' decoder rule:
    the same formats, and a header promising more than ``MAX_IMAGE_PIXELS`` (a
    decompression bomb: kilobytes on disk, gigabytes decoded) is refused before any pixel
    is decoded. Errors are ``CorruptImageError`` (a ValueError) naming ``source``.
    """
    height, width = image_size
    return decode_rgb(data, source, (width, height))


def decode_images(
    bins: Sequence[bytes], image_size: Tuple[int, int] = (112, 112), source: str = "<bins>"
) -> np.ndarray:
    """Decode all images to one uint8 array ``(N, 3, H, W)`` (channels first, RGB)."""
    height, width = image_size
    out = np.empty((len(bins), 3, height, width), dtype=np.uint8)
    for index, data in enumerate(bins):
        out[index] = decode_image(data, image_size, f"{source}: image {index}").transpose(2, 0, 1)
    return out
