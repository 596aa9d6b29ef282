"""The pretrain loop: data slicing, accumulation, exact resume, anneal branching, Ray Train DDP.

Most tests run trainables.pretrain in one process without Ray; one Ray Train run (2 CPU workers,
gloo, with an injected failure) checks DDP, checkpoints in storage and the restart path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from trainables.data import DataConfig
from trainables.pretrain import (
    Runtime,
    anneal_offset,
    checkpoint_folder,
    micro_batches,
    rank_rows,
    schedule_config,
    throughput,
    train_pretrain,
)
from trainables.pretrain_config import PretrainConfig
from trainables.schedules import lr_at
from trainables.tokens import sample_batch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SEQ_LEN = 64
GLOBAL_SEQS = 8


def spec(small_store, steps: int = 12, **overrides) -> PretrainConfig:
    """micro-32 on the session's store: 8 sequences of 64 tokens per step, 2 per micro-batch."""
    meta = small_store.meta
    # the conftest store's own config, so the Ray launcher's prepare() finds it in the cache
    data = DataConfig(sources=(_source(),), vocab_size=meta["vocab_size"], max_chars=300_000)
    fields = {
        "name": "micro-pretrain",
        "model": {"preset": "micro-32"},
        "data": data,
        "lr": 0.02,
        "global_batch_tokens": GLOBAL_SEQS * SEQ_LEN,
        "seq_len": SEQ_LEN,
        "tokens": steps * GLOBAL_SEQS * SEQ_LEN,
        "micro_batch_size": 2,
        "warmup_steps": 2,
        "decay_fraction": 0.25,
        "checkpoint_every": 4,
        "eval_every": 1000,
        "eval_tokens": 1024,
    }
    return PretrainConfig(**(fields | overrides))


def _source() -> str:
    from trainables.corpus import EMBEDDED

    corpus = SHARED_DATA / "tinyshakespeare.txt"
    return str(corpus) if corpus.exists() else EMBEDDED


