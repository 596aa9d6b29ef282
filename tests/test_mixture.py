"""The anneal's data mixture: per-step row counts, batches by (seed, step), sources tokenised with
the pretraining tokenizer, SFT records rendered by the chat template, and the spec's validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainables.chat import render_chat, to_messages
from trainables.data import DataConfig
from trainables.dictconfig import ConfigError, from_dict, to_dict
from trainables.mixture import (
    Mixture,
    MixtureSource,
    normalised_weights,
    per_source,
    prepare_mixture,
    row_counts,
    row_losses,
)
from trainables.pretrain_config import PretrainConfig
from trainables.tokenizer import Tokenizer
from trainables.tokens import TokenStore

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEIGHTS = np.array([0.6, 0.3, 0.1])


def sft_records(n: int) -> list[dict]:
    """n conversations in the three record forms trainables.chat.to_messages reads."""
    out = []
    for i in range(n):
        a, b = i % 17, (7 * i) % 13
        question, answer = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        out.append(
            [
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]
                },
                {"prompt": question, "response": answer, "system": "Answer briefly."},
                {"instruction": "Add the numbers.", "input": f"{a} and {b}", "output": answer},
            ][i % 3]
        )
    return out


def array_store(tokens: np.ndarray) -> TokenStore:
    return TokenStore(root="memory", train=tokens, val=tokens, meta={})


# --- row counts and batches: pure functions of (seed, step) -------------------------------------


def test_row_counts_are_floor_or_ceil_and_average_to_the_weights():
    n_rows, steps = 8, 4000
    counts = np.stack([row_counts(WEIGHTS, n_rows, seed=3, step=s) for s in range(steps)])
    assert (counts.sum(axis=1) == n_rows).all()
    quota = n_rows * WEIGHTS  # 4.8, 2.4, 0.8 rows
    assert ((counts == np.floor(quota)) | (counts == np.ceil(quota))).all()
    # each count is floor or ceil: its standard deviation is at most 0.5, so the mean of 4000
    # steps is within 5 standard errors, 5 · 0.5 / sqrt(4000) = 0.04 rows, of the quota
    assert np.abs(counts.mean(axis=0) - quota).max() < 0.04, counts.mean(axis=0)
    again = [row_counts(WEIGHTS, n_rows, seed=3, step=s) for s in range(20)]
    assert all((a == b).all() for a, b in zip(again, counts[:20], strict=True))
    other_seed = np.stack([row_counts(WEIGHTS, n_rows, seed=4, step=s) for s in range(20)])
    assert not (other_seed == counts[:20]).all()


def test_batch_is_a_function_of_seed_and_step_and_rows_come_from_their_source():
    stores = tuple(array_store(np.arange(k * 100_000, k * 100_000 + 5_000)) for k in range(3))
    mix = Mixture(("pretrain", "hq", "sft"), WEIGHTS, stores)
    x, y, source = mix.batch(n_rows=16, seq_len=32, seed=1, step=7)
    assert x.shape == y.shape == (16, 32) and source.shape == (16,)
    assert torch.equal(source, source.sort().values)  # rows in mixture order
    assert torch.equal(x // 100_000, source[:, None].expand(-1, 32))  # each row from its source
    assert torch.equal(y, x + 1)  # a contiguous window: targets are the next tokens
    x2, y2, source2 = mix.batch(16, 32, seed=1, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(source, source2)
    x3, _, _ = mix.batch(16, 32, seed=1, step=8)
    assert not torch.equal(x, x3)


def test_row_losses_average_to_the_model_loss_and_sum_per_source():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 5, 11), torch.randint(0, 11, (4, 5))
    rows = row_losses(logits, targets)
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert rows.mean().item() == pytest.approx(full.item(), rel=1e-6)
    sums = per_source(rows, torch.tensor([0, 2, 2, 0]), 3)
    expected = [(rows[0] + rows[3]).item(), 0.0, (rows[1] + rows[2]).item()]
    assert sums.tolist() == pytest.approx(expected)


# --- the spec: validation and YAML ---------------------------------------------------------------


def _spec(mixture) -> PretrainConfig:
    return PretrainConfig(
        name="m",
        model={"preset": "micro-32"},
        lr=0.01,
        global_batch_tokens=512,
        seq_len=64,
        tokens=512 * 20,
        anneal_mixture=mixture,
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "hq", "weight": 0.0, "sources": ["a.txt"]}, "weight=0.0: must be > 0"),
        ({"name": "hq", "weight": -1, "sources": ["a.txt"]}, "must be > 0"),
        ({"name": "HQ data", "weight": 1, "sources": ["a.txt"]}, "name='HQ data'"),
        ({"name": "../x", "weight": 1, "sources": ["a.txt"]}, "name='../x'"),
        ({"name": "hq", "weight": 1}, r"anneal_mixture\[hq\].sources"),
        ({"name": "pretrain", "weight": 1, "sources": ["a.txt"]}, "takes no sources"),
        ({"name": "hq", "weight": 1, "sources": ["a"], "format": "csv"}, "format='csv'"),
        ({"name": "sft", "weight": 1, "sources": ["embedded:sft"]}, "set format: sft"),
    ],
)
def test_bad_mixture_entries_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        MixtureSource(**entry)


def test_mixture_names_are_unique_and_the_spec_round_trips_yaml(tmp_path):
    hq = MixtureSource("hq", 1.0, ("a.txt",))
    with pytest.raises(ValueError, match="repeated: hq"):
        _spec((hq, MixtureSource("hq", 2.0, ("b.txt",))))
    cfg = _spec(
        [MixtureSource("pretrain", 3), hq, MixtureSource("sft", 1, "s.jsonl", format="sft")]
    )
    assert normalised_weights(cfg.anneal_mixture).tolist() == [0.6, 0.2, 0.2]
    text = yaml.safe_dump(to_dict(cfg), allow_unicode=True)
    assert from_dict(PretrainConfig, yaml.safe_load(text)) == cfg
    bad = to_dict(cfg) | {"anneal_mixture": [{"name": "hq", "weight": 1, "source": ["a"]}]}
    with pytest.raises(ConfigError, match=r"anneal_mixture\[0\].source: unknown key"):
        from_dict(PretrainConfig, bad)


# --- token stores: the pretraining tokenizer, SFT rendered by the chat template -----------------


def test_sources_use_the_pretraining_tokenizer_and_sft_is_rendered(small_store, tmp_path):
    records = sft_records(60)
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in records))
    hq = tmp_path / "hq.txt"
    hq.write_text(
        "\n\n".join(f"Paragraph {i}: the quality of mercy is not strained." for i in range(80))
    )
    data = DataConfig(vocab_size=small_store.meta["vocab_size"])
    entries = (
        MixtureSource("pretrain", 2.0),
        MixtureSource("hq", 1.0, (str(hq),), val_fraction=0.2),
        MixtureSource("sft", 1.0, (str(sft),), format="sft", val_fraction=0.2),
    )
    mix = prepare_mixture(entries, data, small_store)
    assert mix.names == ("pretrain", "hq", "sft") and mix.stores[0] is small_store
    sha = small_store.meta["tokenizer_sha256"]
    assert [s.meta["tokenizer_sha256"] for s in mix.stores] == [sha] * 3
    tok = Tokenizer.from_file(small_store.meta["tokenizer"])
    sft_store = mix.stores[2]
    assert sft_store.meta["n_train_docs"] + sft_store.meta["n_val_docs"] == 60
    rendered = {render_chat(to_messages(r)) for r in records}
    eos = sft_store.meta["eos_id"]
    ids = np.asarray(sft_store.train)
    first = tok.decode(ids[: int(np.argmax(ids == eos))].tolist())
    assert first in rendered and "<用户>" in first and "<AI>" in first
    # a second prepare finds the same stores in the cache
    again = prepare_mixture(entries, data, small_store)
    assert [s.root for s in again.stores] == [s.root for s in mix.stores]


def test_a_bad_sft_record_names_its_line(small_store, tmp_path):
    sft = tmp_path / "bad.jsonl"
    sft.write_text(json.dumps(sft_records(1)[0]) + "\n" + json.dumps({"text": "no roles"}) + "\n")
    data = DataConfig(vocab_size=small_store.meta["vocab_size"])
    with pytest.raises(ValueError, match="bad.jsonl:2: record has keys text"):
        prepare_mixture((MixtureSource("sft", 1, (str(sft),), format="sft"),), data, small_store)
