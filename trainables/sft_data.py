"""SFT data: conversations from JSON Lines anywhere, packed into rows, batched by (seed, step).

Sources are local paths, fsspec URLs or globs of `.jsonl` / `.jsonl.gz` (any compression fsspec
infers), one record per line in a form `trainables.chat.to_messages` accepts, or `EMBEDDED_SFT`
("embedded:sft"): a few thousand conversations built offline and deterministically from the
running Python's standard library (what a function does, its signature, what a module is for,
two-turn conversations with a system prompt) plus templated tasks (arithmetic, sorting,
reversing, counting). It is written once to <cache>/sft/<key>/embedded-sft.jsonl, key = hash of
the generator version and the stdlib's files, under the same cache and lock as trainables.data.

Conversations are split train/validation by content hash (`corpus.is_validation`), encoded with
the chat template and packed next-fit into rows of seq_len + 1 tokens; a row trains on inputs
row[:-1] and targets labels[1:]. Each conversation's first token (<s>) carries label -100, so no
response ever predicts the start of the next conversation. Attention is causal over the whole
row by default: a packed conversation can attend to the ones before it in its row, and its RoPE
positions continue from them. That is the cheap kind of packing (one fused causal kernel); the
template's <s> and markers make each boundary visible to the model. With
`SFTConfig.per_conversation_attention` each conversation attends only to itself (a block-diagonal
causal mask from its <s>; RoPE is relative, so it is then computed exactly as if alone).

Rows are shuffled once per epoch by a generator seeded with (seed, epoch): the batch of a step is
a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.

    python -m trainables.sft_data [SOURCE ...]   # build the default set, print its statistics
"""

from __future__ import annotations

import ast
import io
import json
import random
import sys
import sysconfig
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch

from trainables.chat import (
    CHAT_TOKENS,
    IGNORE,
    ChatFormatError,
    add_chat_tokens,
    encode_chat,
    to_messages,
)
from trainables.corpus import (
    EMBEDDED,
    expand_files,
    is_validation,
    source_fingerprint,
    stdlib_files,
)
from trainables.data import DataConfig, default_cache_dir, prepare
from trainables.tokenizer import Tokenizer, atomic_write, file_lock

EMBEDDED_SFT = "embedded:sft"
GENERATOR_VERSION = 1  # bump when embedded_conversations changes, so caches are rebuilt
SYSTEM_PROMPT = "You are a concise assistant for the Python standard library."
MAX_ANSWER_CHARS = 600  # longer docstring paragraphs are skipped: a micro model has 256 tokens


class SFTDataError(ValueError):
    """A source or record that cannot be read as a conversation; the message names file:line."""


# --- reading ----------------------------------------------------------------------------------


def load_conversations(
    sources: str | Sequence[str], cache_dir: str | Path | None = None
) -> list[list[dict]]:
    """Every conversation of every source, in order; `EMBEDDED_SFT` is built on first use."""
    items = [sources] if isinstance(sources, str) else list(sources)
    if not items:
        raise SFTDataError(f"no SFT sources given; pass a JSONL path, URL, glob or {EMBEDDED_SFT}")
    conversations = []
    for source in items:
        path = str(embedded_sft_path(cache_dir)) if source == EMBEDDED_SFT else source
        for of in expand_files(path, SFTDataError, "SFT source"):
            conversations += _read_jsonl(of)
    return conversations


def _read_jsonl(of: fsspec.core.OpenFile) -> list[list[dict]]:
    conversations = []
    with of as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8")
        try:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    conversations.append(_record(line, f"{of.full_name}:{number}"))
        except UnicodeDecodeError as err:
            raise SFTDataError(f"{of.full_name}: not UTF-8 text ({err.reason})") from err
    return conversations


def _record(line: str, where: str) -> list[dict]:
    try:
        return to_messages(json.loads(line))
    except json.JSONDecodeError as err:
        raise SFTDataError(
            f"{where}: bad JSON ({err.msg} at column {err.colno}); one object per line"
        ) from err
    except ChatFormatError as err:
        raise SFTDataError(f"{where}: {err}") from err


# --- the embedded set -------------------------------------------------------------------------


