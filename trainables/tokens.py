"""The token store: one tokenized corpus on disk, memory-mapped read-only by every trial.

A store is a folder with
- `train.bin`, `val.bin`: token ids, documents concatenated with eos after each one; uint16 when
  every id fits (vocab_size <= 65536), uint32 otherwise;
- `meta.json`: counts, UTF-8 byte counts of the text, vocab size, tokenizer path and hashes;
  written last, so a store with `meta.json` is complete. The store is built in a temporary
  folder renamed into place, so a full disk leaves no store at all (and a StorageError).

`TokenStore.open` maps the files with mode "r": N trial processes on a machine share one copy in
the page cache and nothing is read or copied per trial. Batches are drawn by pure functions of
(seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables.corpus import update_digest
from trainables.storage_errors import storage_error
from trainables.tokenizer import Tokenizer

STORE_VERSION = 1
ENCODE_CHUNK_CHARS = 4_000_000  # characters per encode call: bounds memory, keeps all cores busy


@dataclass(frozen=True, eq=False)
class TokenStore:
    root: str
    train: np.ndarray  # (n_train_tokens,) read-only np.memmap
    val: np.ndarray  # (n_val_tokens,) read-only np.memmap
    meta: dict

    @classmethod
    def open(cls, root: str | Path) -> TokenStore:
        meta_path = Path(root) / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{root}: no meta.json, not a complete token store; "
                f"build it with trainables.data.prepare"
            )
        meta = json.loads(meta_path.read_text())
        train, val = (_map(Path(root) / f"{split}.bin", meta) for split in ("train", "val"))
        return cls(str(root), train, val, meta)

    def __reduce__(self):  # sent to another process, a store re-maps its files instead of copying
        return TokenStore.open, (self.root,)

    @property
    def val_bytes_per_token(self) -> float:
        return self.meta["val_bytes"] / self.meta["n_val_tokens"]


def _map(path: Path, meta: dict) -> np.ndarray:
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    expected = meta[f"n_{path.stem}_tokens"]
    if len(tokens) != expected:
        raise ValueError(
            f"{path}: {len(tokens)} tokens but meta.json says {expected}; "
            f"the store is damaged, delete {path.parent} and prepare again"
        )
    return tokens


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)  # ids < vocab_size


def build_token_store(
    train_docs: Iterable[str], val_docs: Iterable[str], tokenizer: Tokenizer, root: str | Path
) -> TokenStore:
    """Tokenize both splits into a temporary folder beside `root`, then rename it into place."""
    root = Path(root)
    dtype = token_dtype(tokenizer.vocab_size)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    except OSError as e:
        raise storage_error(e, root) from e
    try:
        meta = {
            "version": STORE_VERSION,
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "eos_id": tokenizer.eos_id,
            "tokenizer": tokenizer.path,
            "tokenizer_sha256": tokenizer.sha256,
        }
        for split, docs in (("train", train_docs), ("val", val_docs)):
            meta |= _write_split(docs, tokenizer, tmp / f"{split}.bin", dtype, split)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, root)
    except OSError as e:  # a full disk: the partial files go with tmp, so no store is published
        written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        shutil.rmtree(tmp, ignore_errors=True)  # first, so the message counts the space it frees
        raise storage_error(e, root, written, at_least=True) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenStore.open(root)


def _write_split(docs: Iterable[str], tok: Tokenizer, path: Path, dtype: np.dtype, split: str):
    """Append each document's ids and an eos to `path`; return the split's counts and hash."""
    n_tokens = n_bytes = n_docs = 0
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for chunk in _chunks(docs):
            ids = np.concatenate(
                [np.array(seq + [tok.eos_id], dtype=dtype) for seq in tok.encode(chunk)]
            )
            out.write(ids.tobytes())
            n_bytes += sum(update_digest(digest, doc) for doc in chunk)
            n_tokens, n_docs = n_tokens + len(ids), n_docs + len(chunk)
    if n_docs == 0:
        raise ValueError(f"the {split} split has no documents; a store needs both splits")
    return {
        f"n_{split}_tokens": n_tokens,
        f"n_{split}_docs": n_docs,
        f"{split}_bytes": n_bytes,
        f"{split}_sha256": digest.hexdigest(),
    }


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= ENCODE_CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _move_into_place(tmp: Path, root: Path) -> None:
    try:
        os.rename(tmp, root)
    except OSError:
        if not (root / "meta.json").exists():  # not a concurrent builder's finished store
            raise


def sample_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows; the same (seed, step) gives the same batch on any machine.

    Returns x, y: int64 (B, T) with y[:, t] = x[:, t + 1] within the window (next-token targets).
    """
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{len(tokens)} tokens cannot fill a window of seq_len + 1 = {seq_len + 1}"
        )
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # start + T + 1 <= len
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)  # (B, T+1)
    windows = torch.from_numpy(windows)
    return windows[:, :-1], windows[:, 1:]


def val_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous non-overlapping windows from the start, in order; the last batch may be short.

    `max_tokens` caps the predicted tokens (whole windows only), so an evaluation costs a known
    amount however large the split is.
    """
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // seq_len)
    if n_windows == 0:
        raise ValueError(
            f"{len(tokens)} tokens (max_tokens={max_tokens}) give no window of "
            f"seq_len {seq_len}; lower seq_len or raise max_tokens"
        )
    for first in range(0, n_windows, batch_size):
        rows = np.arange(first, min(first + batch_size, n_windows))[:, None] * seq_len
        windows = torch.from_numpy(tokens[rows + np.arange(seq_len + 1)].astype(np.int64))
        yield windows[:, :-1], windows[:, 1:]


def bits_per_byte(loss_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Loss in bits per UTF-8 byte: loss · tokens / (bytes · ln 2).

    Tokenizer-independent, so models with different vocabularies compare; MiniCPM (arXiv
    2404.06395, §3.5) averages its loss per byte for the same reason.
    """
    if n_tokens <= 0 or n_bytes <= 0:
        raise ValueError(f"n_tokens={n_tokens} and n_bytes={n_bytes} must both be positive")
    return loss_nats_per_token * n_tokens / (n_bytes * math.log(2))
