"""The data entry point: a `DataConfig` in, a memory-mapped `TokenStore` out, built once.

    store = prepare(DataConfig(sources=("s3://bucket/corpus/*.jsonl.gz",), vocab_size=4096))
    x, y = sample_batch(store.train, batch_size=8, seq_len=256, seed=0, step=0)

`prepare` reads the documents, splits them by content hash, trains (or loads) the tokenizer and
tokenizes both splits into <cache_dir>/tokens/<key>, key = hash of (corpus content, tokenizer
file, split parameters). Every step is cached by content and guarded by a file lock, so any number
of concurrent trials build it once and then share one copy through the page cache. A second call
with an unchanged config and unchanged source files (same sizes, times, ETags) skips reading the
corpus: an index under <cache_dir>/tokens/by-config/ remembers which store it produced.

    python -m trainables.data [SOURCE ...]   # prepare (embedded corpus by default), print stats
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainables.corpus import (
    EMBEDDED,
    FORMATS,
    documents_sha256,
    iter_documents,
    source_fingerprint,
    split_documents,
)
from trainables.storage_errors import StorageError, storage_error
from trainables.tokenizer import (
    N_RESERVED,
    RECIPE_VERSION,
    Tokenizer,
    atomic_write,
    file_lock,
    train_tokenizer,
)
from trainables.tokens import STORE_VERSION, TokenStore, build_token_store

log = logging.getLogger(__name__)
MAX_VOCAB = 1 << 24  # ModelConfig's own cap; MiniCPM's vocabulary is 122,753


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: object, low: float, high: float) -> bool:
    """A real number (not a bool) with low < value <= high."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low < value <= high


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


