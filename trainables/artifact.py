"""A model folder: the weights, the shape and the tokenizer of one stage's model, sealed together.

Every stage after pretraining (SFT, DPO, GPTQ, evaluation, export, generation) reads and writes
this one layout, so any stage's output is the next stage's input:

    <dir>/model.safetensors   weights (the tied embedding/head stored once)
    <dir>/tokenizer.model     the SentencePiece model whose ids the embedding rows belong to
    <dir>/state.json          {"kind": "minicpm-model", "model_config": {...}, "stage": "sft",
                               "lineage": {...}, "metrics": {...}}
    <dir>/manifest.json       sha256 and size of each file above, written last

It is a `trainables.checkpoint` folder without optimizer state: written atomically, verified
against its manifest before it is read, loaded without running code.

    save_model_dir("runs/x/sft/model", model, tok, stage="sft", lineage={"init": "..."})
    m = load_model_dir("runs/x/sft/model")          # m.model, m.tokenizer, m.config, m.state
    from_checkpoint("runs/p/step_00000360", model_cfg, tokenizer_path, "runs/p/model")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainables import checkpoint as ckpt
from trainables.dictconfig import from_dict, to_dict
from trainables.model import MiniCPM
from trainables.shapes import ModelConfig
from trainables.tokenizer import Tokenizer

KIND = "minicpm-model"
TOKENIZER_FILE = "tokenizer.model"


@dataclass(frozen=True, eq=False)
class LoadedModel:
    model: MiniCPM
    tokenizer: Tokenizer
    config: ModelConfig
    state: dict[str, Any]  # stage, lineage, metrics and whatever the writer added
    path: str


def save_model_dir(
    directory: str | Path,
    model: MiniCPM,
    tokenizer: Tokenizer,
    *,
    stage: str,
    lineage: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Seal `model` and `tokenizer` as a model folder at `directory`; returns the folder.

    Refuses a tokenizer whose vocabulary is larger than the embedding: its ids would not fit.
    """
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's embedding "
            f"has {model.cfg.vocab_size} rows"
        )
    state = {
        **(extra or {}),
        "kind": KIND,
        "model_config": to_dict(model.cfg),
        "stage": stage,
        "lineage": lineage or {},
        "metrics": metrics or {},
        "tokenizer_sha256": tokenizer.sha256,
    }
    return ckpt.save_checkpoint(
        directory, model, None, state, extra_files={TOKENIZER_FILE: tokenizer.model_bytes}
    )


def read_state(directory: str | Path) -> dict[str, Any]:
    """The verified state.json of a model folder; CheckpointError names what is wrong."""
    folder = Path(directory)
    ckpt.verify_checkpoint(folder)
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    if state.get("kind") != KIND or not (folder / TOKENIZER_FILE).is_file():
        raise ckpt.CheckpointError(
            f"{folder}: not a model folder (state.json kind {state.get('kind')!r}, expected "
            f"{KIND!r}, and a {TOKENIZER_FILE}); a training checkpoint becomes one with "
            "trainables.artifact.from_checkpoint"
        )
    return state


def load_model_dir(
    directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Verify and load a model folder: the model in eval mode on `device`, and its tokenizer."""
    folder = Path(directory)
    state = read_state(folder)
    config = from_dict(ModelConfig, state["model_config"], f"{folder / ckpt.STATE_FILE}")
    model = MiniCPM(config)
    ckpt.load_checkpoint(folder, model, None)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = Tokenizer((folder / TOKENIZER_FILE).read_bytes(), str(folder / TOKENIZER_FILE))
    return LoadedModel(model, tokenizer, config, state, str(folder))


def from_checkpoint(
    checkpoint_dir: str | Path,
    model_cfg: ModelConfig,
    tokenizer_path: str,
    directory: str | Path,
    *,
    stage: str,
    lineage: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """A model folder from a training checkpoint (pretrain, anneal or trial) and its tokenizer."""
    model = MiniCPM(model_cfg)
    state = ckpt.load_checkpoint(checkpoint_dir, model, None)
    lineage = {"checkpoint": str(checkpoint_dir), "step": state.get("step"), **(lineage or {})}
    tokenizer = Tokenizer.from_file(tokenizer_path)
    return save_model_dir(
        directory, model, tokenizer, stage=stage, lineage=lineage, metrics=metrics
    )
