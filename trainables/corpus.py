"""Documents from anywhere: text, JSON Lines and Parquet through fsspec, plus an offline corpus.

`iter_documents` reads local paths or any fsspec URL (file://, memory://, s3://, gs://,
hf://datasets/...), globs included, and yields one string per document:

- `.txt`, `.md` (fmt "text"): documents are separated by blank lines (lines that are empty or only
  whitespace); a document keeps its inner newlines and loses its trailing one, so a paragraph,
  a speech or a scene is one document;
- `.jsonl`, `.json` (fmt "jsonl"): JSON Lines, one object per line, the text in `text_field`;
  empty lines are skipped;
- `.parquet` (fmt "parquet"): the `text_field` column, read one row group at a time.

Compression (.gz, .bz2, .xz, .zst when `zstandard` is installed) is inferred from the suffix.
`EMBEDDED` names a real corpus present on every machine: the running Python's standard library.

    python -m trainables.corpus SOURCE [SOURCE ...]   # prints document count and size
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import has_magic

EMBEDDED = "embedded:python-stdlib"
FORMATS = ("auto", "text", "jsonl", "parquet")
SUFFIX_FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".lzma", ".zst")
# Folders of the standard library that hold tests, third-party packages or no text of its own.
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


class CorpusError(ValueError):
    """A source that cannot be read as documents; the message names the source and the fix."""


def iter_documents(
    sources: str | Sequence[str],
    *,
    fmt: str = "auto",
    text_field: str = "text",
    max_chars: int | None = None,
) -> Iterator[str]:
    """Yield the documents of every source in order; stop after `max_chars` characters in all."""
    if fmt not in FORMATS:
        raise CorpusError(f"fmt={fmt!r} is not a known format; allowed: {', '.join(FORMATS)}")
    if max_chars is not None and max_chars <= 0:
        raise CorpusError(f"max_chars={max_chars!r} must be a positive integer or None")
    docs = (doc for source in _as_list(sources) for doc in _source_docs(source, fmt, text_field))
    yield from docs if max_chars is None else _truncate(docs, max_chars)


def _as_list(sources: str | Sequence[str]) -> list[str]:
    items = [sources] if isinstance(sources, str) else list(sources)
    if not items:
        raise CorpusError("no sources given; pass a path, an fsspec URL, a glob or EMBEDDED")
    return items


def _truncate(docs: Iterable[str], max_chars: int) -> Iterator[str]:
    left = max_chars
    for doc in docs:
        yield doc[:left]
        left -= len(doc)
        if left <= 0:
            return


def _source_docs(source: str, fmt: str, text_field: str) -> Iterator[str]:
    if source == EMBEDDED:
        yield from embedded_corpus_docs()
        return
    for of in expand_files(source):
        yield from _file_docs(of, of.full_name, _file_format(of.full_name, fmt), text_field)


def expand_files(
    source: str, error: type[Exception] = CorpusError, kind: str = "source"
) -> list[fsspec.core.OpenFile]:
    """The files a path, URL or glob names (any fsspec protocol, compression from the suffix);
    a missing file, a folder or an empty glob raises `error`, naming the `kind` of source."""
    files = fsspec.open_files(source, mode="rb", compression="infer")
    if not files:
        raise error(f"{source}: no file matches this glob")
    if not has_magic(source) and not files[0].fs.isfile(files[0].path):  # globs match files only
        of = files[0]
        what = "is a folder, not a file" if of.fs.isdir(of.path) else "no such file"
        raise error(f"{of.full_name}: {what} ({kind} {source!r})")
    for of in files:
        if of.path.endswith(".zst") and of.compression is None:
            raise error(f"{of.full_name}: .zst needs the `zstandard` package; install it")
    return files


def _file_format(name: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    stem = name
    while stem.endswith(COMPRESSION_SUFFIXES):
        stem = stem.rsplit(".", 1)[0]
    suffix = Path(stem).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        known = ", ".join(sorted(SUFFIX_FORMATS))
        raise CorpusError(
            f"{name}: cannot infer the format from {suffix!r}; known {known}; "
            f"or pass fmt='text'|'jsonl'|'parquet'"
        )
    return SUFFIX_FORMATS[suffix]


def _file_docs(of: fsspec.core.OpenFile, name: str, fmt: str, text_field: str) -> Iterator[str]:
    try:
        with of as raw:
            if fmt == "parquet":
                yield from _parquet_docs(raw, name, text_field)
                return
            lines = io.TextIOWrapper(raw, encoding="utf-8")
            yield from _text_docs(lines) if fmt == "text" else _jsonl_docs(lines, name, text_field)
    except UnicodeDecodeError as err:
        raise CorpusError(f"{name}: not UTF-8 text ({err.reason}); convert it to UTF-8") from err


def _text_docs(lines: Iterable[str]) -> Iterator[str]:
    """Documents are maximal runs of non-blank lines."""
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).removesuffix("\n")
            paragraph = []
    if paragraph:
        yield "".join(paragraph).removesuffix("\n")


def _jsonl_docs(lines: Iterable[str], name: str, text_field: str) -> Iterator[str]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(
                f"{where}: bad JSON ({err.msg} at column {err.colno}); "
                f"expected one JSON object per line (JSON Lines)"
            ) from err
        yield _field(record, text_field, where)


def _field(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise CorpusError(f"{where}: no field {text_field!r} (fields: {keys}); set text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _parquet_docs(raw: io.IOBase, name: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(raw)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(
            f"{name}: no column {text_field!r} (columns: {', '.join(columns)}); set text_field"
        )
    first_row = 0
    for group in range(parquet.num_row_groups):
        texts = parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        for offset, text in enumerate(texts):
            if not isinstance(text, str):
                row = first_row + offset
                raise CorpusError(
                    f"{name}, row {row}: column {text_field!r} holds "
                    f"{type(text).__name__}, not a string"
                )
            yield text
        first_row += len(texts)


def stdlib_files() -> list[Path]:
    """The standard library's .py files sorted by relative path; tests and packages skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]
        # _sysconfigdata holds this build's compiler flags and paths, not written text.
        found += [
            Path(folder, n)
            for n in names
            if n.endswith(".py") and not n.startswith("_sysconfigdata")
        ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def embedded_corpus_docs() -> Iterator[str]:
    """The standard library as documents: each file cut before every top-level def and class.

    The pieces of a file concatenate back to its exact source, docstrings and comments included,
    so nothing is lost; cutting at definitions gives thousands of documents, enough for a
    validation split of a few percent even on a small slice.
    """
    for path in stdlib_files():
        with tokenize.open(path) as f:  # honours PEP 263 coding cookies
            yield from (piece for piece in split_source(f.read()) if piece.strip())


def split_source(source: str) -> list[str]:
    """Cut Python source before each top-level function or class (and its decorators)."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return [source]
    starts = [
        min([n.lineno] + [d.lineno for d in n.decorator_list])
        for n in body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    lines = io.StringIO(source).readlines()  # split at "\n" only, as ast counts lines
    cuts = [0] + [s - 1 for s in starts if s > 1] + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def source_fingerprint(sources: str | Sequence[str]) -> str:
    """A cheap hash of what the sources are now (names, sizes, modification times or ETags).

    It changes when any file changes, without reading the contents, so a cache keyed by it can be
    trusted to mean the same corpus.
    """
    digest = hashlib.sha256()
    for source in _as_list(sources):
        digest.update(json.dumps(_describe(source), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _describe(source: str) -> list:
    if source == EMBEDDED:
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in stdlib_files()]
        return [sys.version, stats]
    return [of.fs.info(of.path) for of in expand_files(source)]


def update_digest(digest: Any, doc: str) -> int:
    """Feed one document to `digest`, length-prefixed so that document boundaries count.

    Returns the document's UTF-8 byte length.
    """
    data = doc.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little") + data)
    return len(data)


def documents_sha256(docs: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        update_digest(digest, doc)
    return digest.hexdigest()


def is_validation(doc: str, val_fraction: float, seed: int = 0) -> bool:
    """True iff hash(seed, blake2b(doc)) / 2^64 < val_fraction: stable on any machine and run."""
    content = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
    salted = hashlib.blake2b(seed.to_bytes(8, "little") + content, digest_size=8).digest()
    return int.from_bytes(salted, "little") < val_fraction * 2**64


def split_documents(
    docs: Iterable[str], val_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, val) by content hash, order kept; equal documents always land on the same side."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in [0, 1]")
    train: list[str] = []
    val: list[str] = []
    for doc in docs:
        (val if is_validation(doc, val_fraction, seed) else train).append(doc)
    return train, val


def main(argv: Sequence[str] | None = None) -> None:
    sources = list(argv if argv is not None else sys.argv[1:]) or [EMBEDDED]
    n_docs = n_chars = n_bytes = 0
    for doc in iter_documents(sources):
        n_docs, n_chars, n_bytes = n_docs + 1, n_chars + len(doc), n_bytes + len(doc.encode())
    print(f"{n_docs} documents, {n_chars:,} characters, {n_bytes:,} UTF-8 bytes")


if __name__ == "__main__":
    main()