# (field, test, what is allowed): every DataConfig is checked against all of them when built.
RULES = (
    ("sources", lambda v: bool(v) and all(map(_is_name, v)), "a non-empty list of paths/URLs"),
    ("format", lambda v: v in FORMATS, f"one of {FORMATS}"),
    ("text_field", _is_name, "a non-empty string"),
    (
        "vocab_size",
        lambda v: _is_int(v, N_RESERVED + 1) and v <= MAX_VOCAB,
        f"an integer in {N_RESERVED + 1}..{MAX_VOCAB} (4 special ids, 2 chat markers and 256 "
        "byte pieces come first; the most a model's embedding takes)",
    ),
    ("val_fraction", lambda v: _is_number(v, 0, 1) and v < 1, "a number in (0, 1)"),
    ("tokenizer", lambda v: v is None or _is_name(v), "None or a path/URL of a .model file"),
    ("character_coverage", lambda v: _is_number(v, 0, 1), "a number in (0, 1]"),
    ("max_chars", lambda v: v is None or _is_int(v, 1), "None or a positive integer"),
    ("seed", lambda v: _is_int(v, 0), "a non-negative integer"),
)


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = (EMBEDDED,)  # paths, fsspec URLs, globs, or EMBEDDED
    format: str = "auto"  # one of FORMATS; "auto" goes by file suffix
    text_field: str = "text"  # JSON Lines key or Parquet column holding the text
    vocab_size: int = 4096
    val_fraction: float = 0.02  # share of documents (by content hash) held out for validation
    tokenizer: str | None = None  # an existing .model path/URL; None trains BPE on the train split
    # Share of characters that get their own piece; the rest fall back to bytes. 0.9995 is
    # SentencePiece's advice for CJK; a Chinese corpus at vocab 4096 needs ~0.995 to fit.
    character_coverage: float = 0.9995
    max_chars: int | None = None  # cap on corpus characters, for smoke runs
    seed: int = 0  # salts the split and the tokenizer's sentence sampling

    def __post_init__(self):
        given = (self.sources,) if isinstance(self.sources, (str, os.PathLike)) else self.sources
        sources = tuple(os.fspath(s) if isinstance(s, os.PathLike) else s for s in given)
        object.__setattr__(self, "sources", sources)
        for field, ok, allowed in RULES:
            value = getattr(self, field)
            if not ok(value):
                raise ValueError(f"DataConfig.{field}={value!r} is not allowed; expected {allowed}")

    def key(self) -> str:
        """A stable hash of every field: equal configs give equal keys on any machine."""
        fields = dataclasses.asdict(self) | {"sources": list(self.sources)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """$SANDBOX_CACHE if set, else ~/.cache/minicpm-sandbox."""
    return Path(os.environ.get("SANDBOX_CACHE") or Path.home() / ".cache" / "minicpm-sandbox")


def prepare(cfg: DataConfig, cache_dir: str | Path | None = None) -> TokenStore:
    """The token store for `cfg`, built on first use and reused afterwards. A cache that storage
    refuses (full, read-only, not a folder) raises a StorageError naming it."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        return _prepare(cfg, cache)
    except OSError as e:
        error = storage_error(e, cache)
        elsewhere = e.filename is not None and not Path(e.filename).is_relative_to(cache)
        if not isinstance(error, StorageError) or elsewhere:  # e.g. a source that is not there
            raise
        hint = "" if cache_dir is not None else "; SANDBOX_CACHE moves it"
        raise StorageError(e.errno, f"token cache {error}{hint}", str(cache)) from e


def _prepare(cfg: DataConfig, cache: Path) -> TokenStore:
    index = cache / "tokens" / "by-config" / f"{_index_key(cfg)}.json"
    if index.exists() and (store := _indexed_store(index)) is not None:
        return store
    docs = list(
        iter_documents(
            cfg.sources, fmt=cfg.format, text_field=cfg.text_field, max_chars=cfg.max_chars
        )
    )
    train, val = split_documents(docs, cfg.val_fraction, cfg.seed)
    _check_split(cfg, len(train), len(val))
    tok = _tokenizer(cfg, train, cache)
    root = cache / "tokens" / _store_key(cfg, documents_sha256(docs), tok)
    with file_lock(root.with_name(f"{root.name}.lock")):
        if not (root / "meta.json").exists():
            build_token_store(train, val, tok, root)
    record = {"store": root.name, "config": dataclasses.asdict(cfg)}
    atomic_write(index, (json.dumps(record, indent=2) + "\n").encode())
    store = TokenStore.open(root)
    log.info("token store %s: %s", root, describe(store))
    return store


def _index_key(cfg: DataConfig) -> str:
    """The config plus what its files look like now: a changed file means a new key."""
    files = list(cfg.sources) + ([cfg.tokenizer] if cfg.tokenizer else [])
    recipe = RECIPE_VERSION if cfg.tokenizer is None else 0  # a given tokenizer is not trained
    key = f"{cfg.key()} {source_fingerprint(files)} {recipe}"
    return hashlib.sha256(key.encode()).hexdigest()


def _indexed_store(index: Path) -> TokenStore | None:
    root = index.parent.parent / json.loads(index.read_text())["store"]  # <cache>/tokens/<key>
    return TokenStore.open(root) if (root / "meta.json").exists() else None


def _check_split(cfg: DataConfig, n_train: int, n_val: int) -> None:
    if n_train == 0 or n_val == 0:
        raise ValueError(
            f"{n_train + n_val} documents split into {n_train} train and {n_val} validation with "
            f"val_fraction={cfg.val_fraction}; both must be non-empty: add data (max_chars="
            f"{cfg.max_chars}) or change val_fraction"
        )


def _tokenizer(cfg: DataConfig, train: list[str], cache: Path) -> Tokenizer:
    if cfg.tokenizer is None:
        return train_tokenizer(
            train, cfg.vocab_size, cache, seed=cfg.seed, character_coverage=cfg.character_coverage
        )
    tok = Tokenizer.from_file(cfg.tokenizer, cache_dir=cache)
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"tokenizer {cfg.tokenizer} has {tok.vocab_size} pieces but "
            f"DataConfig.vocab_size={cfg.vocab_size}; set vocab_size: "
            f"{tok.vocab_size}"
        )
    return tok


def _store_key(cfg: DataConfig, corpus_sha256: str, tok: Tokenizer) -> str:
    parts = [STORE_VERSION, corpus_sha256, tok.sha256, cfg.val_fraction, cfg.seed]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def describe(store: TokenStore) -> str:
    """One line of the store's derived sizes, for logs and the CLI."""
    m = store.meta
    return (
        f"{m['n_train_tokens']:,} train + {m['n_val_tokens']:,} val tokens "
        f"({m['n_train_docs']:,} + {m['n_val_docs']:,} documents), vocab {m['vocab_size']}, "
        f"{m['dtype']}, {store.val_bytes_per_token:.3f} val bytes/token"
    )


def main(argv: Sequence[str] | None = None) -> None:
    sources = tuple(argv if argv is not None else sys.argv[1:]) or (EMBEDDED,)
    store = prepare(DataConfig(sources=sources))
    print(f"{store.root}\n{describe(store)}")


if __name__ == "__main__":
    main()
