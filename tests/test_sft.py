"""SFT data and the SFT stage: reading, packing, batches, the default set, training and resume."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import random

import numpy as np
import pytest
import torch

from trainables.artifact import load_model_dir, save_model_dir
from trainables.chat import IGNORE, add_chat_tokens, encode_chat
from trainables.data import DataConfig, prepare
from trainables.model import MiniCPM
from trainables.sft import SFTConfig, run_sft
from trainables.sft_data import (
    SFTDataError,
    batch_rows,
    build_sft_data,
    embedded_sft_path,
    load_conversations,
    pack,
)
from trainables.shapes import get_config
from trainables.tokenizer import Tokenizer


def _records(n: int, seed: int = 0) -> list[dict]:
    """Small conversations in the three record forms, with exact answers to learn."""
    rng, out = random.Random(seed), []
    for i in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        if i % 3 == 0:
            out.append({"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}."})
        elif i % 3 == 1:
            out.append(
                {"instruction": "Reverse the word.", "input": f"w{a}x{b}", "output": f"{b}x{a}w"}
            )
        else:
            q = {"role": "user", "content": f"Double {a}."}
            out.append({"messages": [q, {"role": "assistant", "content": str(2 * a)}]})
    return out


def _write_jsonl(path, records, opener=open) -> str:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def base_tok() -> Tokenizer:
    return Tokenizer.from_file(prepare(DataConfig()).meta["tokenizer"])


@pytest.fixture(scope="module")
def tok(base_tok) -> Tokenizer:
    return add_chat_tokens(base_tok)


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory) -> str:
    return _write_jsonl(tmp_path_factory.mktemp("sft") / "tasks.jsonl", _records(240))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, base_tok) -> str:
    """A fresh micro-32 model folder with the embedded tokenizer (no chat tokens yet)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_config("micro-32"), vocab_size=base_tok.vocab_size)
    folder = tmp_path_factory.mktemp("init") / "model"
    save_model_dir(folder, MiniCPM(cfg), base_tok, stage="anneal")
    return str(folder)


# --- reading ------------------------------------------------------------------------------------


def test_plain_gzip_and_glob_sources_are_read_in_order(tmp_path):
    records = _records(6)
    _write_jsonl(tmp_path / "a.jsonl", records[:3])
    _write_jsonl(tmp_path / "b.jsonl.gz", records[3:], opener=gzip.open)
    conversations = load_conversations(str(tmp_path / "*.jsonl*"))
    assert len(conversations) == 6
    assert conversations[0][0]["content"] == records[0]["prompt"]
    assert conversations[5] == records[5]["messages"]


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r"bad\.jsonl:3: bad JSON"),
        ('{"prompt": "q"}', r"bad\.jsonl:3: record has 'prompt' but no 'response'"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', r"bad\.jsonl:3: message 0"),
        ("[1, 2]", r"bad\.jsonl:3: expected a JSON object"),
    ],
)
def test_a_bad_record_is_named_by_file_and_line(tmp_path, line, match):
    good = json.dumps(_records(1)[0])
    (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(SFTDataError, match=match):
        load_conversations(str(tmp_path / "bad.jsonl"))


def test_missing_sources_are_refused(tmp_path):
    with pytest.raises(SFTDataError, match="no such file"):
        load_conversations(str(tmp_path / "absent.jsonl"))
    with pytest.raises(SFTDataError, match="no file matches"):
        load_conversations(str(tmp_path / "*.jsonl"))


def test_embedded_set_is_built_once_from_the_stdlib(tmp_path):
    path = embedded_sft_path(tmp_path)
    assert embedded_sft_path(tmp_path) == path and path.stat().st_mtime_ns > 0
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    kinds = {r["kind"] for r in records}
    assert 3000 <= len(records) <= 10_000
    assert {"function", "class", "signature", "module", "multi-turn", "add"} <= kinds
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records}
    assert answers["What does `json.dumps` do?"].startswith("Serialize ``obj`` to a JSON")
    assert answers["What is the signature of `json.dumps`?"].startswith("`json.dumps(obj, *, ")
    assert answers["What is 137 + 582?"] == "137 + 582 = 719."  # templated, seeded


