"""Held-out loss per token and bits per byte of one model on several named text sets at once.

Each set is tokenised with the model's own tokenizer and scored in non-overlapping windows of
the model's sequence length, every token predicted exactly once:

    stream = eos, doc_1, eos, doc_2, eos, ..., doc_n, eos
    loss   = sum of -ln p(token) over the stream after its first eos / tokens   (nats per token)
    bpb    = loss · tokens / (UTF-8 bytes of the documents · ln 2)

Bits per byte do not depend on the tokenizer, so models with different vocabularies compare;
MiniCPM (arXiv 2404.06395 §3.5) averages its held-out loss per byte for that reason. The average
over sets gives every set the same weight (`bits_per_byte`), as a table of held-out sets does;
`pooled_bits_per_byte` weighs sets by their size.

A set is named by a spec: `PATH_OR_URL_OR_GLOB` of text, JSON Lines or Parquet files (read by
`trainables.corpus`), or a token-store folder (its validation split, decoded back to text, which
is exact: the tokenizer is lossless), with options `#name=NAME&format=jsonl&text_field=content&
max_chars=200000`. Sets are capped at `max_chars` characters (default DEFAULT_MAX_CHARS).

    sets = [load_heldout("tiny.txt#name=shakespeare"), load_heldout("runs/tokens/abc")]
    evaluate_heldout(model, tokenizer, sets)   # {"sets": {name: {...}}, "average": {...}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.corpus import iter_documents
from trainables.scoring import model_device, model_max_len
from trainables.tasks import default_name, parse_spec
from trainables.tokenizer import Tokenizer
from trainables.tokens import TokenStore, bits_per_byte

HELDOUT_OPTIONS = ("name", "format", "text_field", "max_chars")
DEFAULT_MAX_CHARS = 1_000_000  # bounds one set's cost; a micro model reads it in seconds
IGNORE = -100  # F.cross_entropy's ignore_index: the padding of the last window


@dataclass(frozen=True, eq=False)
class HeldoutSet:
    name: str
    documents: tuple[str, ...]
    source: str

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"HeldoutSet.name={self.name!r}: a non-empty string")
        if not self.documents or not all(isinstance(d, str) for d in self.documents):
            raise ValueError(f"HeldoutSet.documents: set {self.name} ({self.source}) has no text")


def load_heldout(spec: str, *, max_chars: int | None = DEFAULT_MAX_CHARS) -> HeldoutSet:
    """The documents a spec names, at most `max_chars` characters (the spec's own cap wins)."""
    source, options = parse_spec(spec, HELDOUT_OPTIONS)
    if "max_chars" in options:
        if not options["max_chars"].isdigit() or int(options["max_chars"]) < 1:
            raise ValueError(f"spec {spec!r}: max_chars={options['max_chars']!r}, need a count")
        max_chars = int(options["max_chars"])
    if (Path(source) / "meta.json").is_file():
        docs = store_documents(source, max_chars)
    else:
        docs = list(
            iter_documents(
                source,
                fmt=options.get("format", "auto"),
                text_field=options.get("text_field", "text"),
                max_chars=max_chars,
            )
        )
    docs = [d for d in docs if d]
    return HeldoutSet(options.get("name") or default_name(source), tuple(docs), source)


def store_documents(root: str | Path, max_chars: int | None) -> list[str]:
    """A token store's validation documents as text, decoded with the store's own tokenizer."""
    store = TokenStore.open(root)
    tok = Tokenizer.from_file(store.meta["tokenizer"])
    val = np.asarray(store.val)
    ends = np.flatnonzero(val == store.meta["eos_id"])  # every document ends with eos
    docs, start, left = [], 0, max_chars
    for end in ends:
        docs.append(tok.decode(val[start:end]))
        start = end + 1
        if left is not None:
            left -= len(docs[-1])
            if left <= 0:
                docs[-1] = docs[-1][: len(docs[-1]) + left]
                break
    return docs


def token_stream(tokenizer, documents: Sequence[str]) -> list[int]:
    """eos, doc_1, eos, ..., doc_n, eos: each document predicted after a document boundary."""
    stream = [tokenizer.eos_id]
    for ids in tokenizer.encode(list(documents)):
        stream += ids + [tokenizer.eos_id]
    return stream


@torch.no_grad()
def stream_nll(
    model: torch.nn.Module, stream: Sequence[int], *, seq_len: int, batch_size: int
) -> tuple[float, int]:
    """(sum of -ln p over stream[1:], tokens predicted) in windows of seq_len, no overlap."""
    if len(stream) < 2:
        raise ValueError(f"a stream of {len(stream)} tokens predicts nothing")
    ids = torch.tensor(stream, dtype=torch.long)
    n_windows = math.ceil((len(stream) - 1) / seq_len)
    device = model_device(model)
    total = 0.0
    for first in range(0, n_windows, batch_size):
        rows = range(first, min(first + batch_size, n_windows))
        x = torch.full((len(rows), seq_len), int(stream[0]), dtype=torch.long)
        y = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
        for r, w in enumerate(rows):
            window = ids[w * seq_len : (w + 1) * seq_len + 1]  # T + 1 ids, fewer at the end
            x[r, : len(window) - 1], y[r, : len(window) - 1] = window[:-1], window[1:]
        width = min(seq_len, len(stream) - 1 - first * seq_len)  # the batch's longest window
        logits = model(x[:, :width].to(device)).float()  # (B, T, V)
        nll = F.cross_entropy(
            logits.flatten(0, 1), y[:, :width].flatten().to(device), reduction="sum"
        )
        total += float(nll)
    return total, len(stream) - 1


def heldout_loss(
    model: torch.nn.Module,
    tokenizer,
    heldout: HeldoutSet,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> dict:
    """{"loss": nats/token, "bits_per_byte", "n_tokens", "n_bytes", "n_docs"} of one set."""
    seq_len = seq_len or model_max_len(model)
    stream = token_stream(tokenizer, heldout.documents)
    nll, n_tokens = stream_nll(model, stream, seq_len=seq_len, batch_size=batch_size)
    n_bytes = sum(len(d.encode("utf-8")) for d in heldout.documents)
    loss = nll / n_tokens
    return {
        "loss": loss,
        "bits_per_byte": bits_per_byte(loss, n_tokens, n_bytes),
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_docs": len(heldout.documents),
    }


def average(results: dict[str, dict]) -> dict:
    """Mean bits per byte over sets (each set weighs the same) and the size-weighted pooled one."""
    if not results:
        raise ValueError("no held-out results to average")
    bits = sum(r["bits_per_byte"] * r["n_bytes"] for r in results.values())
    n_bytes = sum(r["n_bytes"] for r in results.values())
    return {
        "bits_per_byte": sum(r["bits_per_byte"] for r in results.values()) / len(results),
        "pooled_bits_per_byte": bits / n_bytes,
        "n_sets": len(results),
        "n_bytes": n_bytes,
    }


def evaluate_heldout(
    model: torch.nn.Module,
    tokenizer,
    sets: Sequence[HeldoutSet],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> dict:
    """{"sets": {name: heldout_loss(...)}, "average": average(...)} over uniquely named sets."""
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"held-out set names must be unique, got {names}; rename with #name=")
    results = {
        s.name: heldout_loss(model, tokenizer, s, seq_len=seq_len, batch_size=batch_size)
        for s in sets
    }
    return {"sets": results, "average": average(results)}
