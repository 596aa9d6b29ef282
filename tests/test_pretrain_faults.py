"""Pretrain faults: a damaged checkpoint is skipped for the previous one, a killed worker resumes.

- In one process: the newest checkpoint of a run is damaged (a flipped byte, a truncated file, a
  deleted manifest); resuming from it continues from the checkpoint before it, with a warning
  that names the file, and the curve equals the uninterrupted run's from that point.
- On the session's local Ray (slow): the Ray Train worker process is SIGKILLed mid-run; Ray Train
  restarts it from the last checkpoint and the curve equals the uninterrupted run's, with every
  checkpointed step reported once.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from test_pretrain import run, spec

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
