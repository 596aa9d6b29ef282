"""Atomic, verifiable checkpoints of a training state, for resuming trials and pretraining.

A checkpoint is a folder of four files:
    model.safetensors  the weights; safetensors runs no code when read, tied weights stored once
    optimizer.pt       the optimizer state_dict: torch.save, read with weights_only=True
    state.json         the caller's JSON state: step, tokens seen, rng_state(), metadata
    manifest.json      sha256 and size of each file above, written last
The folder is built as a hidden sibling and moved into place by one rename (an atomic exchange
when replacing an older checkpoint on Linux), so the destination holds either the previous
checkpoint or the complete new one. Loading checks every file against the manifest first and
refuses a missing, truncated or corrupt file with a CheckpointError that names it.

    save_checkpoint(path, model, opt, {"step": step, "tokens_seen": n, "rng": rng_state()})
    state = load_checkpoint(path, model, opt)
    set_rng_state(state["rng"])

Resuming never trusts one checkpoint blindly: `resume_point(run/step_00000040)` returns the newest
checkpoint of that run, at or before the one asked for, that verifies, and logs a warning naming
each damaged one it skipped; `local_copy` does the same for a checkpoint Ray hands back.
A write that storage refuses (full disk, read-only) raises a StorageError naming the folder and
the bytes needed, and leaves the previous checkpoint (or nothing) at the destination.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from trainables.storage_errors import storage_error

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
RESERVED_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, MANIFEST_FILE)
FORMAT_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20
# renameat2(2) constants from <fcntl.h> and <linux/fs.h>.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Numbered checkpoints of one run: ours (`step_<n>`) and Ray Tune's (`checkpoint_<n>`).
NUMBERED = re.compile(r"(step|checkpoint)_(\d+)")
REPORTED_SUBFOLDER = "state"  # a reported checkpoint folder holds the checkpoint here

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or does not fit; the message names the file."""


# --- save ---------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write model, optimizer and state as one checkpoint folder at `directory`; returns it.

    `state` must hold JSON values only (tuples come back as lists). `extra_files` (name -> bytes,
    e.g. the tokenizer) are written beside them and sealed in the same manifest. An existing
    checkpoint at `directory` is replaced; any other non-empty folder there is refused.
    """
    dest = Path(directory)
    _check_json(state, "state")
    _check_replaceable(dest)
    for name in extra_files or {}:
        if name in RESERVED_FILES or Path(name).name != name:
            raise CheckpointError(f"extra file {name!r}: must be a plain, unreserved file name")
    # A sibling, so the final rename stays on one file system; mkdir honours the umask.
    staging = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        _write_files(staging, model, optimizer, state)
        swap_into_place(staging, dest)
        fsync_dir(dest.parent)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        needed = state_bytes(model, optimizer) + sum(map(len, (extra_files or {}).values()))
        raise storage_error(e, dest, needed) from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of tensor data a checkpoint of `model` and `optimizer` holds (tied weights once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    if optimizer is not None:
        for slots in optimizer.state.values():
            tensors |= {t.data_ptr(): t for t in slots.values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _write_files(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict
) -> None:
    _save_weights(model, folder / MODEL_FILE)
    if optimizer is not None:
        with open(folder / OPTIMIZER_FILE, "wb") as f:
            torch.save(optimizer.state_dict(), f)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    files = {path.name: seal(path) for path in sorted(folder.iterdir())}
    manifest = {"format_version": FORMAT_VERSION, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    seal(folder / MANIFEST_FILE)
    fsync_dir(folder)


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors' writer, whose I/O errors (a full disk: "os error 28") become OSErrors."""
    try:
        save_model(model, str(path))
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def seal(path: Path) -> dict[str, Any]:
    """Flush `path` to disk and return its manifest record {sha256, bytes}."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def fsync_dir(path: Path) -> None:
    # Without this a power cut can lose the rename even though the files were flushed.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_replaceable(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest}: exists and is a file, not a checkpoint folder")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST_FILE).exists():
        raise CheckpointError(
            f"{dest}: exists and is not a checkpoint (no {MANIFEST_FILE}); refusing to replace "
            "it: choose another directory or remove it"
        )


def _check_json(value: Any, where: str) -> None:
    """Raise TypeError naming the first entry json.dumps would reject or silently change."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has key {key!r}: JSON keys must be str")
            _check_json(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise TypeError(
            f"{where} is a {type(value).__name__}: state must hold JSON values "
            "(convert tensors and numpy numbers with .item() or .tolist())"
        )


# --- atomic replacement -------------------------------------------------------------------------


def swap_into_place(new: Path, dest: Path) -> None:
    """Put the finished folder `new` at `dest`; readers see the old checkpoint or the new one."""
    if not dest.exists():
        os.replace(new, dest)
    elif _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the previous checkpoint
    else:
        # No atomic exchange here: for the instant between the two renames `dest` is absent,
        # while the previous checkpoint stays complete at `old`.
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
        os.replace(dest, old)
        try:
            os.replace(new, dest)
        except BaseException:
            os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # C libraries older than glibc 2.28
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system lacks it
        return False
    raise OSError(err, os.strerror(err), str(b))


# --- verify and load ----------------------------------------------------------------------------


def verify_checkpoint(directory: str | Path) -> None:
    """Check every file against manifest.json; raise CheckpointError naming the first bad one."""
    folder = Path(directory)
    files = _read_manifest(folder)
    for required in (MODEL_FILE, STATE_FILE):
        if required not in files:
            raise CheckpointError(f"{folder / MANIFEST_FILE}: does not list {required}")
    for name, record in files.items():
        _verify_file(folder, name, record)


def _read_manifest(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no checkpoint folder here")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so {folder} is not a complete checkpoint")
    try:
        manifest = json.loads(path.read_text())
        version, files = manifest["format_version"], manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from e
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION}")
    if not isinstance(files, dict) or not all(isinstance(r, dict) for r in files.values()):
        raise CheckpointError(f"{path}: 'files' must map each file name to its record")
    return files