# --- packing and batches ------------------------------------------------------------------------


def test_packing_never_lets_labels_cross_conversations(tok, tmp_path):
    conversations = load_conversations(_write_jsonl(tmp_path / "c.jsonl", _records(60)))
    examples = [encode_chat(tok, m) for m in conversations]
    examples[0] = (examples[0][0], examples[0][0])  # a caller that labels its own first token
    packed = pack(examples, seq_len=48, pad_id=tok.pad_id)
    starts = packed.ids == tok.bos_id
    assert (packed.labels[starts] == IGNORE).all()
    # target t of a row is label t + 1: it is never a conversation's first token
    targets = packed.rows(np.arange(packed.n_rows))[1]
    assert (targets[torch.from_numpy(starts[:, 1:])] == IGNORE).all()
    # the rows, padding removed, are the conversations in order: nothing lost or mixed
    tokens = packed.ids[packed.ids != tok.pad_id]
    assert tokens.tolist() == [i for ids, _ in examples for i in ids]
    assert packed.n_conversations == 60 and packed.n_truncated == 0
    assert packed.ids.shape[1] == 49 and 0.5 < packed.fill <= 1.0


def test_a_long_conversation_is_truncated_to_one_row(tok):
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}]
    packed = pack([encode_chat(tok, long)], seq_len=32, pad_id=tok.pad_id)
    assert packed.n_rows == 1 and packed.n_truncated == 1 and packed.fill == 1.0


