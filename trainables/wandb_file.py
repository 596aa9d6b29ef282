"""Read a W&B run file (`run-<id>.wandb`), the transaction log `wandb sync` uploads.

The format is LevelDB's log (https://github.com/google/leveldb/blob/main/doc/log_format.md)
after a 7-byte W&B header (b":W&B", magic 0xBEE1, version 0): 32 KiB blocks of chunks, each a
7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its payload; a
record's payload is a `wandb_internal_pb2.Record`. Used to confirm an offline run reached its
file before the process moves on.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
CHUNK_HEADER = 7
FULL, LAST = 1, 4


def records(path: str | Path) -> Iterator:
    """The records written so far; a chunk still being written ends the iteration."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, payload = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if left < CHUNK_HEADER or (n == 0 and kind == 0):  # the block's zero padding
            pos += left
            continue
        if pos + CHUNK_HEADER + n > len(data):
            return
        payload += data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + n]
        pos += CHUNK_HEADER + n
        if kind in (FULL, LAST):
            record = pb.Record()
            try:
                record.ParseFromString(payload)
            except DecodeError:
                return
            yield record
            payload = b""


def history(path: str | Path) -> list[dict]:
    """Every `run.log` row in the file, keys to decoded values."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            items = r.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


def has_exit(path: str | Path) -> bool:
    """True once the run's exit record (written by `run.finish`) is in the file."""
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in records(path))
    except (OSError, ValueError):
        return False
