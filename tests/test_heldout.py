"""Held-out loss and bits per byte: hand computations, every token predicted once, any source."""

from __future__ import annotations

import dataclasses
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_scoring import BigramLM, CharTokenizer

from trainables import eval_data
from trainables.heldout import (
    HeldoutSet,
    average,
    evaluate_heldout,
    heldout_loss,
    load_heldout,
    stream_nll,
    token_stream,
)
from trainables.model import MiniCPM
from trainables.shapes import get_config
from trainables.tokenizer import train_tokenizer
from trainables.tokens import build_token_store, val_batches

DOCS = ("ab", "c d", "hello world")


def test_a_uniform_model_costs_log2_vocab_bits_per_token():
    tok = CharTokenizer()
    result = heldout_loss(BigramLM(), tok, HeldoutSet("s", DOCS, "test"), seq_len=3, batch_size=2)
    n_tokens = sum(len(d) + 1 for d in DOCS)  # each document and the eos after it
    n_bytes = sum(len(d) for d in DOCS)
    assert (result["n_tokens"], result["n_bytes"], result["n_docs"]) == (n_tokens, n_bytes, 3)
    assert result["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    expected = n_tokens * math.log2(tok.vocab_size) / n_bytes
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seq_len, batch_size", [(1, 1), (4, 2), (7, 3), (64, 8)])
def test_every_token_is_predicted_exactly_once_whatever_the_window(seq_len, batch_size):
    torch.manual_seed(0)
    model, tok = BigramLM(), CharTokenizer()
    torch.nn.init.normal_(model.table, std=2.0)
    stream = token_stream(tok, DOCS)
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    by_hand = -sum(float(logp[a, b]) for a, b in zip(stream[:-1], stream[1:], strict=True))
    nll, n = stream_nll(model, stream, seq_len=seq_len, batch_size=batch_size)
    assert n == len(stream) - 1 and nll == pytest.approx(by_hand, rel=1e-5)


def test_the_loss_matches_the_models_own_cross_entropy_on_the_same_windows():
    torch.manual_seed(0)
    model = MiniCPM(dataclasses.replace(get_config("micro-32"), vocab_size=300, max_seq_len=16))
    stream = torch.randint(0, 300, (5 * 16 + 1,)).tolist()
    nll, n = stream_nll(model.eval(), stream, seq_len=16, batch_size=2)
    with torch.no_grad():
        own = [float(model(x, y)) for x, y in val_batches(torch.tensor(stream).numpy(), 5, 16)]
    assert nll / n == pytest.approx(own[0], rel=1e-5)


def test_a_token_store_is_read_back_as_its_validation_text(tmp_path):
    train = [f"def f{i}(x):\n    return x * {i}\n" for i in range(200)]
    val = ["print('held out')\n", "x = [1, 2, 3]\n", "naïve café\n"]
    tok = train_tokenizer(train + val, 300, tmp_path / "cache")
    store = build_token_store(train, val, tok, tmp_path / "store")
    heldout = load_heldout(f"{tmp_path / 'store'}#name=store-val")
    assert heldout.name == "store-val" and heldout.documents == tuple(val)
    model = MiniCPM(dataclasses.replace(get_config("micro-32"), vocab_size=300, max_seq_len=16))
    result = heldout_loss(model.eval(), tok, heldout)
    assert result["n_tokens"] == store.meta["n_val_tokens"]  # the trainer's own accounting
    assert result["n_bytes"] == store.meta["val_bytes"]


def test_text_jsonl_and_parquet_sources_with_options(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n\nthree\n\nfour five six\n")
    text = load_heldout(f"{tmp_path / 'a.txt'}#max_chars=10")
    assert text.name == "a" and text.documents == ("one two", "thr")
    rows = [{"content": "x y"}, {"content": "z"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    jsonl = load_heldout(f"{tmp_path / 'b.jsonl'}#text_field=content&name=b")
    assert jsonl.documents == ("x y", "z")
    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "c.parquet")
    assert load_heldout(str(tmp_path / "c.parquet")).documents == ("p", "q")
    with pytest.raises(ValueError, match="max_chars='0'"):
        load_heldout(f"{tmp_path / 'a.txt'}#max_chars=0")


def test_the_average_weighs_sets_equally_and_the_pooled_figure_by_bytes():
    results = {
        "a": {"bits_per_byte": 1.0, "n_bytes": 100},
        "b": {"bits_per_byte": 3.0, "n_bytes": 300},
    }
    assert average(results) == {
        "bits_per_byte": 2.0,
        "pooled_bits_per_byte": 2.5,
        "n_sets": 2,
        "n_bytes": 400,
    }
    out = evaluate_heldout(
        BigramLM(), CharTokenizer(), [HeldoutSet("a", DOCS, "t"), HeldoutSet("b", DOCS[:1], "t")]
    )
    assert set(out["sets"]) == {"a", "b"} and out["average"]["n_sets"] == 2
    with pytest.raises(ValueError, match="must be unique"):
        evaluate_heldout(BigramLM(), CharTokenizer(), [HeldoutSet("a", DOCS, "t")] * 2)


def test_default_sets_add_shared_corpora_only_when_present(tmp_path):
    assert eval_data.default_heldout(tmp_path / "absent") == [eval_data.HELDOUT]
    (tmp_path / "tiny.txt").write_text("x\n")
    (tmp_path / "README.md").write_text("not a corpus\n")
    assert eval_data.default_heldout(tmp_path) == [
        eval_data.HELDOUT,
        f"{tmp_path / 'tiny.txt'}#name=tiny&max_chars={eval_data.SHARED_MAX_CHARS}",
    ]
