"""Pretrain faults: a damaged checkpoint is skipped for the previous one, a killed worker resumes.

- In one process: the newest checkpoint of a run is damaged (a flipped byte, a truncated file, a
  deleted manifest); resuming from it continues from the checkpoint before it, with a warning
  that names the file, and the curve equals the uninterrupted run's from that point.
- On the session's local Ray (slow): the Ray Train worker process is SIGKILLed mid-run; Ray Train
  restarts it from the last checkpoint and the curve equals the uninterrupted run's, with every
  checkpointed step reported once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_pretrain import Recorder, run, spec

from trainables import checkpoint as ckpt
from trainables.checkpoint import CheckpointError
from trainables.pretrain import Runtime, train_pretrain
from trainables.trainer import checkpoint_name


def flip_a_byte(folder: Path) -> str:
    path = folder / ckpt.MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return rf"{ckpt.MODEL_FILE}: sha256 .* corrupt"


def truncate(folder: Path) -> str:
    path = folder / ckpt.OPTIMIZER_FILE
    path.write_bytes(path.read_bytes()[:-100])
    return rf"{ckpt.OPTIMIZER_FILE}: \d+ bytes .* truncated"


def delete_manifest(folder: Path) -> str:
    (folder / ckpt.MANIFEST_FILE).unlink()
    return rf"{ckpt.MANIFEST_FILE}: missing"


DAMAGE = {"flipped-byte": flip_a_byte, "truncated": truncate, "no-manifest": delete_manifest}


def save_run(recorder, run_dir: Path) -> None:
    """Lay the recorded checkpoints out as Ray Train does: `<run>/step_<8 digits>/state`."""
    run_dir.mkdir()
    for step, folder in recorder.checkpoints.items():
        shutil.copytree(folder, run_dir / checkpoint_name(step))


@pytest.fixture(scope="module")
def full_run(small_store, tmp_path_factory):
    """16 steps uninterrupted: pretrain = steps 0..12, checkpoints at 4, 8 and 12."""
    torch.set_num_threads(1)
    cfg = spec(small_store, steps=16)
    return cfg, run(cfg, small_store, tmp_path_factory.mktemp("full"), "full")


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_resume_skips_a_damaged_checkpoint_for_the_one_before(
    small_store, full_run, tmp_path, caplog, damage
):
    cfg, full = full_run
    losses = full.losses()
    run_dir = tmp_path / "run"
    save_run(full, run_dir)
    # Ray points at step 8; step 12 is valid but newer, so it must not be used either.
    latest = run_dir / checkpoint_name(8)
    reason = damage(latest / "state")

    with caplog.at_level(logging.WARNING, logger="trainables.checkpoint"):
        resumed = run(cfg, small_store, tmp_path, "resumed", resume_from=latest)
    again = resumed.losses()
    assert sorted(again) == list(range(5, 13)), "resumed from step 4, no step lost or repeated"
    for step, loss in again.items():
        assert loss == pytest.approx(losses[step], abs=1e-6), step
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(latest) in warning and "resuming from" in warning
    assert str(run_dir / checkpoint_name(4)) in warning.rsplit("resuming from", 1)[1]
    with pytest.raises(CheckpointError, match=reason):
        ckpt.verify_checkpoint(latest / "state")


def test_resume_refuses_when_no_checkpoint_of_the_run_is_valid(small_store, full_run, tmp_path):
    cfg, full = full_run
    run_dir = tmp_path / "run"
    save_run(full, run_dir)
    flip_a_byte(run_dir / checkpoint_name(4) / "state")
    delete_manifest(run_dir / checkpoint_name(8) / "state")
    with pytest.raises(CheckpointError, match=r"no valid checkpoint .*manifest.* sha256"):
        train_pretrain(cfg, small_store, Runtime(resume_from=run_dir / checkpoint_name(8)))


def test_anneal_from_a_damaged_checkpoint_is_refused_before_any_worker(
    small_store, full_run, tmp_path
):
    from sandbox_service.pretrain import run_pretrain

    cfg, full = full_run
    stable = tmp_path / checkpoint_name(12)
    shutil.copytree(full.checkpoints[12], stable)
    reason = truncate(stable / "state")
    runs = tmp_path / "runs"
    with pytest.raises(CheckpointError, match=reason):  # before Ray or any worker starts
        run_pretrain(cfg, str(runs), stage="anneal", init_from=stable, wandb_mode="disabled")
    assert not runs.exists()
    with pytest.raises(CheckpointError, match=reason):  # and no older sibling stands in for it
        train_pretrain(cfg, small_store, stage="anneal", init_from=stable)


# --- Ray Train: SIGKILL of the worker process ----------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (Linux): the processes this test started."""
    parents = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [child for child, parent in parents.items() if parent == pid]
        found += kids
        todo += kids
    return found


