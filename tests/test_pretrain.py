"""The pretrain loop: data slicing, accumulation, exact resume, anneal branching, a growing batch,
the anneal's data mixture, Ray Train with DDP and FSDP2.

Most tests run trainables.pretrain in one process without Ray; two Ray Train runs (2 CPU workers,
gloo) check DDP, checkpoints in storage and the restart path (an injected failure), and an FSDP2
anneal on a data mixture against the same anneal in one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from trainables.data import DataConfig
from trainables.mixture import MixtureSource
from trainables.pretrain import (
    Runtime,
    anneal_offset,
    checkpoint_folder,
    lr_of_step,
    micro_batches,
    rank_rows,
    schedule_config,
    throughput,
    train_pretrain,
)
from trainables.pretrain_config import BatchChange, PretrainConfig
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


def test_compiled_forward_trains_the_same_curve_and_saves_plain_checkpoints(
    small_store, tmp_path, monkeypatch
):
    """`compile: true` runs the step through torch.compile; Inductor's C++ build takes minutes on
    CPU, so this uses the aot_eager backend: the same Dynamo capture and AOT autograd, the ops
    left unfused. Checkpoints keep the plain module's keys, so runs with and without compile
    resume each other."""
    torch.set_num_threads(1)
    compiled = []
    real_compile = torch.compile

    def compile_(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    eager = run(spec(small_store, steps=8), small_store, tmp_path, "eager")
    from torch._dynamo.utils import counters

    counters.clear()
    fast = run(spec(small_store, steps=8, compile=True), small_store, tmp_path, "compiled")
    assert len(compiled) == 1  # the eager run never compiled
    assert counters["frames"]["ok"] > 0, dict(counters)  # the step ran the captured graph
    for step, loss in eager.losses().items():
        assert fast.losses()[step] == pytest.approx(loss, rel=1e-5), step
    from safetensors import safe_open

    def keys(rec: Recorder) -> list[str]:
        with safe_open(str(rec.checkpoints[4] / "state" / "model.safetensors"), "pt") as f:
            return sorted(f.keys())

    assert keys(fast) == keys(eager) and not any("_orig_mod" in k for k in keys(fast))
    resumed = run(
        spec(small_store, steps=8),
        small_store,
        tmp_path,
        "resumed",
        resume_from=fast.checkpoints[4],
    )
    for step, loss in resumed.losses().items():
        assert loss == pytest.approx(eager.losses()[step], rel=1e-5), step


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
    with pytest.raises(ValueError, match="required for an anneal"):
        run_pretrain(cfg, str(tmp_path), stage="anneal")
    with pytest.raises(ValueError, match="not a multiple of 3 workers"):
        run_pretrain(cfg, str(tmp_path), num_workers=3)
    # 8 then 12 sequences a step: the later batch does not split over 8 micro-batches of 1
    grown = dataclasses.replace(
        cfg, micro_batch_size=1, batch_schedule=(BatchChange(4 * 512, 12 * SEQ_LEN),)
    )
    with pytest.raises(ValueError, match=r"12 sequences \(step 4\) is not a multiple of 8"):
        run_pretrain(
            dataclasses.replace(grown, scaling=ScalingConfig(strategy="fsdp")),
            str(tmp_path),
            num_workers=8,
        )


# --- Ray Train: 2 CPU workers, DDP over gloo ----------------------------------------------------


@pytest.mark.ray
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


# --- a growing batch (facts §3.6): accounting, lr on the token clock, exact resume ----------------


def grown_spec(small_store, **overrides) -> PretrainConfig:
    """8 sequences a step for 4 steps, then 16: 14 steps, 12,288 tokens, decay from step 11."""
    fields = {
        "tokens": 4 * 512 + 10 * 1024,
        "batch_schedule": (BatchChange(at_tokens=4 * 512, global_batch_tokens=16 * SEQ_LEN),),
        "checkpoint_every": 3,
    }
    return spec(small_store, **(fields | overrides))


def test_batch_schedule_accounting_and_validation(small_store):
    from sandbox_service.plan import plan

    cfg = grown_spec(small_store)
    assert [cfg.batch_tokens_at(s) for s in (0, 3, 4, 13)] == [512, 512, 1024, 1024]
    assert cfg.total_steps == 14 and cfg.tokens_at(cfg.total_steps) == cfg.tokens  # the budget
    assert cfg.decay_start == 14 - round(0.25 * 12_288 / 1024) == 11
    assert [cfg.accumulation_steps(2, s) for s in (0, 4)] == [2, 4]
    assert [cfg.clock(s) for s in (0, 4, 5, 14)] == [0, 4, 6, 24]  # ticks of gcd 512 tokens
    sched = schedule_config(cfg)
    lrs = [lr_of_step(cfg, sched, s) for s in range(14)]
    assert lrs[:2] == [0.0, cfg.lr / 2] and set(lrs[2:11]) == {cfg.lr}  # warmup, then stable
    assert lrs[10:] == sorted(lrs[10:], reverse=True) and lrs[13] < lrs[12] < cfg.lr
    p = plan(cfg, 0.5, 1e15, 1 << 30)
    assert (p["steps"], p["decay_start"]) == (14, 11)
    assert [b["tokens_per_step"] for b in p["batch_schedule"]] == [512, 1024]
    # without a schedule the token clock is the step itself
    plain = spec(small_store, steps=16)
    assert [plain.clock(s) for s in range(17)] == list(range(17))

    bad = {
        "at_tokens=2000: must land on a step boundary": BatchChange(2000, 1024),
        "must exceed 512 .the batch grows.": BatchChange(2048, 256),
        "multiple of seq_len x micro_batch_size x num_workers = 128": BatchChange(2048, 1088),
        "at step 22 .at_tokens 11264., falls after decay_start=20": BatchChange(11_264, 1024),
        "stay below tokens=12288": BatchChange(12_800, 1024),
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message):
            grown_spec(small_store, batch_schedule=(change,))


def test_batch_increase_resumes_exactly_and_sees_the_budget(small_store, tmp_path):
    torch.set_num_threads(1)
    cfg = grown_spec(small_store)  # stable 0..11, checkpoints at 3, 6, 9 and 11
    full = run(cfg, small_store, tmp_path, "full")
    assert sorted(full.checkpoints) == [3, 6, 9, 11]
    by_step = {m["step"]: m for m in full.metrics}
    assert [by_step[s]["global_batch_tokens"] for s in (4, 5)] == [512, 1024]
    assert by_step[11]["tokens"] == 4 * 512 + 7 * 1024

    resumed = run(cfg, small_store, tmp_path, "resumed", resume_from=full.checkpoints[3])
    assert sorted(resumed.losses()) == list(range(4, 12))  # across the change at step 4
    for step, loss in resumed.losses().items():
        assert loss == pytest.approx(full.losses()[step], abs=1e-6), step

    anneal = run(
        cfg, small_store, tmp_path, "anneal", stage="anneal", init_from=full.checkpoints[11]
    )
    assert [m["step"] for m in anneal.metrics] == [12, 13, 14]
    assert anneal.metrics[-1]["tokens"] == cfg.tokens == 12_288
    with pytest.raises(ValueError, match="before the last batch_schedule change"):
        anneal_offset(cfg, 3)


# --- the anneal's data mixture -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> tuple[MixtureSource, ...]:
    """pretrain 0.5, hq 0.3 (Chinese fortunes, or English prose), sft 0.2 (rendered SFT records)."""
    from test_mixture import sft_records

    folder = tmp_path_factory.mktemp("mixture")
    sft = folder / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in sft_records(200)))
    hq = SHARED_DATA / "zh_fortunes.txt"
    if not hq.exists():
        hq = folder / "hq.txt"
        hq.write_text("\n\n".join(f"Paragraph {i} of a plain English text." for i in range(400)))
    return (
        MixtureSource("pretrain", 0.5),
        MixtureSource("hq", 0.3, (str(hq),), max_chars=100_000),
        MixtureSource("sft", 0.2, (str(sft),), format="sft", val_fraction=0.1),
    )


@pytest.fixture(scope="module")
def stable_12(small_store, tmp_path_factory) -> Path:
    """The stable checkpoint at step 12 of spec(steps=16): what the mixture anneals start from."""
    torch.set_num_threads(1)
    cfg = spec(small_store, steps=16, checkpoint_every=100)
    return run(cfg, small_store, tmp_path_factory.mktemp("stable"), "stable").checkpoints[12]


def test_anneal_on_a_mixture_reports_each_source_and_resumes_exactly(
    small_store, mixture, stable_12, tmp_path
):
    torch.set_num_threads(1)
    cfg = spec(small_store, steps=16, checkpoint_every=2, anneal_mixture=mixture)
    anneal = run(cfg, small_store, tmp_path, "anneal", stage="anneal", init_from=stable_12)
    assert [m["step"] for m in anneal.metrics] == [13, 14, 15, 16]
    last = anneal.metrics[-1]
    tokens = {name: last[f"tokens_{name}"] for name in ("pretrain", "hq", "sft")}
    assert sum(tokens.values()) == 4 * cfg.global_batch_tokens
    # quotas of 8 rows: 4, 2.4 and 1.6; each step takes the floor or the ceiling of each
    assert tokens["pretrain"] == 4 * 4 * SEQ_LEN
    assert 4 * 2 * SEQ_LEN <= tokens["hq"] <= 4 * 3 * SEQ_LEN
    for m in anneal.metrics:
        present = [
            m[f"train_loss_{n}"] for n in ("pretrain", "hq", "sft") if f"train_loss_{n}" in m
        ]
        assert min(present) <= m["train_loss"] <= max(present)  # a weighted mean of them
    assert {"val_loss", "val_loss_hq", "val_loss_sft"} <= set(last)

    resumed = run(cfg, small_store, tmp_path, "resumed", resume_from=anneal.checkpoints[14])
    assert [m["step"] for m in resumed.metrics] == [15, 16]
    for again, first in zip(resumed.metrics, anneal.metrics[2:], strict=True):
        for key in ("train_loss", "train_loss_pretrain", "train_loss_hq", "tokens_sft"):
            if key in first:
                assert again[key] == pytest.approx(first[key], abs=1e-6), (first["step"], key)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_fsdp_anneal_on_a_mixture_matches_one_process(
    ray_local, small_store, mixture, stable_12, tmp_path
):
    """One fit: an FSDP2 anneal on 2 workers reading the mixture, against it in one process."""
    from sandbox_service.pretrain import checkpoints, run_pretrain
    from trainables.pretrain_config import ScalingConfig

    torch.set_num_threads(1)
    cfg = spec(
        small_store,
        steps=16,
        checkpoint_every=100,
        anneal_mixture=mixture,
        scaling=ScalingConfig(num_workers=2, strategy="fsdp"),
    )
    single = run(cfg, small_store, tmp_path, "single", stage="anneal", init_from=stable_12)
    runs = str(tmp_path / "runs")
    result = run_pretrain(
        cfg, runs, stage="anneal", init_from=stable_12, report_every=4, wandb_mode="disabled"
    )
    assert result.error is None
    got, want = result.metrics, single.metrics[-1]
    assert got["step"] == 16 and got["completed"]
    window = [single.losses()[s] for s in range(13, 17)]
    assert got["train_loss"] == pytest.approx(sum(window) / 4, rel=1e-4)
    for key in ("tokens_pretrain", "tokens_hq", "tokens_sft"):
        assert got[key] == want[key], key
    for key in ("val_loss", "val_loss_hq", "val_loss_sft"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert [s for s, _ in checkpoints(runs, f"{cfg.name}-anneal-step_12")] == [16]