def _verify_file(folder: Path, name: str, record: dict) -> None:
    path = folder / name
    if Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{folder / MANIFEST_FILE}: lists {name!r}, not a plain file name")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE})")
    size = path.stat().st_size
    if size != record.get("bytes"):
        raise CheckpointError(
            f"{path}: {size} bytes where {MANIFEST_FILE} records {record.get('bytes')}: "
            "the file is truncated or was changed after saving"
        )
    actual = seal(path)["sha256"]
    expected = str(record.get("sha256"))
    if actual != expected:
        raise CheckpointError(
            f"{path}: sha256 {actual[:16]}… does not match {expected[:16]}… in "
            f"{MANIFEST_FILE}: the file is corrupt"
        )


def load_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> dict[str, Any]:
    """Verify the checkpoint, load weights (and optimizer state if given), return the state.

    verify=False skips the checksums: only for a folder that resume_point or local_copy has
    just verified (hashing a large checkpoint twice costs minutes). On CheckpointError from a
    shape or name mismatch the model may be partly overwritten.
    """
    folder = Path(directory)
    if verify:
        verify_checkpoint(folder)
    try:
        load_model(model, folder / MODEL_FILE, strict=True, device=str(map_location))
    except (RuntimeError, ValueError, SafetensorError) as e:
        raise CheckpointError(
            f"{folder / MODEL_FILE}: does not fit {type(model).__name__}: {e}"
        ) from e
    if optimizer is not None:
        _load_optimizer(folder / OPTIMIZER_FILE, optimizer, map_location)
    return json.loads((folder / STATE_FILE).read_text())


def _load_optimizer(
    path: Path, optimizer: torch.optim.Optimizer, map_location: str | torch.device
) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing: this checkpoint was saved without optimizer state; "
            "pass optimizer=None to load the weights only"
        )
    try:
        optimizer.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{path}: does not fit {type(optimizer).__name__}: {type(e).__name__}: {e}"
        ) from e


