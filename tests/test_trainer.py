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
    base = dict(
        tokens=40 * 8 * 32,
        batch_size=8,
        seq_len=32,
        lr=0.01,
        eval_every=10,
        eval_tokens=2048,
        precision="fp32",
        threads=1,
        schedule=ScheduleConfig(kind="wsd", warmup_steps=4, decay_fraction=0.2),
    )
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
        final["val_loss"] / math.log(2) / small_store.val_bytes_per_token, rel=0.01
    )
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


def test_branch_from_a_stable_checkpoint_equals_training_from_scratch(small_store, tmp_path):
    """WSD's promise (MiniCPM §3.4): decay from the stable run's checkpoint at step S gives the
    same model as a WSD run that decays at S from scratch, so the stable part is never rerun."""
    warm = {"warmup_steps": 4}
    stable = config(
        tokens=30 * 8 * 32, save_steps=(20,), schedule=ScheduleConfig(kind="constant", **warm)
    )
    train(MODEL, stable, small_store, save_dir=tmp_path)
    decay = ScheduleConfig(kind="wsd", decay_steps=6, decay_shape="linear", **warm)
    scratch = Recorder()
    train(MODEL, config(tokens=26 * 8 * 32, schedule=decay), small_store, report=scratch)
    branch = Recorder()
    last = train(
        MODEL,
        config(tokens=26 * 8 * 32, schedule=decay, init_from=str(tmp_path / "step_00000020")),
        small_store,
        report=branch,
    )
    assert last["step"] == 26 and last["own_tokens"] == 6 * 8 * 32
    assert last["tokens"] == 26 * 8 * 32
    assert last["val_loss"] == pytest.approx(scratch.metrics[-1]["val_loss"], abs=1e-5)
    with pytest.raises(ValueError, match="not after the start step 20"):
        train(
            MODEL,
            config(tokens=20 * 8 * 32, init_from=str(tmp_path / "step_00000020")),
            small_store,
        )


def test_resume_from_the_final_checkpoint_reports_again(small_store, tmp_path):
    """A run killed after its last checkpoint but before its result was recorded must end
    cleanly on resume (report the final metrics), not fail."""
    full = Recorder(keep=tmp_path)
    train(MODEL, config(), small_store, report=full)
    again = Recorder()
    last = train(
        MODEL, config(), small_store, report=again, resume_from=tmp_path / "step40" / "state"
    )
    assert [m["step"] for m in again.metrics] == [40]
    assert last["val_loss"] == pytest.approx(full.metrics[-1]["val_loss"], abs=1e-6)


def test_eval_every_tokens_aligns_runs_of_different_batch_sizes(small_store):
    points = {}
    for batch in (4, 8):
        rec = Recorder()
        train(
            MODEL,
            config(tokens=8192, batch_size=batch, eval_every_tokens=2048),
            small_store,
            report=rec,
        )
        points[batch] = [m["tokens"] for m in rec.metrics]
    assert points[4] == points[8] == [2048, 4096, 6144, 8192]


def test_checkpoints_wait_for_checkpoint_min_s_of_the_run(small_store):
    """Due evaluations checkpoint only once checkpoint_min_s seconds have passed since the last
    checkpoint (or the start): a run shorter than that writes none, and reports the same curve."""
    runs = {}
    for seconds in (0.0, 1e6):
        reports: list[tuple[dict, bool]] = []

        def report(metrics, checkpoint_dir, reports=reports):
            reports.append((metrics, checkpoint_dir is not None))

        train(MODEL, config(checkpoint_min_s=seconds), small_store, report=report)
        runs[seconds] = reports
    assert [saved for _, saved in runs[0.0]] == [True, True, True, True]
    assert [saved for _, saved in runs[1e6]] == [False, False, False, False]
    losses = {s: [m["val_loss"] for m, _ in r] for s, r in runs.items()}
    assert losses[0.0] == losses[1e6]
    for bad in (-1, True, float("nan")):
        with pytest.raises(ValueError, match="checkpoint_min_s="):
            config(checkpoint_min_s=bad)
