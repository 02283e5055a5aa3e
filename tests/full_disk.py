"""A stand-in for ``open`` in partialfc.atomic_io that runs out of disk space.

``open_on_full_disk(room, pattern)`` returns an ``open`` whose files named with
``pattern`` (every file when empty) accept ``room`` bytes and then raise ENOSPC, as a
write on a full device does. Patch it over ``partialfc.atomic_io.open``.
"""
from __future__ import annotations

import builtins
import errno
import os


class FillingFile:
    """A file on a device with ``room`` bytes left: a write past it raises ENOSPC."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def open_on_full_disk(room: int = 0, pattern: str = ""):
    def fake_open(path, *args, **kwargs):
        handle = builtins.open(path, *args, **kwargs)
        return FillingFile(handle, room) if pattern in os.path.basename(str(path)) else handle

    return fake_open