# --- RNG state ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The global RNGs of Python, NumPy and torch (CPU, and each CUDA device), JSON-safe.

    Generators the caller owns (numpy Generator, torch.Generator) are the caller's to store.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": _encode(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned. CUDA states are restored only where CUDA is present."""
    try:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        keys = np.asarray(npy["keys"], dtype=np.uint32)
        np.random.set_state(
            (npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        )
        torch.set_rng_state(_decode(state["torch_cpu"]))
    except KeyError as e:
        raise ValueError(f"rng state lacks key {e}; expected what rng_state() returns") from e
    cuda = state.get("torch_cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(
                f"rng state holds {len(cuda)} CUDA generators but "
                f"{torch.cuda.device_count()} devices are visible"
            )
        torch.cuda.set_rng_state_all([_decode(s) for s in cuda])


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# --- choosing the checkpoint to resume from ------------------------------------------------------


def newest_valid(
    folders: Iterable[str | Path],
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The first of `folders` (give them newest first) whose checkpoint verifies, and each one
    skipped before it with the reason (the CheckpointError, which names the bad file).

    A folder is a checkpoint or a reported folder holding one in `state/`. Stops at the first
    valid folder, so a lazy iterable fetches no more candidates than needed.
    """
    skipped = []
    for folder in map(Path, folders):
        try:
            verify_checkpoint(inner_checkpoint(folder))
        except CheckpointError as e:
            skipped.append((folder, str(e)))
            continue
        return folder, skipped
    return None, skipped


def inner_checkpoint(folder: str | Path) -> Path:
    """The checkpoint in a reported folder (`<folder>/state`), else `folder` itself."""
    folder = Path(folder)
    inner = folder / REPORTED_SUBFOLDER
    return inner if inner.is_dir() else folder


def older_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoints of the same run saved before `folder`, newest first: its siblings named
    like it (`step_<n>`, or Ray Tune's `checkpoint_<n>`) with a smaller n.

    Never a newer one: a checkpoint past the one the run's bookkeeping points at was not
    reported as complete (or belongs to a later attempt), so resuming there could skip steps.
    """
    folder = Path(folder)
    older = older_names(folder.name, _listdir(folder.parent))
    return [folder.parent / name for name in older if (folder.parent / name).is_dir()]


def older_names(name: str, siblings: Iterable[str]) -> list[str]:
    """The names among `siblings` numbered like `name` (same prefix) and lower, highest first."""
    match = NUMBERED.fullmatch(name)
    if match is None:
        return []
    prefix, number = match.group(1), int(match.group(2))
    found = []
    for sibling in siblings:
        m = NUMBERED.fullmatch(sibling)
        if m is not None and m.group(1) == prefix and int(m.group(2)) < number:
            found.append((int(m.group(2)), sibling))
    return [sibling for _, sibling in sorted(found, reverse=True)]


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def resume_point(folder: str | Path) -> Path:
    """`folder` if its checkpoint verifies, else the newest older checkpoint of the same run that
    does; warns once per skipped folder with the file and the reason. Raises CheckpointError,
    listing every reason, when none verifies."""
    folder = Path(folder)
    good, skipped = newest_valid([folder, *older_checkpoints(folder)])
    _chosen(good, skipped, folder)
    return good


def _chosen(good, skipped: list[tuple[Any, str]], asked) -> None:
    """Warn for each skipped checkpoint, or raise when nothing is left to resume from."""
    if good is None:
        reasons = "; ".join(reason for _, reason in skipped)
        raise CheckpointError(f"no valid checkpoint at or before {asked}: {reasons}")
    for folder, reason in skipped:
        log.warning("skipping damaged checkpoint %s (%s); resuming from %s", folder, reason, good)


def local_copy(checkpoint, prefix: str = "resume-") -> Path | None:
    """A local copy of the checkpoint Ray hands back to resume from (which may live on remote
    storage), or, if it is damaged, of the newest older checkpoint of the same run beside it.

    Candidates are copied one at a time, newest first, and verified; a warning names each
    damaged one by its storage path. Raises CheckpointError when none verifies; None when Ray
    has no checkpoint.
    """
    if checkpoint is None:
        return None
    origin: dict[Path, str] = {}  # local copy -> the storage path it came from

    def copies() -> Iterator[Path]:
        for path in [checkpoint.path, *_older_in_storage(checkpoint)]:
            local = Path(tempfile.mkdtemp(prefix=prefix))
            origin[local] = path
            type(checkpoint)(path, checkpoint.filesystem).to_directory(str(local))
            yield local

    good = None
    try:
        good, skipped = newest_valid(copies())
    finally:
        for local in origin:
            if local != good:
                shutil.rmtree(local, ignore_errors=True)
    # name each damaged file by where it lives in storage, not by its temporary copy
    named = [(origin[c], reason.replace(str(c), origin[c])) for c, reason in skipped]
    _chosen(origin.get(good), named, checkpoint.path)
    return good


def _older_in_storage(checkpoint) -> list[str]:
    """Storage paths of the run's checkpoints older than Ray's `checkpoint`, newest first."""
    import pyarrow.fs

    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    try:
        infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return []
    folders = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]
    return [f"{parent}/{older}" for older in older_names(name, folders)]