def embedded_sft_path(cache_dir: str | Path | None = None) -> Path:
    """The JSONL file of `embedded_conversations`, written once per stdlib and generator."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = source_fingerprint([EMBEDDED])[:16] + f"-v{GENERATOR_VERSION}"
    path = cache / "sft" / key / "embedded-sft.jsonl"
    with file_lock(path.with_name(".lock")):
        if not path.exists():
            lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in embedded_conversations())
            atomic_write(path, "".join(lines).encode())
    return path


def embedded_conversations() -> Iterator[dict]:
    """Records {"kind", "messages"} from the stdlib's docstrings and signatures, then tasks."""
    for module, tree in _stdlib_modules():
        yield from _module_records(module, tree)
    yield from _task_records(random.Random(GENERATOR_VERSION), 1000)


def _stdlib_modules() -> Iterator[tuple[str, ast.Module]]:
    """(dotted name, syntax tree) of each public stdlib module, in stdlib_files order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        parts = path.relative_to(root).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not parts or any(p.startswith("_") for p in parts):
            continue
        with tokenize.open(path) as f:
            try:
                yield ".".join(parts), ast.parse(f.read())
            except SyntaxError:  # lib2to3-style fixtures written for other Python versions
                continue


def _first_paragraph(node: ast.AST) -> str | None:
    doc = ast.get_docstring(node)
    if not doc:
        return None
    text = " ".join(doc.split("\n\n")[0].split())
    if any(marker in text for marker in CHAT_TOKENS):
        return None
    return text if 16 <= len(text) <= MAX_ANSWER_CHARS else None


def _module_records(module: str, tree: ast.Module) -> Iterator[dict]:
    summary = _first_paragraph(tree)
    if summary:
        yield _record_of("module", f"What is the Python module `{module}` for?", summary)
    answered = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        name, doc = f"{module}.{node.name}", _first_paragraph(node)
        if doc:
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            answered.append(_record_of(kind, _doc_question(kind, name), doc))
            yield answered[-1]
        if isinstance(node, ast.FunctionDef):
            signature = f"`{name}({ast.unparse(node.args)})`"
            if len(signature) <= MAX_ANSWER_CHARS:
                yield _record_of("signature", f"What is the signature of `{name}`?", signature)
    if len(answered) >= 2:  # one two-turn conversation per module, with a system prompt
        first, second = answered[0]["messages"], answered[1]["messages"]
        system = {"role": "system", "content": SYSTEM_PROMPT}
        yield {"kind": "multi-turn", "messages": [system, *first, *second]}


def _doc_question(kind: str, name: str) -> str:
    if kind == "class":
        return f"What is the class `{name}`?"
    return f"What does `{name}` do?"


def _record_of(kind: str, question: str, answer: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"kind": kind, "messages": messages}


def _task_records(rng: random.Random, n: int) -> Iterator[dict]:
    """`n` templated tasks with exact answers, four kinds in turn."""
    words = ["python", "module", "string", "integer", "lambda", "iterator", "socket", "thread"]
    for i in range(n):
        kind = ("add", "sort", "reverse", "count")[i % 4]
        if kind == "add":
            a, b = rng.randrange(1000), rng.randrange(1000)
            yield _record_of(kind, f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")
        elif kind == "sort":
            xs = [rng.randrange(100) for _ in range(rng.randint(3, 7))]
            question = f"Sort in ascending order: {', '.join(map(str, xs))}"
            yield _record_of(kind, question, ", ".join(map(str, sorted(xs))))
        elif kind == "reverse":
            word = rng.choice(words) + str(rng.randrange(100))
            yield _record_of(kind, f"Reverse the string `{word}`.", f"`{word[::-1]}`")
        else:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
            yield _record_of(kind, f"How many words are in `{text}`?", str(len(text.split())))


# --- encoding, packing, batches ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Packed:
    """Rows of seq_len + 1 tokens: ids (R, seq_len + 1) int64 and labels aligned with them."""

    ids: np.ndarray
    labels: np.ndarray
    n_conversations: int
    n_truncated: int  # conversations cut at the row length (their tail is lost)
    fill: float  # share of row positions holding tokens rather than padding

    @property
    def n_rows(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the chosen rows, each (len(index), seq_len)."""
        ids, labels = torch.from_numpy(self.ids[index]), torch.from_numpy(self.labels[index])
        return ids[:, :-1], labels[:, 1:]

    def response_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def pack(examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Packed:
    """Next-fit packing of (ids, labels) pairs into rows of seq_len + 1 tokens.

    A conversation never spans two rows: one longer than a row is truncated to it. The first
    label of every conversation is set to -100 (see the module docstring); padding is pad_id
    with label -100. Conversations left without a trained target are dropped.
    """
    width = seq_len + 1
    rows_ids, rows_labels, row_ids, row_labels = [], [], [], []
    kept = truncated = 0
    for ids, labels in examples:
        truncated += len(ids) > width
        ids, labels = ids[:width], [IGNORE] + labels[1:width]
        if all(label == IGNORE for label in labels):
            continue
        if len(row_ids) + len(ids) > width:
            rows_ids.append(row_ids)
            rows_labels.append(row_labels)
            row_ids, row_labels = [], []
        row_ids, row_labels, kept = row_ids + ids, row_labels + labels, kept + 1
    if row_ids:
        rows_ids.append(row_ids)
        rows_labels.append(row_labels)
    n_tokens = sum(map(len, rows_ids))
    fill = n_tokens / max(len(rows_ids) * width, 1)
    ids, labels = _pad(rows_ids, width, pad_id), _pad(rows_labels, width, IGNORE)
    return Packed(ids, labels, kept, truncated, fill)


def _pad(rows: list[list[int]], width: int, value: int) -> np.ndarray:
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def batch_rows(n_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of the batch at `step`: epoch e = step // (n_rows // batch_size) walks a
    permutation drawn from (seed, e); the n_rows % batch_size rows left over differ each epoch."""
    steps_per_epoch = n_rows // batch_size
    if steps_per_epoch == 0:
        raise SFTDataError(
            f"{n_rows} packed training rows cannot fill one batch of {batch_size}; lower "
            "batch_size or add data"
        )
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return order[k * batch_size : (k + 1) * batch_size]


@dataclass(frozen=True, eq=False)
class SFTData:
    train: Packed
    val: Packed
    bos_id: int  # the <s> that starts every packed conversation

    def batch(self, batch_size: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the training batch at `step`, each (batch_size, seq_len)."""
        return self.train.rows(batch_rows(self.train.n_rows, batch_size, seed, step))

    def describe(self) -> str:
        t, v = self.train, self.val
        return (
            f"{t.n_conversations:,} train conversations in {t.n_rows:,} rows of "
            f"{t.ids.shape[1]} tokens ({t.fill:.0%} filled, {t.response_tokens():,} response "
            f"tokens, {t.n_truncated} truncated); {v.n_conversations:,} validation "
            f"conversations in {v.n_rows:,} rows"
        )


def build_sft_data(
    sources: str | Sequence[str],
    tok: Tokenizer,
    seq_len: int,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> SFTData:
    """Load, split by content hash, encode (`tok` must have the chat tokens) and pack.

    Training conversations are shuffled once with `seed` before packing, so rows mix sources.
    """
    train, val = [], []
    for messages in load_conversations(sources, cache_dir):
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        (val if is_validation(key, val_fraction, seed) else train).append(messages)
    if not train or not val:
        raise SFTDataError(
            f"{len(train) + len(val)} conversations split into {len(train)} train and "
            f"{len(val)} validation at val_fraction={val_fraction}; both must be non-empty"
        )
    random.Random(seed).shuffle(train)
    packs = [pack([encode_chat(tok, m) for m in s], seq_len, tok.pad_id) for s in (train, val)]
    return SFTData(*packs, bos_id=tok.bos_id)


def main(argv: Sequence[str] | None = None) -> None:
    sources = list(argv if argv is not None else sys.argv[1:]) or [EMBEDDED_SFT]
    tok = add_chat_tokens(Tokenizer.from_file(prepare(DataConfig()).meta["tokenizer"]))
    print(f"{EMBEDDED_SFT}: {embedded_sft_path()}")
    print(build_sft_data(sources, tok, 256).describe())


if __name__ == "__main__":
    main()
