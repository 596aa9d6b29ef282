"""The storage root: a local folder by default, any fsspec URL (s3://, gs://, NFS) on a cluster.

Every study and stage writes under `<root>/<name>/`. Small files (specs, summaries, tables) are
written atomically: to a temporary name beside the target, then renamed (local) or put in one
request (object stores), so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fsspec

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
    if is_local(url):
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, text.encode("utf-8"))


def write_bytes_from(url: str, local_file: Path) -> None:
    """Copy a finished local file to storage (atomic rename locally, one put remotely)."""
    if is_local(url):
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(local_file.read_bytes())
        os.replace(tmp, path)
        return
    fs, path = filesystem(url)
    fs.put_file(str(local_file), path)


def subfolders(url: str) -> list[str]:
    """Names of the folders directly under `url` (empty when it does not exist)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(Path(p).name for p in fs.ls(path, detail=False) if fs.isdir(p))