def train_workers() -> list[int]:
    """Ray Train worker processes of the session's local Ray (started below this process)."""
    pids = []
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(pid)
    return pids


def kill_after_checkpoint(
    run_dir: Path, step: int, events: dict, n_workers: int = 1, timeout_s: float = 300
) -> None:
    """Once checkpoint `step` is whole in storage, SIGKILL one of the `n_workers` workers (the
    last started); then time the recovery."""
    deadline = time.time() + timeout_s
    manifest = run_dir / checkpoint_name(step) / "state" / ckpt.MANIFEST_FILE
    while time.time() < deadline and not (manifest.exists() and train_workers()):
        time.sleep(0.05)
    workers = train_workers()
    if len(workers) != n_workers:
        events["error"] = f"expected {n_workers} Ray Train workers, found {workers}"
        return
    victim = max(workers)
    events["checkpoints_before"] = sorted(p.name for p in run_dir.glob("step_*"))
    os.kill(victim, signal.SIGKILL)
    events |= {"victim": victim, "killed_at": time.time()}
    following = run_dir / checkpoint_name(step + 10) / "state" / ckpt.MANIFEST_FILE
    while time.time() < deadline and not following.exists():
        time.sleep(0.05)
    events["next_checkpoint_s"] = time.time() - events["killed_at"]
    events["workers_after"] = train_workers()


@pytest.fixture(scope="module")
def killed_run(ray_local, small_store, tmp_path_factory):
    """A 60-step pretrain on Ray Train whose worker process is SIGKILLed after checkpoint 20,
    and the same run uninterrupted in one process: (cfg, storage, result, events, losses)."""
    from sandbox_service.pretrain import run_pretrain

    if sys.platform != "linux":
        pytest.skip("finds the worker process through /proc")
    torch.set_num_threads(1)  # as in the Ray worker (one CPU: OMP_NUM_THREADS=1)
    cfg = spec(small_store, steps=80, checkpoint_every=10)  # pretrain = steps 0..60
    tmp_path = tmp_path_factory.mktemp("killed")
    reference = Recorder(tmp_path / "reference")
    train_pretrain(cfg, small_store, Runtime(report=reference), report_every=10)

    runs = tmp_path / "runs"
    events: dict = {}
    killer = threading.Thread(
        target=kill_after_checkpoint, args=(runs / cfg.name, 20, events), daemon=True
    )
    killer.start()
    started = time.time()
    result = run_pretrain(cfg, str(runs), num_workers=1, report_every=10, wandb_mode="disabled")
    events["fit_s"] = time.time() - started
    killer.join(timeout=30)
    return cfg, runs, result, events, reference.losses()


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_process_resumes_from_the_last_checkpoint(killed_run, capsys):
    """SIGKILL of the Ray Train worker mid-run: FailureConfig restarts it from the last
    checkpoint, and the reported curve equals an uninterrupted run's, each step once."""
    cfg, runs, result, events, expected = killed_run
    assert sorted(expected) == [10, 20, 30, 40, 50, 60]
    assert "victim" in events, events.get("error", "the worker was never killed")
    assert result.error is None and result.metrics["completed"]
    assert events["victim"] not in events["workers_after"], "the killed worker came back?"
    frame = result.metrics_dataframe
    steps = list(frame["step"])
    # Each checkpointed step reported once: a restart from scratch or from an older checkpoint
    # would report step 10 or 20 again; a lost step would leave a gap.
    assert steps == [10, 20, 30, 40, 50, 60], steps
    for step, loss in zip(steps, frame["train_loss"], strict=True):
        assert loss == pytest.approx(expected[step], rel=1e-5), step
    with capsys.disabled():
        print(
            f"\nworker SIGKILL after checkpoint 20 (storage then held "
            f"{events['checkpoints_before']}): resumed, each of steps 10..60 reported once, "
            f"curve equal to the uninterrupted run; next checkpoint (step 30) "
            f"{events['next_checkpoint_s']:.1f} s after the kill; fit {events['fit_s']:.1f} s"
        )