def test_batches_are_a_function_of_seed_and_step(tok, sft_jsonl):
    first = build_sft_data(sft_jsonl, tok, 48, val_fraction=0.1, seed=3)
    again = build_sft_data(sft_jsonl, tok, 48, val_fraction=0.1, seed=3)
    for step in (0, 5, 50):
        for a, b in zip(first.batch(4, 3, step), again.batch(4, 3, step), strict=True):
            assert torch.equal(a, b)
    n = first.train.n_rows
    epoch = np.concatenate([batch_rows(n, 4, 3, s) for s in range(n // 4)])
    assert len(set(epoch.tolist())) == len(epoch)  # one epoch draws no row twice
    assert not np.array_equal(batch_rows(n, 4, 3, 0), batch_rows(n, 4, 4, 0))
    assert not np.array_equal(batch_rows(n, 4, 3, 0), batch_rows(n, 4, 3, n // 4))
    with pytest.raises(SFTDataError, match="cannot fill one batch"):
        batch_rows(3, 4, 0, 0)


def test_held_out_split_is_by_content(tok, sft_jsonl, tmp_path):
    records = _records(240)
    doubled = _write_jsonl(tmp_path / "d.jsonl", records + records)
    data = build_sft_data(doubled, tok, 48, val_fraction=0.1, seed=0)
    single = build_sft_data(sft_jsonl, tok, 48, val_fraction=0.1, seed=0)
    # duplicates land on the same side, so each side exactly doubles
    assert data.val.n_conversations == 2 * single.val.n_conversations > 0
    assert data.train.n_conversations == 2 * single.train.n_conversations


# --- the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 0}, "SFTConfig.seq_len=0"),
        ({"steps": 5, "tokens": 100}, "not both"),
        ({"lr_end": 0.0}, "min_lr_ratio"),
        ({"decay_shape": "step"}, "SFTConfig.decay_shape='step'"),
        ({"sources": ()}, "SFTConfig.sources"),
        ({"precision": "fp16"}, "SFTConfig.precision"),
    ],
)
def test_bad_configs_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**kwargs)


# --- the stage ----------------------------------------------------------------------------------

# one thread: at this size a second one only spins (7x the CPU time on a busy machine)
SMALL = dict(seq_len=64, batch_size=4, val_fraction=0.1, lr_start=1e-2, lr_end=1e-3, threads=1)


def test_run_sft_lowers_the_held_out_response_loss(tmp_path, init_dir, sft_jsonl, tok):
    cfg = SFTConfig(sources=(sft_jsonl,), steps=30, eval_every=10, **SMALL)
    reports = []
    metrics = run_sft(cfg, init_dir, str(tmp_path / "out"), report=reports.append)
    assert [r["step"] for r in reports] == [10, 20, 30]
    assert metrics["val_loss"] < metrics["val_loss_init"] - 1.0
    assert metrics["step"] == 30 and metrics["tokens"] == 30 * 4 * 64
    loaded = load_model_dir(tmp_path / "out")
    assert loaded.state["stage"] == "sft" and loaded.state["lineage"]["init"] == init_dir
    assert loaded.tokenizer.sha256 == tok.sha256 and loaded.config.vocab_size == tok.vocab_size
    assert not (tmp_path / "out.work").exists()
    # a finished stage is skipped: same metrics, no training, no reports
    assert run_sft(cfg, init_dir, str(tmp_path / "out"), report=reports.append) == metrics
    assert len(reports) == 3


def test_per_conversation_attention_trains_and_scores_each_conversation_alone(
    tmp_path, init_dir, sft_jsonl
):
    cfg = SFTConfig(sources=(sft_jsonl,), steps=10, eval_every=10, **SMALL)
    masked = dataclasses.replace(cfg, per_conversation_attention=True)
    plain = run_sft(cfg, init_dir, str(tmp_path / "plain"))
    alone = run_sft(masked, init_dir, str(tmp_path / "masked"))
    # The same start, data and batches; only what each packed conversation may attend to differs.
    assert alone["val_loss_init"] != plain["val_loss_init"]
    assert math.isfinite(alone["val_loss"]) and alone["val_loss"] < alone["val_loss_init"] - 0.5
    assert load_model_dir(tmp_path / "masked").state["stage"] == "sft"
    with pytest.raises(ValueError, match="per_conversation_attention='yes'.*true or false"):
        SFTConfig(per_conversation_attention="yes")


class _Killed(Exception):
    pass


def test_an_interrupted_run_resumes_onto_the_same_curve(tmp_path, init_dir, sft_jsonl):
    cfg = SFTConfig(sources=(sft_jsonl,), steps=8, eval_every=1, checkpoint_every=3, **SMALL)
    whole: list[dict] = []
    run_sft(cfg, init_dir, str(tmp_path / "whole"), report=whole.append)

    def die_at_5(metrics):
        if metrics["step"] == 5:
            raise _Killed
        parts.append(metrics)

    parts: list[dict] = []
    with pytest.raises(_Killed):
        run_sft(cfg, init_dir, str(tmp_path / "parts"), report=die_at_5)
    assert (tmp_path / "parts.work" / "last").is_dir()
    final = run_sft(cfg, init_dir, str(tmp_path / "parts"), report=parts.append)
    assert [m["step"] for m in parts] == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # resumed from step 3
    by_step = {m["step"]: m for m in parts}
    for m in whole:
        assert by_step[m["step"]]["train_loss"] == pytest.approx(m["train_loss"], abs=1e-6)
        assert by_step[m["step"]]["val_loss"] == pytest.approx(m["val_loss"], abs=1e-6)
    assert final["val_loss"] == pytest.approx(whole[-1]["val_loss"], abs=1e-6)
    a, b = load_model_dir(tmp_path / "whole").model, load_model_dir(tmp_path / "parts").model
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_a_checkpoint_of_another_run_is_refused(tmp_path, init_dir, sft_jsonl):
    cfg = SFTConfig(sources=(sft_jsonl,), steps=4, checkpoint_every=2, **SMALL)

    def die(metrics):
        raise _Killed

    with pytest.raises(_Killed):
        run_sft(cfg, init_dir, str(tmp_path / "o"), report=die)
    other = dataclasses.replace(cfg, lr_start=5e-3)
    with pytest.raises(ValueError, match="another SFT run"):
        run_sft(other, init_dir, str(tmp_path / "o"))
