"""Model folders: the layout every stage after pretraining reads and writes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainables import checkpoint as ckpt
from trainables.artifact import from_checkpoint, load_model_dir, read_state, save_model_dir
from trainables.data import DataConfig, prepare
from trainables.model import MiniCPM
from trainables.shapes import get_config
from trainables.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(prepare(DataConfig()).meta["tokenizer"])


def _model(tok: Tokenizer, seed: int = 0) -> MiniCPM:
    torch.manual_seed(seed)
    return MiniCPM(dataclasses.replace(get_config("micro-32"), vocab_size=tok.vocab_size))


def test_round_trip_keeps_weights_tokenizer_and_lineage(tmp_path, tok):
    model = _model(tok)
    save_model_dir(tmp_path / "m", model, tok, stage="sft", lineage={"init": "x"}, metrics={"a": 1})
    loaded = load_model_dir(tmp_path / "m")
    ids = torch.randint(0, tok.vocab_size, (2, 16))
    assert torch.equal(model(ids), loaded.model(ids))
    assert loaded.tokenizer.sha256 == tok.sha256
    assert loaded.state["stage"] == "sft" and loaded.state["lineage"] == {"init": "x"}
    assert loaded.config == model.cfg and not loaded.model.training


def test_a_corrupt_tokenizer_is_refused_by_name(tmp_path, tok):
    save_model_dir(tmp_path / "m", _model(tok), tok, stage="sft")
    with open(tmp_path / "m" / "tokenizer.model", "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ckpt.CheckpointError, match="tokenizer.model"):
        load_model_dir(tmp_path / "m")


def test_a_training_checkpoint_is_not_a_model_folder_until_converted(tmp_path, tok):
    model = _model(tok, seed=3)
    ckpt.save_checkpoint(tmp_path / "step", model, None, {"step": 7})
    with pytest.raises(ckpt.CheckpointError, match="not a model folder"):
        read_state(tmp_path / "step")
    tok_file = tmp_path / "tok.model"
    tok_file.write_bytes(tok.model_bytes)
    from_checkpoint(tmp_path / "step", model.cfg, str(tok_file), tmp_path / "m", stage="anneal")
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.state["lineage"]["step"] == 7
    assert torch.equal(loaded.model.embed_tokens.weight, model.embed_tokens.weight)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tok):
    small = MiniCPM(dataclasses.replace(get_config("micro-32"), vocab_size=64))
    with pytest.raises(ValueError, match="4096 ids"):
        save_model_dir(tmp_path / "m", small, tok, stage="x")
    assert not (tmp_path / "m").exists()


def test_extra_files_cannot_shadow_the_checkpoint_files(tmp_path, tok):
    with pytest.raises(ckpt.CheckpointError, match="unreserved"):
        ckpt.save_checkpoint(tmp_path / "c", _model(tok), None, {}, extra_files={"state.json": b""})
    assert not list(tmp_path.iterdir())  # the staging folder is removed
