"""The anneal's data mixture: named sources with weights; each step's rows depend on (seed, step).

MiniCPM decays on the pretraining data mixed with high-quality and SFT-formatted data (arXiv
2404.06395 §4; facts §4: C-Eval 40.0 -> 52.6 against decaying on the pretraining data alone).
A PretrainConfig names the sources in `anneal_mixture`:

    anneal_mixture:
      - {name: pretrain, weight: 0.7}                 # the pretraining corpus: the spec's data
      - {name: hq, weight: 0.2, sources: ["s3://bucket/hq/*.jsonl.gz"]}
      - {name: sft, weight: 0.1, sources: [sft.jsonl], format: sft}

A source reads text, JSON Lines or Parquet like DataConfig, or with `format: sft` JSON Lines of
SFT records (any form trainables.chat.to_messages accepts; "embedded:sft" is the offline set of
trainables.sft_data), each conversation rendered as one
document by MiniCPM's chat template (trainables.chat.render_chat: "<用户>{user}<AI>{answer}...").
Every source is tokenised with the pretraining tokenizer into its own token store (built once and
cached like the spec's data); that tokenizer has no `<用户>`/`<AI>` pieces, so the markers are
spelled with ordinary pieces. Optimizer step s of a global batch of N rows:
1. rows per source by systematic sampling (Madow 1949): with u ~ U[0, 1) drawn from (seed, s)
   and C_i = N·(w_1 + ... + w_i) for the normalised weights, source i gets
   ceil(C_i − u) − ceil(C_{i−1} − u) rows: floor or ceil of N·w_i, exactly N·w_i on average;
2. source i's rows are random windows as in trainables.tokens.sample_batch, drawn from the
   stream (seed, s, i), so the batch is a function of (seed, s) alone and a resumed anneal sees
   the batches it would have seen.
Rows come in mixture order (source 1's first); the step's loss is their mean, whatever the order.

    mix = prepare_mixture(cfg.anneal_mixture, cfg.data, store)
    x, y, source = mix.batch(n_rows=8, seq_len=256, seed=0, step=1200)   # source: (8,) indices
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.chat import render_chat
from trainables.corpus import FORMATS, source_fingerprint
from trainables.data import DataConfig, default_cache_dir, prepare
from trainables.sft_data import EMBEDDED_SFT, embedded_sft_path, load_conversations
from trainables.tokenizer import atomic_write, file_lock
from trainables.tokens import TokenStore

PRETRAIN = "pretrain"  # the name that means the spec's own data (its token store)
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")  # names metrics (train_loss_<name>) and logs
_MIX_STREAM = 0x6D6978  # "mix": keeps these draws apart from sample_batch's (seed, step) stream
SFT = "sft"  # format: JSON Lines of SFT records, rendered by the chat template
MIXTURE_FORMATS = (*FORMATS, SFT)
RENDER_VERSION = 1  # part of the rendered file's cache key: bump when the rendering changes


@dataclass(frozen=True)
class MixtureSource:
    """One named source of the anneal: documents read like DataConfig's, and a weight > 0."""

    name: str
    weight: float
    sources: tuple[str, ...] = ()  # paths, fsspec URLs, globs; empty for `pretrain`
    format: str = "auto"
    text_field: str = "text"
    val_fraction: float = 0.02  # held-out share for this source's val_loss_<name>
    max_chars: int | None = None

    def __post_init__(self):
        given = (self.sources,) if isinstance(self.sources, (str, os.PathLike)) else self.sources
        object.__setattr__(self, "sources", tuple(os.fspath(s) for s in given))
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"anneal_mixture name={self.name!r}: use 1-32 lowercase letters, digits, '_' "
                "or '-', starting with a letter or digit (it names metrics)"
            )
        weight_ok = isinstance(self.weight, (int, float)) and not isinstance(self.weight, bool)
        if not weight_ok or not 0 < self.weight < math.inf:
            raise ValueError(f"anneal_mixture[{self.name}].weight={self.weight!r}: must be > 0")
        if self.name == PRETRAIN and self.sources:
            raise ValueError(
                f"anneal_mixture[{PRETRAIN}].sources={list(self.sources)}: `{PRETRAIN}` is the "
                "spec's own data and takes no sources; give these another name"
            )
        if self.name != PRETRAIN and not self.sources:
            raise ValueError(
                f"anneal_mixture[{self.name}].sources: a non-empty list of paths/URLs is "
                f"required (only `{PRETRAIN}` may omit it)"
            )
        if self.format not in MIXTURE_FORMATS:
            raise ValueError(
                f"anneal_mixture[{self.name}].format={self.format!r}: one of {MIXTURE_FORMATS}"
            )
        if EMBEDDED_SFT in self.sources and self.format != SFT:
            raise ValueError(
                f"anneal_mixture[{self.name}]: {EMBEDDED_SFT} holds SFT records; set format: {SFT}"
            )

    def data_config(
        self, pretrain: DataConfig, tokenizer: str, vocab_size: int, cache_dir: Path
    ) -> DataConfig:
        """This source as a DataConfig tokenised with the pretraining tokenizer; SFT records are
        first rendered to a JSON Lines file of {"text": conversation} in the cache."""
        sources, fmt, field = self.sources, self.format, self.text_field
        if fmt == SFT:
            sources, fmt, field = (str(render_sft(self.sources, cache_dir)),), "jsonl", "text"
        return DataConfig(
            sources=sources,
            format=fmt,
            text_field=field,
            vocab_size=vocab_size,
            val_fraction=self.val_fraction,
            tokenizer=tokenizer,
            max_chars=self.max_chars,
            seed=pretrain.seed,
        )


