"""Atomic file writes: a reader finds the old file or the new one, never part of one.

Checkpoints, the RecordIO index cache, eval results and exported models are read back
by later runs and other tools. A crash, a SIGKILL from the scheduler or a full disk in
the middle of a plain ``open(path, "w")`` leaves a truncated file under the final name,
and the next reader fails on it or, worse, half-reads it. So every write here

* goes to a temp file in the *same directory* as the target, so that ``os.replace`` is
  a rename within one file system, which POSIX makes atomic;
* is fsynced before the rename: without it, after a power loss the rename can be on
  disk while the data is not, which is a truncated file under the final name again;
* fsyncs the directory after the rename, so the new name itself survives a power loss
  (a checkpoint's ``latest`` pointer must not step back to a pruned directory);
* removes the temp file on any error, KeyboardInterrupt included, and leaves the old
  file untouched. Only a SIGKILL can leave a temp file behind: a hidden ``.tmp-*``
  name that no reader looks for;
* reports a full disk (or quota, or file-size limit) as ``DiskFullError`` naming the file
  being written. ``torch.save(obj, "path")`` writes through a C++ stream that turns
  ENOSPC into ``basic_ios::clear: iostream error``, so torch writes here go through a
  Python file object whose OSError is kept and re-raised.

The temp file is created with the usual umask permissions (not ``mkstemp``'s 0600), so
the result has the permissions a plain ``open`` would have given it.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

TEMP_PREFIX = ".tmp-"
# errno values that mean "the bytes did not fit": no space, quota, RLIMIT_FSIZE.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(OSError, ValueError):
    """A write that did not fit on the device; the message names the file and keeps the
    OS error text. An OSError (errno kept), so ``except OSError`` still catches it, and a
    ValueError, so the entrypoints report it as one line like other bad conditions."""

    def __init__(self, path: str, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        super().__init__(cause.errno, f"no space left on device writing {path} ({reason})")

    def __str__(self) -> str:
        return self.strerror


@contextlib.contextmanager
def atomic_output_path(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside ``target``; when the block ends cleanly it becomes ``target``.

    For writers that want a path (``torch.save``, ``torch.onnx.export``, ``savefig``) or
    that open it themselves. Whatever they opened must be closed when the block ends.
    The temp name ends with the target's name, so writers that pick the format from the
    extension see the same one. A missing folder is a ValueError naming it.
    """
    target = os.fspath(target)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise ValueError(f"cannot write {target}: output folder does not exist: {directory}")
    try:
        temp_path = _reserve_temp_path(directory, os.path.basename(target))
    except OSError as error:
        _raise_if_disk_full(error, target)
        raise
    try:
        yield temp_path
        _fsync(temp_path)  # delayed allocation (ext4, NFS) reports a full disk here or at close
        os.replace(temp_path, target)
        _fsync_directory(directory)
    except OSError as error:
        _raise_if_disk_full(error, target)
        raise
    finally:
        if os.path.exists(temp_path):
            os.unlink(temp_path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_output_path(path) as temp_path, open(temp_path, "w", encoding="utf-8") as handle:
        handle.write(text)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a log file (metrics.jsonl): not atomic -- a crash or a full disk can leave
    a torn last line, which its readers skip -- but a full disk is reported as
    DiskFullError naming the file, like every other write here."""
    try:
        with open(path, "a") as handle:
            handle.write(text)
    except OSError as error:
        _raise_if_disk_full(error, str(path))
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically; a full disk is a ``DiskFullError``."""
    import torch  # deferred: the data and eval tools use this module without torch

    with atomic_output_path(path) as temp_path, open(temp_path, "wb") as handle:
        writer = _ErrorKeepingWriter(handle)
        try:
            torch.save(obj, writer)
        except Exception:
            writer.raise_kept_error()
            raise
        writer.raise_kept_error()  # in case torch swallowed it and wrote on


class _ErrorKeepingWriter:
    """The file object handed to ``torch.save``. Torch's serializer catches an exception
    raised by ``write`` and fails later with an unrelated message ("unexpected pos"), so
    the first OSError is kept here to be re-raised as what went wrong."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            if self.error is None:
                self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()

    def raise_kept_error(self) -> None:
        if self.error is not None:
            raise self.error


def _raise_if_disk_full(error: OSError, target: str) -> None:
    if error.errno in DISK_FULL_ERRNOS and not isinstance(error, DiskFullError):
        raise DiskFullError(target, error) from error


def _reserve_temp_path(directory: str, name: str) -> str:
    """Create an empty, not yet used temp file (O_EXCL) and return its path."""
    for _ in range(100):
        path = os.path.join(directory, f"{TEMP_PREFIX}{os.urandom(4).hex()}-{name}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temp file name for {name!r} in {directory}")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: str) -> None:
    try:
        _fsync(directory)
    except OSError as error:  # some file systems cannot fsync a directory; the rename stands
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
