"""SentencePiece BPE tokenizer: trained once per corpus and options, cached by content hash.

The model is lossless: byte fallback (any Unicode, CJK and emoji included, encodes to pieces or
UTF-8 bytes; there is no out-of-vocabulary text), identity normalization, no dummy prefix and no
whitespace folding, so `decode(encode(x)) == x` exactly. Digits are split one per piece (as in
LLaMA, arXiv 2302.13971 §2.1) and runs of spaces may form pieces, which keeps indentation cheap.

Fixed ids: 0 <unk> (never emitted, thanks to byte fallback), 1 <s> (bos), 2 </s> (eos, also the
document separator in the token store), 3 <pad>; ids 4..259 are the 256 byte pieces <0x00>..<0xFF>.

The cache lives at <cache_dir>/tokenizers/<key>/tok.model, key = sha256 of the training text and
every option; concurrent processes take a file lock so one trains and the others reuse its model.

    python -m trainables.tokenizer 4096 embedded:python-stdlib   # train, time, print stats
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import fsspec
import sentencepiece as spm

from trainables.corpus import EMBEDDED, iter_documents, update_digest

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# MiniCPM's chat markers ("user", "assistant"), reserved as whole pieces in every tokenizer: SFT
# data mixed into pretraining or the anneal (facts §4) then uses the ids SFT and chat use later.
CHAT_PIECES = ("<用户>", "<AI>")
N_RESERVED = 4 + len(CHAT_PIECES) + 256  # special ids, chat markers, 256 byte-fallback pieces
RECIPE_VERSION = 2  # bumped when training options change, so caches keyed by configs rebuild
# SentencePiece drops training sentences longer than max_sentence_length bytes; lines are cut
# to 1024 characters (at most 4096 UTF-8 bytes) so that no training text is silently skipped.
TRAIN_LINE_CHARS = 1024
MAX_SENTENCE_BYTES = 4 * TRAIN_LINE_CHARS


class Tokenizer:
    """A loaded SentencePiece model; `path` is where it came from, `sha256` its content hash."""

    def __init__(self, model_bytes: bytes, path: str):
        self._model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()

    def __reduce__(self):  # ship the model bytes, not the C++ object, to other processes
        return Tokenizer, (self._model_bytes, self.path)

    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model, e.g. to store beside the weights."""
        return self._model_bytes

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"

    @classmethod
    def from_file(cls, path_or_url: str, cache_dir: str | Path | None = None) -> Tokenizer:
        """Load a .model from a local path or an fsspec URL.

        A remote model is copied to <cache_dir>/tokenizers/sha256-<hash>/tok.model when
        `cache_dir` is given, so later loads and the token store's metadata point at a local file.
        """
        with fsspec.open(path_or_url, "rb") as f:
            model_bytes = f.read()
        protocol = fsspec.core.split_protocol(str(path_or_url))[0]
        if cache_dir is None or protocol in (None, "file", "local"):
            return cls(model_bytes, str(path_or_url))
        digest = hashlib.sha256(model_bytes).hexdigest()
        local = Path(cache_dir) / "tokenizers" / f"sha256-{digest}" / "tok.model"
        if not local.exists():
            atomic_write(local, model_bytes)
        return cls(model_bytes, str(local))

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded on all cores; no bos or eos added."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text as [text]")
        return self._sp.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids (a list, a NumPy array or a 1-D tensor)."""
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def train_tokenizer(
    docs: Iterable[str],
    vocab_size: int,
    cache_dir: str | Path,
    *,
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    model_type: str = "bpe",
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
) -> Tokenizer:
    """Train (or reuse from the cache) a SentencePiece model on `docs`.

    `character_coverage` 0.9995 is SentencePiece's advice for languages with large character sets
    (Chinese, Japanese): the rarest 0.05% of characters fall back to bytes instead of taking ids.
    `input_sentence_size` lines are sampled (with `seed`) when the text has more.
    """
    options = {
        "vocab_size": vocab_size,
        "byte_fallback": byte_fallback,
        "character_coverage": character_coverage,
        "model_type": model_type,
        "input_sentence_size": input_sentence_size,
        "seed": seed,
        "user_defined_symbols": list(CHAT_PIECES),
    }
    if vocab_size <= N_RESERVED:
        raise ValueError(f"vocab_size={vocab_size} must exceed the {N_RESERVED} reserved ids")
    root = Path(cache_dir) / "tokenizers"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".text-") as tmp:
        lines_path = Path(tmp) / "lines.txt"
        text_sha256 = _write_training_lines(docs, lines_path)
        key = hashlib.sha256(json.dumps([text_sha256, options], sort_keys=True).encode())
        model_path = root / key.hexdigest() / "tok.model"
        with file_lock(root / f"{key.hexdigest()}.lock"):
            if not model_path.exists():
                _train(lines_path, model_path, options, text_sha256)
    return Tokenizer(model_path.read_bytes(), str(model_path))


def _write_training_lines(docs: Iterable[str], path: Path) -> str:
    """Write the training lines to `path`; return the sha256 of the documents themselves."""
    digest = hashlib.sha256()
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        for doc in docs:
            update_digest(digest, doc)
            out.writelines(line + "\n" for line in training_lines(doc))
    return digest.hexdigest()


def training_lines(doc: str) -> Iterator[str]:
    """The non-empty lines of a document, cut to TRAIN_LINE_CHARS characters.

    SentencePiece trains on newline-free sentences; a newline is then encoded as its byte piece.
    """
    for line in doc.split("\n"):
        for start in range(0, len(line), TRAIN_LINE_CHARS):
            yield line[start : start + TRAIN_LINE_CHARS]


def _train(lines_path: Path, model_path: Path, options: dict, text_sha256: str) -> None:
    """Train into a temporary folder beside the target, then move the model in atomically."""
    model_path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(options["seed"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".train-") as tmp:
        prefix = Path(tmp) / "tok"
        with open(lines_path, encoding="utf-8", newline="\n") as lines:
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=(line.removesuffix("\n") for line in lines),
                    model_prefix=str(prefix),
                    **_trainer_args(options),
                )
            except RuntimeError as err:
                raise ValueError(f"training the tokenizer with {options} failed: {err}") from err
        info = {
            "options": options,
            "text_sha256": text_sha256,
            "train_seconds": round(time.perf_counter() - started, 3),
            "sentencepiece": spm.__version__,
        }
        (model_path.parent / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(f"{prefix}.vocab", model_path.with_suffix(".vocab"))
        os.replace(f"{prefix}.model", model_path)  # last: its presence means the cache is complete


def _trainer_args(options: dict) -> dict:
    args = {k: v for k, v in options.items() if k != "seed"}
    return args | {
        "split_digits": True,
        "allow_whitespace_only_pieces": True,
        "normalization_rule_name": "identity",
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "shuffle_input_sentence": True,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "num_threads": os.cpu_count() or 1,
        "minloglevel": 2,  # warnings and errors only
    }


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, held until the with-block ends.

    flock works between processes of one machine and on most shared file systems (NFSv4, Lustre
    with flock enabled); on others the atomic renames still keep every cache entry whole.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write(path: Path, data: bytes) -> None:
    """Write a unique temporary file beside `path`, then rename: no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a tokenizer; time training and encoding.")
    parser.add_argument("vocab_size", type=int)
    parser.add_argument("sources", nargs="+", help="paths, fsspec URLs, globs or " + EMBEDDED)
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    args = parser.parse_args(argv)
    docs = list(iter_documents(args.sources))
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        tok = train_tokenizer(
            docs, args.vocab_size, cache, character_coverage=args.character_coverage
        )
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        n_tokens = sum(len(ids) for ids in tok.encode(docs))
        encode_s = time.perf_counter() - started
    n_bytes = sum(len(d.encode()) for d in docs)
    print(
        f"{len(docs):,} documents, {n_bytes:,} bytes; vocab {tok.vocab_size} trained in "
        f"{train_s:.2f} s; {n_tokens:,} tokens encoded at {n_tokens / encode_s:,.0f} tokens/s "
        f"on {os.cpu_count()} cores; {n_bytes / n_tokens:.3f} bytes/token"
    )


if __name__ == "__main__":
    main()