@pytest.mark.ray
@pytest.mark.slow
def test_killing_one_of_two_ddp_workers_restarts_the_group_from_the_last_checkpoint(
    killed_run, tmp_path, capsys
):
    """SIGKILL of one of two DDP workers (its peer is then stuck in a collective): Ray Train
    tears the group down and restarts both from the last checkpoint, each step reported once.
    The curve is the one-process run's up to the order of float reductions, a difference that
    grows over the steps (8e-4 relative by step 50 here; 1e-4 over the first 40)."""
    from sandbox_service.pretrain import run_pretrain

    cfg, _, _, _, expected = killed_run
    runs, events = tmp_path / "runs", {}
    killer = threading.Thread(
        target=kill_after_checkpoint, args=(runs / cfg.name, 20, events, 2), daemon=True
    )
    killer.start()
    started = time.time()
    result = run_pretrain(cfg, str(runs), num_workers=2, report_every=10, wandb_mode="disabled")
    fit_s = time.time() - started
    killer.join(timeout=30)
    assert "victim" in events, events.get("error", "no worker was killed")
    assert result.error is None and result.metrics["completed"]
    assert events["victim"] not in events["workers_after"]
    frame = result.metrics_dataframe
    steps = list(frame["step"])
    assert steps == [10, 20, 30, 40, 50, 60], steps
    rel = [abs(loss / expected[s] - 1) for s, loss in zip(steps, frame["train_loss"], strict=True)]
    assert max(rel) < 2e-3, dict(zip(steps, rel, strict=True))
    with capsys.disabled():
        print(
            f"\none of two DDP workers SIGKILLed after checkpoint 20: both restarted from it, each "
            f"of steps 10..60 reported once, curve within {max(rel):.1e} of one process; next "
            "checkpoint "
            f"{events['next_checkpoint_s']:.1f} s after the kill; fit {fit_s:.1f} s"
        )


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_on_a_damaged_last_checkpoint_resumes_from_the_one_before(killed_run, capsys):
    """Ray Train hands the rerun its last checkpoint (step 60), damaged here: the worker resumes
    from step 50 instead, and step 60 comes out as in the uninterrupted run."""
    from sandbox_service.pretrain import run_pretrain

    cfg, runs, _, _, expected = killed_run
    last = runs / cfg.name / checkpoint_name(60) / "state"
    flip_a_byte(last)
    started = time.time()
    result = run_pretrain(cfg, str(runs), num_workers=1, report_every=10, wandb_mode="disabled")
    rerun_s = time.time() - started
    assert result.error is None and result.metrics["step"] == 60
    assert result.metrics["train_loss"] == pytest.approx(expected[60], rel=1e-5)
    ckpt.verify_checkpoint(last)  # step 60 written again, whole
    with capsys.disabled():
        print(f"\nrerun on a damaged step-60 checkpoint: resumed from step 50 in {rerun_s:.1f} s")