class Recorder:
    """A report callback that keeps every metrics dict and a copy of every checkpoint."""

    def __init__(self, root: Path):
        self.root, self.metrics, self.checkpoints = root, [], {}

    def __call__(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.metrics.append(metrics)
        if checkpoint_dir is not None:
            keep = self.root / f"step_{metrics['step']}"
            shutil.copytree(checkpoint_dir, keep)
            self.checkpoints[metrics["step"]] = keep

    def losses(self) -> dict[int, float]:
        return {m["step"]: m["train_loss"] for m in self.metrics}


def run(cfg, store, tmp_path: Path, name: str, **kwargs) -> Recorder:
    rec = Recorder(tmp_path / name)
    resume = kwargs.pop("resume_from", None)
    train_pretrain(cfg, store, Runtime(report=rec, resume_from=resume), report_every=1, **kwargs)
    return rec


# --- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_concatenate_to_the_global_batch(small_store, world_size):
    cfg = spec(small_store)
    x, y = sample_batch(small_store.train, cfg.sequences_per_step, SEQ_LEN, cfg.seed, 3)
    parts = [
        mb
        for r in range(world_size)
        for mb in micro_batches((x, y), cfg.micro_batch_size, world_size, r)
    ]
    assert len(parts) == world_size * cfg.accumulation_steps(world_size)
    assert all(len(px) == cfg.micro_batch_size for px, _ in parts)
    assert torch.equal(torch.cat([px for px, _ in parts]), x)
    assert torch.equal(torch.cat([py for _, py in parts]), y)


def test_uneven_split_is_refused():
    assert rank_rows(8, 2, 1) == slice(4, 8)
    with pytest.raises(ValueError, match="evenly over 3 workers"):
        rank_rows(8, 3, 0)


def test_throughput_and_mfu():
    out = throughput(tokens=1000, seconds=2.0, flops_per_tok=6e6, world_size=2, peak=1e9)
    assert out == {"tokens_per_s": 500.0, "flops_per_s": 3e9, "mfu": 1.5}
    assert "mfu" not in throughput(1000, 2.0, 6e6, 2, None)


def test_anneal_offset_shifts_the_decay_to_the_stable_step(small_store):
    cfg = spec(small_store, steps=20)  # decay_start 15, decay 5 steps
    assert (cfg.decay_start, anneal_offset(cfg, 15), anneal_offset(cfg, 10)) == (15, 0, 5)
    with pytest.raises(ValueError, match="stable step in 2..15"):
        anneal_offset(cfg, 16)
    sched = schedule_config(cfg)
    assert lr_at(14, 20, cfg.lr, sched) == cfg.lr
    assert lr_at(19, 20, cfg.lr, sched) < cfg.lr


# --- the loop in one process ---------------------------------------------------------------------


def test_loss_falls_and_resume_continues_the_same_curve(small_store, tmp_path):
    torch.set_num_threads(1)
    cfg = spec(small_store, steps=16)  # pretrain = steps 0..12, checkpoints at 4, 8, 12
    full = run(cfg, small_store, tmp_path, "full")
    losses = full.losses()
    assert sorted(losses) == list(range(1, 13))
    assert sorted(full.checkpoints) == [4, 8, 12]
    assert losses[12] < losses[1] - 1.0, losses  # micro-32 learns in 12 steps
    assert full.metrics[-1]["completed"] and full.metrics[-1]["val_loss"] < losses[1]

    resumed = run(cfg, small_store, tmp_path, "resumed", resume_from=full.checkpoints[4])
    again = resumed.losses()
    assert sorted(again) == list(range(5, 13))  # no step lost or repeated
    for step, loss in again.items():
        assert loss == pytest.approx(losses[step], abs=1e-6), step


def test_anneal_branches_from_a_stable_checkpoint(small_store, tmp_path):
    torch.set_num_threads(1)
    cfg = spec(small_store, steps=16, checkpoint_every=100)
    stable = run(cfg, small_store, tmp_path, "stable")
    assert sorted(stable.checkpoints) == [cfg.decay_start] == [12]
    assert {m["lr"] for m in stable.metrics[2:]} == {cfg.lr}  # stable after the warmup

    init = stable.checkpoints[12]
    anneal = run(cfg, small_store, tmp_path, "anneal", stage="anneal", init_from=init)
    steps = [m["step"] for m in anneal.metrics]
    assert steps == [13, 14, 15, 16]
    lrs = [m["lr"] for m in anneal.metrics]
    assert lrs == [lr_at(s - 1, 16, cfg.lr, schedule_config(cfg)) for s in steps]
    assert lrs[0] == cfg.lr and lrs == sorted(lrs, reverse=True)
    assert anneal.metrics[-1]["train_loss"] < stable.metrics[-1]["train_loss"]
    assert checkpoint_folder(init) == init / "state"

    with pytest.raises(ValueError, match="needs init_from"):
        train_pretrain(cfg, small_store, stage="anneal")


# --- the launcher's checks, before any Ray object is built ---------------------------------------


def test_spec_file_run_names_and_refusals(small_store, tmp_path):
    import dataclasses

    import yaml

    from sandbox_service.pretrain import load_spec, run_name, run_pretrain
    from trainables.dictconfig import to_dict
    from trainables.pretrain_config import ScalingConfig

    cfg = spec(small_store)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_spec(path) == cfg
    assert run_name(cfg, "pretrain", None, None) == "micro-pretrain"
    stable = tmp_path / "runs" / "micro-pretrain" / "step_00000009"
    assert run_name(cfg, "anneal", stable, None) == "micro-pretrain-anneal-step_00000009"
    assert run_name(cfg, "anneal", stable, "mix2") == "micro-pretrain-anneal-mix2"
    fsdp = dataclasses.replace(cfg, scaling=ScalingConfig(strategy="fsdp"))
    with pytest.raises(ValueError, match="strategy='fsdp'"):
        run_pretrain(fsdp, str(tmp_path))
    with pytest.raises(ValueError, match="required for an anneal"):
        run_pretrain(cfg, str(tmp_path), stage="anneal")
    with pytest.raises(ValueError, match="not a multiple of 3 workers"):
        run_pretrain(cfg, str(tmp_path), num_workers=3)


# --- Ray Train: 2 CPU workers, DDP over gloo ----------------------------------------------------


def test_ray_train_two_workers_match_one_process_through_a_failure(
    ray_local, small_store, tmp_path
):
    """One fit: DDP on 2 workers; a failure at step 8 restarts them from the step-4 checkpoint.

    Reports only at the checkpoints (each ray.train.report is a round trip to the controller).
    """
    from sandbox_service.pretrain import checkpoints, run_pretrain

    torch.set_num_threads(1)
    cfg = spec(small_store, steps=10)  # pretrain = steps 0..8, checkpoints at 4 and 8
    single = run(cfg, small_store, tmp_path, "single")
    marker = tmp_path / "failed-once"
    result = run_pretrain(
        cfg,
        str(tmp_path / "runs"),
        num_workers=2,
        report_every=4,
        wandb_mode="disabled",
        fail_once={"step": 8, "marker": str(marker)},
    )
    assert result.error is None
    assert marker.read_text() == "8"  # the failure happened, and the run still finished
    assert result.metrics["step"] == 8 and result.metrics["completed"]
    # steps 5..8 again after the restart: same data and schedule, only the order of float
    # reductions differs from one process
    window = [single.losses()[s] for s in range(5, 9)]
    assert result.metrics["train_loss"] == pytest.approx(sum(window) / 4, rel=1e-4)
    assert [s for s, _ in checkpoints(str(tmp_path / "runs"), cfg.name)] == [4, 8]
