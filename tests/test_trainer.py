"""The training loop: it learns, resumes onto the same curve, and ends divergence cleanly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from trainables.schedules import ScheduleConfig
from trainables.shapes import get_config
from trainables.trainer import TrainConfig, train

MODEL = get_config("micro-32", vocab_size=512)


def config(**kw) -> TrainConfig:
    base = dict(tokens=40 * 8 * 32, batch_size=8, seq_len=32, lr=0.01, eval_every=10,
                eval_tokens=2048, precision="fp32", threads=1,
                schedule=ScheduleConfig(kind="wsd", warmup_steps=4, decay_fraction=0.2))
    return TrainConfig(**(base | kw))


class Recorder:
    """Collects reports; keeps a copy of every checkpoint (the trainer deletes its own)."""

    def __init__(self, keep: Path | None = None, stop_after: int | None = None):
        self.metrics, self.keep, self.stop_after = [], keep, stop_after

    def __call__(self, metrics, checkpoint_dir):
        self.metrics.append(metrics)
        if checkpoint_dir is not None and self.keep is not None:
            shutil.copytree(checkpoint_dir, self.keep / f"step{metrics['step']}")
        if self.stop_after is not None and len(self.metrics) >= self.stop_after:
            raise KeyboardInterrupt("simulated kill")


def test_loss_falls_and_metrics_are_complete(small_store):
    rec = Recorder()
    last = train(MODEL, config(), small_store, report=rec)
    assert [m["step"] for m in rec.metrics] == [10, 20, 30, 40]
    first, final = rec.metrics[0], rec.metrics[-1]
    assert final["val_loss"] < first["val_loss"] < math.log(512) + 0.5
    assert final["completed"] and not final["diverged"] and final["progress"] == 1.0
    assert final["tokens"] == 40 * 8 * 32
    assert final["val_bpb"] == pytest.approx(
        final["val_loss"] / math.log(2) / small_store.val_bytes_per_token, rel=0.01)
    assert last == final


def test_resume_continues_the_same_curve(small_store, tmp_path):
    full = Recorder()
    train(MODEL, config(), small_store, report=full)
    killed = Recorder(keep=tmp_path, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        train(MODEL, config(), small_store, report=killed)
    resumed = Recorder()
    train(MODEL, config(), small_store, report=resumed, resume_from=tmp_path / "step20" / "state")
    assert [m["step"] for m in resumed.metrics] == [30, 40]
    for a, b in zip(full.metrics[2:], resumed.metrics, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-6)


def test_divergence_ends_the_trial_cleanly(small_store):
    rec = Recorder()
    last = train(MODEL, config(lr=50.0), small_store, report=rec)
    assert last["diverged"] and last["completed"]
    assert last["val_loss"] == pytest.approx(math.log(512))
    assert last["step"] < 40


def test_token_budget_by_params():
    cfg = config(tokens=None, tokens_per_param=10)
    from trainables.shapes import non_embedding_params

    assert cfg.total_tokens(MODEL) == 10 * non_embedding_params(MODEL)
    with pytest.raises(ValueError, match="exactly one of tokens or tokens_per_param"):
        config(tokens_per_param=10)
