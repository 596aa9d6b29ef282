"""Checkpoints round-trip exactly, resume bit-for-bit, refuse damage, never show a half-write."""

import json
import random

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
    manifest["files"][path.name] = checkpoint._seal(path)
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
