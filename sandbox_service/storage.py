"""The storage root: a local folder by default, any fsspec URL (s3://, gs://, NFS) on a cluster.

Every study and stage writes under `<root>/<name>/`. Small files (specs, summaries, tables) are
written atomically: to a temporary name beside the target, then renamed (local) or put in one
request (object stores), so a reader never sees half a file. A write that storage refuses (full
disk, quota, read-only, no permission) raises a StorageError naming the file, the bytes it needed
and the bytes free; `check_writable` refuses such a root before any work starts.
"""

from __future__ import annotations

import errno
import os
import tempfile
import uuid
from pathlib import Path

import fsspec

from trainables import storage_errors
from trainables.storage_errors import StorageError  # callers catch storage.StorageError

DEFAULT_ROOT = "./sandbox_runs"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url).resolve()


def join(root: str, *parts: str) -> str:
    if is_local(root):
        return str(local_path(root).joinpath(*parts))
    return "/".join([root.rstrip("/"), *parts])


def filesystem(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_text(url: str) -> str:
    with fsspec.open(url, "r", encoding="utf-8") as f:
        return f.read()


def write_text(url: str, text: str) -> None:
    """Write a whole file so that readers see the old content or the new, never a part."""
    data = text.encode("utf-8")
    if is_local(url):
        path = local_path(url)
        _write_local(path, lambda f: f.write(data), len(data))
        return
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data)
    except OSError as e:
        raise _refused(e, url, len(data)) from e


def write_bytes_from(url: str, local_file: Path) -> None:
    """Copy a finished local file to storage (atomic rename locally, one put remotely)."""
    size = Path(local_file).stat().st_size
    if is_local(url):
        with open(local_file, "rb") as src:
            _write_local(local_path(url), lambda f: _copy(src, f), size)
        return
    fs, path = filesystem(url)
    try:
        fs.put_file(str(local_file), path)
    except OSError as e:
        raise _refused(e, url, size) from e


def _write_local(path: Path, write, size: int) -> None:
    """Write through `write(file)` to a temporary sibling, flush, then rename onto `path`."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise storage_errors.storage_error(e, path, size) from e
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        Path(tmp).unlink(missing_ok=True)


def _copy(src, dst, chunk: int = 1 << 20) -> None:
    while block := src.read(chunk):
        dst.write(block)


def _refused(error: OSError, url: str, size: int | None) -> OSError:
    """A remote store's refusal as a StorageError; fsspec back ends rarely set an errno."""
    restated = storage_errors.storage_error(error, url, size)
    if restated is not error or isinstance(error, StorageError):
        return restated
    return StorageError(
        error.errno or errno.EIO,
        f"{url}: storage refused the write ({type(error).__name__}: {error}); check the "
        "credentials, the bucket and its quota, or choose another storage root",
        url,
    )


def check_writable(url: str) -> None:
    """Raise StorageError, naming `url`, unless a file can be written there (created if needed).

    Called before a study or run starts, so an unwritable root fails in a second, not after
    Ray has started and the first trial has trained.
    """
    if is_local(url):
        storage_errors.check_writable(local_path(url))
        return
    fs, path = filesystem(url)
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
    try:
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"probe")
        fs.rm(probe)
    except OSError as e:
        raise _refused(e, url, 5) from e


def remove(url: str) -> None:
    """Delete one file if it is there."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)


def subfolders(url: str) -> list[str]:
    """Names of the folders directly under `url` (empty when it does not exist)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(Path(p).name for p in fs.ls(path, detail=False) if fs.isdir(p))
