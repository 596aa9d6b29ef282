"""Checkpoints round-trip exactly, resume bit-for-bit, refuse damage, never show a half-write."""

import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainables import checkpoint
from trainables.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from trainables.schedules import ScheduleConfig, lr_at

VOCAB = 13


class TiedLM(nn.Module):
    """Embedding and output head share one weight, as in MiniCPM."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.head(self.drop(torch.tanh(self.mix(self.embed(ids)))))


def make_run(seed: int, dim: int = 8) -> tuple[TiedLM, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = TiedLM(dim)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, total: int) -> list[float]:
    """Batches and dropout masks come from the global torch RNG, so resuming needs its state."""
    cfg = ScheduleConfig(warmup_steps=2, decay_steps=3, decay_shape="linear")
    losses = []
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, 1e-2, cfg)
        ids = torch.randint(0, VOCAB, (4, 6))
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_restores_tied_weights_optimizer_and_state(tmp_path):
    model, opt = make_run(seed=0)
    train(model, opt, range(3), total=8)
    state = {"step": 3, "tokens_seen": 72, "schedule": {"kind": "wsd"}, "loss": 2.5, "tag": "a"}
    save_checkpoint(tmp_path / "ck", model, opt, state)

    other, other_opt = make_run(seed=1)
    assert load_checkpoint(tmp_path / "ck", other, other_opt) == state
    assert_same_tensors(model.state_dict(), other.state_dict())
    assert other.head.weight is other.embed.weight
    saved, loaded = opt.state_dict(), other_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, slots in saved["state"].items():
        assert_same_tensors(slots, loaded["state"][index])


def test_tied_weight_is_stored_once(tmp_path):
    from safetensors import safe_open

    save_checkpoint(tmp_path / "ck", TiedLM(), None, {"step": 0})
    with safe_open(str(tmp_path / "ck" / checkpoint.MODEL_FILE), framework="pt") as f:
        assert len(f.keys()) == 3  # one of embed/head weight, mix.weight, mix.bias


def test_rng_state_survives_json_and_replays_the_same_numbers():
    random.gauss(0, 1), np.random.randn()  # leave cached Gaussians in both generators
    saved = json.loads(json.dumps(rng_state()))

    def draw():
        return torch.rand(4).tolist(), random.random(), random.gauss(0, 1), np.random.randn(3)

    first = draw()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    set_rng_state(saved)
    second = draw()
    assert first[:3] == second[:3]
    np.testing.assert_array_equal(first[3], second[3])


def test_set_rng_state_names_a_missing_key():
    bad = rng_state()
    del bad["numpy"]
    with pytest.raises(ValueError, match="numpy"):
        set_rng_state(bad)


def test_resumed_training_equals_uninterrupted_bit_for_bit(tmp_path):
    model, opt = make_run(seed=0)
    reference_losses = train(model, opt, range(8), total=8)

    first, first_opt = make_run(seed=0)
    losses = train(first, first_opt, range(4), total=8)
    save_checkpoint(tmp_path / "ck", first, first_opt, {"step": 4, "rng": rng_state()})
    torch.manual_seed(1234)  # whatever ran in between must not matter

    resumed, resumed_opt = make_run(seed=7)
    state = load_checkpoint(tmp_path / "ck", resumed, resumed_opt)
    set_rng_state(state["rng"])
    losses += train(resumed, resumed_opt, range(state["step"], 8), total=8)

    assert losses == reference_losses
    assert_same_tensors(model.state_dict(), resumed.state_dict())


# --- damage is refused with the file named ------------------------------------------------------


FILES = [checkpoint.MODEL_FILE, checkpoint.OPTIMIZER_FILE, checkpoint.STATE_FILE]


@pytest.fixture
def saved(tmp_path):
    model, opt = make_run(seed=0)
    train(model, opt, range(2), total=8)
    return save_checkpoint(tmp_path / "ck", model, opt, {"step": 2})


@pytest.mark.parametrize("name", FILES)
def test_flipped_byte_is_refused(saved, name):
    path = saved / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{name}: sha256 .* corrupt"):
        verify_checkpoint(saved)
    model, opt = make_run(seed=0)
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(saved, model, opt)


@pytest.mark.parametrize("name", FILES)
def test_truncated_file_is_refused(saved, name):
    path = saved / name
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=rf"{name}: \d+ bytes .* truncated"):
        load_checkpoint(saved, *make_run(seed=0))


def test_missing_files_are_named(saved):
    (saved / checkpoint.OPTIMIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: missing"):
        verify_checkpoint(saved)
    (saved / checkpoint.MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json: missing"):
        verify_checkpoint(saved)
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        verify_checkpoint(saved.parent / "elsewhere")


def test_shape_mismatch_names_the_weights_file(saved):
    wider, _ = make_run(seed=0, dim=16)
    with pytest.raises(
        CheckpointError, match=r"(?s)model\.safetensors: does not fit .*size mismatch"
    ):
        load_checkpoint(saved, wider)


def test_optimizer_requested_but_not_saved(tmp_path):
    model = TiedLM()
    save_checkpoint(tmp_path / "ck", model, None, {"step": 0})
    assert load_checkpoint(tmp_path / "ck", TiedLM()) == {"step": 0}
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: missing.*optimizer=None"):
        load_checkpoint(tmp_path / "ck", model, torch.optim.AdamW(model.parameters()))


class _RunsCodeWhenUnpickled:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _RunsCodeWhenUnpickled.ran = True


def test_optimizer_file_cannot_run_code_even_with_a_valid_manifest(saved):
    path = saved / checkpoint.OPTIMIZER_FILE
    torch.save({"state": {}, "param_groups": [], "payload": _RunsCodeWhenUnpickled()}, path)
    manifest_path = saved / checkpoint.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = checkpoint.seal(path)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: does not fit AdamW"):
        load_checkpoint(saved, *make_run(seed=0))
    assert not _RunsCodeWhenUnpickled.ran


# --- atomicity ----------------------------------------------------------------------------------


def checkpoint_step(folder) -> int:
    return load_checkpoint(folder, *make_run(seed=3))["step"]


def test_crash_mid_write_leaves_the_old_checkpoint(saved, monkeypatch):
    def dies_halfway(obj, f):
        f.write(b"partial optimizer bytes")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    model, opt = make_run(seed=0)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(saved, model, opt, {"step": 5})
    assert checkpoint_step(saved) == 2
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


@pytest.mark.parametrize("exchange", ["atomic", "unsupported", "crashes"])
def test_replacing_shows_old_or_new_and_leaves_nothing_behind(saved, monkeypatch, exchange):
    def crash(a, b):
        raise OSError("killed during rename")

    if exchange == "unsupported":
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    if exchange == "crashes":
        monkeypatch.setattr(checkpoint, "_exchange", crash)
        with pytest.raises(OSError, match="killed"):
            save_checkpoint(saved, *make_run(seed=0), {"step": 5})
        assert checkpoint_step(saved) == 2
    else:
        save_checkpoint(saved, *make_run(seed=0), {"step": 5})
        assert checkpoint_step(saved) == 5
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_fallback_restores_the_old_checkpoint_if_the_second_rename_fails(saved, monkeypatch):
    real_replace = checkpoint.os.replace

    def second_rename_fails(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    monkeypatch.setattr(checkpoint.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(saved, *make_run(seed=0), {"step": 5})
    monkeypatch.undo()
    assert checkpoint_step(saved) == 2
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint.*refusing"):
        save_checkpoint(precious, TiedLM(), None, {"step": 0})
    assert (precious / "notes.txt").read_text() == "keep me"


def test_saving_into_an_existing_empty_folder_works(tmp_path):
    (tmp_path / "ck").mkdir()
    save_checkpoint(tmp_path / "ck", TiedLM(), None, {"step": 1})
    verify_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize(
    "state, where",
    [
        ({"loss": torch.tensor(1.0)}, r"state\['loss'\] is a Tensor"),
        ({"n": [np.int64(3)]}, r"state\['n'\]\[0\] is a int64"),
        ({"by_step": {3: 1.0}}, r"state\['by_step'\] has key 3"),
    ],
)
def test_state_that_is_not_json_is_refused_before_writing(tmp_path, state, where):
    with pytest.raises(TypeError, match=where):
        save_checkpoint(tmp_path / "ck", TiedLM(), None, state)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_and_weights_round_trip(tmp_path):
    saved = json.loads(json.dumps(rng_state()))
    first = torch.rand(4, device="cuda")
    set_rng_state(saved)
    assert torch.equal(first, torch.rand(4, device="cuda"))

    model = TiedLM().cuda()
    save_checkpoint(tmp_path / "ck", model, None, {"step": 0})
    other = TiedLM().cuda()
    load_checkpoint(tmp_path / "ck", other, map_location="cuda")
    assert_same_tensors(model.state_dict(), other.state_dict())


# --- choosing the checkpoint to resume from ------------------------------------------------------


def numbered_run(tmp_path, name: str, steps=(2, 4, 6)) -> dict[int, Path]:
    """A run folder of reported checkpoints `<name>_<n>/state`, as Ray Train and Tune lay out."""
    folders = {}
    for i, step in enumerate(steps):
        folder = tmp_path / "run" / f"{name}_{i if name == 'checkpoint' else step:06d}"
        save_checkpoint(folder / "state", TiedLM(), None, {"step": step})
        folders[step] = folder
    return folders


def test_newest_valid_skips_damaged_folders_in_the_order_given(tmp_path):
    ck = numbered_run(tmp_path, "step")
    (ck[6] / "state" / checkpoint.MANIFEST_FILE).unlink()
    good, skipped = checkpoint.newest_valid([ck[6], ck[4], ck[2]])
    assert good == ck[4]
    assert [(f, "manifest.json: missing" in why) for f, why in skipped] == [(ck[6], True)]
    assert checkpoint.newest_valid([ck[2], ck[6]]) == (ck[2], [])  # stops at the first good one
    assert checkpoint.newest_valid([]) == (None, [])


def test_older_checkpoints_are_same_prefix_lower_number_newest_first(tmp_path):
    ck = numbered_run(tmp_path, "step", steps=(2, 4, 6, 10))
    (tmp_path / "run" / "checkpoint_000001").mkdir()  # Tune's naming: another prefix
    (tmp_path / "run" / "step_000003.tmp").mkdir()
    assert checkpoint.older_checkpoints(ck[6]) == [ck[4], ck[2]]  # never step 10
    assert checkpoint.older_checkpoints(ck[2]) == []
    assert checkpoint.older_checkpoints(tmp_path / "run" / "final") == []
    assert checkpoint.older_names("checkpoint_000010", ["checkpoint_000002", "step_1"]) == [
        "checkpoint_000002"
    ]


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-manifest"])
def test_resume_point_falls_back_and_warns_naming_the_file(tmp_path, caplog, damage):
    ck = numbered_run(tmp_path, "step")
    state = ck[6] / "state"
    target = {"flip": checkpoint.MODEL_FILE, "truncate": checkpoint.STATE_FILE}
    if damage == "no-manifest":
        (state / checkpoint.MANIFEST_FILE).unlink()
    else:
        path = state / target[damage]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data[:-3] if damage == "truncate" else data))
    with caplog.at_level("WARNING", logger="trainables.checkpoint"):
        assert checkpoint.resume_point(ck[6]) == ck[4]
    (record,) = caplog.records
    named = state / target.get(damage, checkpoint.MANIFEST_FILE)
    assert str(named) in record.getMessage() and str(ck[4]) in record.getMessage()
    assert checkpoint.resume_point(ck[4]) == ck[4]


def test_resume_point_refuses_when_every_checkpoint_is_damaged(tmp_path):
    ck = numbered_run(tmp_path, "step", steps=(2, 4))
    for folder in ck.values():
        (folder / "state" / checkpoint.MODEL_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no valid checkpoint at or before .*step_000004"):
        checkpoint.resume_point(ck[4])


def test_local_copy_of_a_ray_checkpoint_falls_back_to_the_older_one_in_storage(tmp_path, caplog):
    from ray.train import Checkpoint

    ck = numbered_run(tmp_path, "checkpoint")  # Tune keeps checkpoint_000000, 000001, 000002
    prefix = f"copy-{tmp_path.name}-"
    assert checkpoint.local_copy(None) is None
    (ck[6] / "state" / checkpoint.OPTIMIZER_FILE).write_bytes(b"not listed")  # harmless extra
    good = checkpoint.local_copy(Checkpoint.from_directory(ck[6]), prefix)
    assert checkpoint.load_checkpoint(good / "state", TiedLM())["step"] == 6
    shutil.rmtree(good)

    bad = ck[6] / "state" / checkpoint.MODEL_FILE
    bad.write_bytes(bad.read_bytes()[:-1])
    with caplog.at_level("WARNING", logger="trainables.checkpoint"):
        good = checkpoint.local_copy(Checkpoint.from_directory(ck[6]), prefix)
    assert checkpoint.load_checkpoint(good / "state", TiedLM())["step"] == 4
    (record,) = caplog.records
    assert f"{bad}: " in record.getMessage()  # the storage path, not the temporary copy's
    shutil.rmtree(good)
    for folder in ck.values():
        (folder / "state" / checkpoint.MANIFEST_FILE).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        checkpoint.local_copy(Checkpoint.from_directory(ck[6]), prefix)
    leftovers = list(Path(tempfile.gettempdir()).glob(f"{prefix}*"))
    assert leftovers == [], "damaged copies are removed"


class FakeTune:
    """What tune_trial asks of Ray Tune, without Ray: the checkpoint to resume from, the trial's
    names, and the reports, whose checkpoints are kept as Tune keeps them (checkpoint_<n>)."""

    def __init__(self, trial_dir: Path, resume: Path | None):
        self.trial_dir, self.resume, self.metrics = trial_dir, resume, []

    def get_checkpoint(self):
        from ray.train import Checkpoint

        return Checkpoint.from_directory(self.resume) if self.resume else None

    def get_context(self):
        class Context:
            def get_trial_name(self):
                return "trial_0"

            def get_trial_id(self):
                return "trial_0"

        return Context()

    def report(self, metrics: dict, checkpoint=None) -> None:
        if checkpoint is not None:
            n = sum(1 for m in self.metrics if m["checkpointed"])
            shutil.copytree(checkpoint.path, self.trial_dir / f"checkpoint_{n:06d}")
        self.metrics.append(metrics | {"checkpointed": checkpoint is not None})

    def curve(self) -> dict[int, tuple[float, float]]:
        return {m["step"]: (m["train_loss"], m["val_loss"]) for m in self.metrics}


def test_tune_trial_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(
    small_store, tmp_path, monkeypatch, caplog
):
    """A trial restarted on a damaged checkpoint continues from the one before it, and its
    curve from there equals the uninterrupted trial's."""
    from ray import tune

    from trainables.trial import tune_trial

    config = {
        "model": {"preset": "micro-32"},
        "data": {"vocab_size": small_store.meta["vocab_size"]},
        "train": {
            "tokens": 16 * 4 * 32,
            "batch_size": 4,
            "seq_len": 32,
            "eval_every": 4,
            "eval_tokens": 256,
            "precision": "fp32",
            "threads": 1,
        },
        "runtime": {"token_store": small_store.root, "wandb_mode": "disabled"},
    }

    def trial(name: str, resume: Path | None) -> FakeTune:
        (tmp_path / name).mkdir()
        fake = FakeTune(tmp_path / name, resume)
        for attr in ("get_checkpoint", "get_context", "report"):
            monkeypatch.setattr(tune, attr, getattr(fake, attr))
        tune_trial(config)
        return fake

    full = trial("full", None)
    assert sorted(full.curve()) == [4, 8, 12, 16]
    newest = tmp_path / "full" / "checkpoint_000002"  # step 12; checkpoint_000001 is step 8
    bad = newest / "state" / checkpoint.OPTIMIZER_FILE
    bad.write_bytes(bad.read_bytes()[:-5])
    with caplog.at_level("WARNING", logger="trainables.checkpoint"):
        resumed = trial("resumed", newest)
    assert str(bad) in caplog.text
    assert sorted(resumed.curve()) == [12, 16]  # from step 8: no step lost or repeated
    for step, (train_loss, val_loss) in resumed.curve().items():
        assert train_loss == pytest.approx(full.curve()[step][0], abs=1e-6), step
        assert val_loss == pytest.approx(full.curve()[step][1], abs=1e-6), step

    for folder in (tmp_path / "full").glob("checkpoint_*"):
        (folder / "state" / checkpoint.MANIFEST_FILE).unlink()
    with caplog.at_level("WARNING", logger="trainables.trial"):
        again = trial("from-scratch", newest)
    assert "starting the trial over from step 0" in caplog.text
    assert again.curve() == full.curve()
