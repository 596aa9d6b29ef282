"""Writes that storage refuses, restated so the reader knows where, why and what to do.

A full disk or an unwritable folder surfaces deep inside a write as `OSError: [Errno 28]` with a
temporary file's name. Every writer of finished outputs (checkpoints, model folders, token
stores, study results) turns such an error into a `StorageError` that names the output, the
bytes it needed and the bytes free there, and leaves no complete-looking output behind (each
writer builds its output under a temporary name and publishes it last).

    check_writable("runs/")                      # before any work: refuse an unwritable root
    try:
        write(...)
    except OSError as e:
        raise storage_error(e, "runs/x/summary.json", needed_bytes=len(data)) from e
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # full disk, quota, file-size limit
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)


class StorageError(OSError):
    """Storage refused a write (full, read-only, no permission); the message names the path."""

    def __str__(self) -> str:
        return str(self.strerror)


def storage_error(
    error: OSError, path: str | Path, needed_bytes: int | None = None, *, at_least: bool = False
) -> OSError:
    """`error`, raised while writing `path`, as a StorageError saying what to do; other errors
    (and errors already restated) come back unchanged. `needed_bytes` is the output's size, or
    with at_least=True what was written before the failure (a lower bound)."""
    if isinstance(error, StorageError) or error.errno not in NO_SPACE + NOT_WRITABLE:
        return error
    if error.errno in NO_SPACE:
        free = free_bytes(path)
        if needed_bytes is None:
            need = "size unknown"
        else:
            need = f"needs {'more than' if at_least else 'about'} {needed_bytes:,} bytes"
        have = f"{free:,} bytes free there" if free is not None else "free space unknown"
        message = (
            f"{path}: {os.strerror(error.errno).lower()} ({need}, {have}); it was not "
            "written: free some space or choose another storage root, then rerun"
        )
    else:
        message = (
            f"{path}: storage is not writable ({error.strerror or os.strerror(error.errno)}"
            f"{': ' + str(error.filename) if error.filename else ''}); fix its permissions "
            "or choose another storage root"
        )
    return StorageError(error.errno, message, str(path))


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system holding `path` (or its nearest existing
    parent); None when that cannot be read."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def check_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written there; returns it.

    A permission check alone (os.access) is not enough: root passes it on a read-only mount,
    and a quota or a full disk shows only when writing. The probe file is removed again.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise StorageError(
            errno.ENOTDIR, f"{path}: is a file, not a folder to write into", str(path)
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as e:
        restated = storage_error(e, path, needed_bytes=5)
        if not isinstance(restated, StorageError):  # e.g. a parent that cannot hold folders
            restated = StorageError(
                e.errno,
                f"{path}: cannot write there ({e.strerror}); choose another storage root",
                str(path),
            )
        raise restated from e
    return path