def check_mixture(entries: Sequence[MixtureSource]) -> None:
    """Names are unique (each names its own metrics and store)."""
    names = [e.name for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"anneal_mixture: names must be unique; repeated: {', '.join(repeated)}")


def normalised_weights(entries: Sequence[MixtureSource]) -> np.ndarray:
    weights = np.array([e.weight for e in entries], dtype=np.float64)
    return weights / weights.sum()


# --- each step's rows: pure functions of (seed, step) -------------------------------------------


def row_counts(weights: np.ndarray, n_rows: int, seed: int, step: int) -> np.ndarray:
    """Rows per source at `step` by systematic sampling; counts sum to n_rows (module docs)."""
    u = np.random.Generator(np.random.PCG64([seed, step, _MIX_STREAM])).random()
    edges = np.ceil(n_rows * np.cumsum(weights) - u)
    edges[-1] = n_rows  # the cumulative sum may end at 1 - ε; the batch is exactly n_rows
    return np.diff(edges, prepend=0.0).astype(np.int64)


def source_windows(
    tokens: np.ndarray, n: int, seq_len: int, seed: int, step: int, index: int
) -> torch.Tensor:
    """`n` random windows of seq_len + 1 tokens, int64 (n, T + 1), from stream (seed, step, i)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{len(tokens)} tokens cannot fill a window of seq_len + 1 = {seq_len + 1}"
        )
    rng = np.random.Generator(np.random.PCG64([seed, step, _MIX_STREAM, index + 1]))
    starts = rng.integers(0, len(tokens) - seq_len, size=n)  # start + T + 1 <= len
    return torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))


def row_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean float32 cross-entropy of each row: logits (B, T, V), targets (B, T) -> (B,).

    Their mean is the batch loss MiniCPM.forward returns (every row has T targets)."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return loss.view(targets.shape).mean(dim=1)


def per_source(values: torch.Tensor, source: torch.Tensor, n_sources: int) -> torch.Tensor:
    """Sum of `values` (B,) per source index (B,): (n_sources,) float64."""
    out = torch.zeros(n_sources, dtype=torch.float64, device=values.device)
    return out.index_add_(0, source.to(values.device), values.to(torch.float64))


# --- the mixture of token stores ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Mixture:
    names: tuple[str, ...]
    weights: np.ndarray  # normalised, in the order of names
    stores: tuple[TokenStore, ...]

    def batch(
        self, n_rows: int, seq_len: int, seed: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y (N, T) int64 and each row's source index (N,): a function of (seed, step)."""
        counts = row_counts(self.weights, n_rows, seed, step)
        windows = torch.cat(
            [
                source_windows(store.train, int(n), seq_len, seed, step, i)
                for i, (store, n) in enumerate(zip(self.stores, counts, strict=True))
            ]
        )
        source = torch.repeat_interleave(torch.arange(len(self.names)), torch.from_numpy(counts))
        return windows[:, :-1], windows[:, 1:], source


def prepare_mixture(
    entries: Sequence[MixtureSource],
    data: DataConfig,
    store: TokenStore,
    roots: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
) -> Mixture:
    """Token stores of every source, tokenised with `store`'s tokenizer (the pretraining one).

    `roots` (name -> store folder, from a driver) are opened where this machine can read them;
    any other source is prepared here, which finds the same cached store or builds it.
    """
    tokenizer = data.tokenizer or store.meta["tokenizer"]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stores = []
    for entry in entries:
        if entry.name == PRETRAIN:
            stores.append(store)
            continue
        root = (roots or {}).get(entry.name)
        if root and (Path(root) / "meta.json").exists():
            found = TokenStore.open(root)
        else:
            vocab = store.meta["vocab_size"]
            found = prepare(entry.data_config(data, tokenizer, vocab, cache), cache)
        _check_tokenizer(entry.name, found, store)
        stores.append(found)
    names = tuple(e.name for e in entries)
    return Mixture(names, normalised_weights(entries), tuple(stores))


def _check_tokenizer(name: str, found: TokenStore, store: TokenStore) -> None:
    if found.meta["tokenizer_sha256"] != store.meta["tokenizer_sha256"]:
        raise ValueError(
            f"anneal_mixture[{name}]: its token store {found.root} was built with tokenizer "
            f"{found.meta['tokenizer']}, not the pretraining one {store.meta['tokenizer']}; "
            "delete that store and prepare again"
        )


# --- SFT records as documents ---------------------------------------------------------------------


def render_sft(sources: Sequence[str], cache_dir: Path) -> Path:
    """<cache>/mixture-sft/<key>/rendered.jsonl: one {"text": render_chat(messages)} per record,
    key = the sources' fingerprint (names, sizes, times) and RENDER_VERSION; built once.
    `embedded:sft` is the project's offline SFT set, a JSON Lines file built on first use."""
    files = [str(embedded_sft_path(cache_dir)) if s == EMBEDDED_SFT else s for s in sources]
    key = hashlib.sha256(f"{source_fingerprint(files)} {RENDER_VERSION}".encode()).hexdigest()
    path = cache_dir / "mixture-sft" / key[:32] / "rendered.jsonl"
    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            lines = [
                json.dumps({"text": render_chat(m)}, ensure_ascii=False)
                for m in load_conversations(files, cache_dir)
            ]
            atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
