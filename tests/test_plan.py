"""`sandbox plan`: parameter counts, memory, FLOPs and GPU-hours of a pretrain spec."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml

from sandbox_service.plan import (
    GIB,
    activation_bytes,
    activation_bytes_per_layer,
    add_plan_parser,
    gpu_hours,
    loss_buffer_bytes,
    plan,
    spec_model,
    state_bytes,
)
from trainables.data import DataConfig
from trainables.dictconfig import to_dict
from trainables.model import MiniCPM
from trainables.pretrain_config import PretrainConfig, ScalingConfig
from trainables.shapes import flops_per_token, get_config

H100 = 989e12


def _paper_spec(**scaling) -> PretrainConfig:
    """MiniCPM-2.4B's production recipe (facts §4): 960 × 4096 tokens a step, ~1.1T tokens."""
    return PretrainConfig(
        name="minicpm-2.4b-paper",
        model={"preset": "minicpm-2.4b"},
        data=DataConfig(vocab_size=122_753),
        lr=0.01,
        global_batch_tokens=960 * 4096,
        seq_len=4096,
        tokens=1_100_000_000_000,
        scaling=ScalingConfig(**({"num_workers": 120, "use_gpu": True} | scaling)),
    )


def _micro_spec(workers: int = 1, strategy: str = "ddp") -> PretrainConfig:
    return PretrainConfig(
        name="tiny",
        model={"preset": "micro-64"},
        data=DataConfig(vocab_size=1024),
        lr=0.01,
        global_batch_tokens=128 * 2 * 4,
        seq_len=128,
        micro_batch_size=2,
        tokens=1_024_000,
        scaling=ScalingConfig(num_workers=workers, strategy=strategy),
    )


def test_24b_parameters_and_flops():
    p = plan(_paper_spec(), 0.4, H100, 80 * GIB)
    assert p["params"]["non_embedding"] == 2_442_057_984  # facts §1, to the parameter
    assert p["params"]["embedding"] == 122_753 * 2304
    fpt = flops_per_token(spec_model(_paper_spec()), 4096)
    assert p["total_flops"] == fpt * 1_100_000_000_000
    assert p["steps"] == round(1.1e12 / 3_932_160) == 279_744
    assert p["accumulation_steps"] == 8  # 960 sequences / 120 workers
    assert p["gpu_hours"] == pytest.approx(2.297e22 / (0.4 * H100) / 3600, rel=1e-3)
    assert p["wall_clock_days"] == pytest.approx(p["gpu_hours"] / 120 / 24)


def test_state_bytes_by_hand_on_micro64():
    # micro-64: d 64, L 4, 2 heads of 32, d_ff 160. Per layer: q,k,v,o 4·64·64 = 16,384;
    # gate/up/down 3·64·160 = 30,720; two norms 128 -> 47,232. Four layers + final norm 64.
    n_body = 4 * 47_232 + 64
    n_total = n_body + 1024 * 64
    p = plan(_micro_spec(), 0.5, 1e15, 1 * GIB)
    assert p["params"]["total"] == n_total == 254_528
    s = p["state_bytes"]["bf16-mixed"]
    assert (s["weights"], s["grads"], s["master"], s["adam"]) == (
        2 * n_total,
        2 * n_total,
        4 * n_total,
        8 * n_total,
    )
    assert s["total"] == 16 * n_total == 4_072_448
    assert p["state_bytes"]["fp32"]["total"] == (4 + 4 + 8) * n_total


def test_activation_estimate_by_hand():
    model = spec_model(_micro_spec())  # d 64, d_kv 64, d_ff 160, 2 heads
    # s·b·(30d + 4·d_kv + 8·d_ff + 4·n_heads + 8) = 128·2·(1920 + 256 + 1280 + 8 + 8)
    assert activation_bytes_per_layer(model, 128, 2) == 128 * 2 * 3472 == 888_832
    big = spec_model(_paper_spec())  # MHA, d_ff = 2.5·d: 54·d + 4·36 + 8 bytes a token
    assert activation_bytes_per_layer(big, 4096, 1) == 4096 * (54 * 2304 + 152)


def _saved_activation_bytes(model: MiniCPM, batch: int, seq_len: int) -> int:
    """Bytes of the distinct tensors with a batch dimension that autograd saves in one step."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[0] in (batch, batch * seq_len):  # not weights nor RoPE tables
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq_len))
    targets = torch.randint(0, model.cfg.vocab_size, (batch, seq_len))
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with torch.autocast("cpu", dtype=torch.bfloat16), hooks:
        model(ids, targets)
    return sum(storages.values())


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA and GQA
def test_activation_estimate_matches_what_autograd_saves(n_kv_heads):
    cfg = get_config("micro-128", vocab_size=1024, max_seq_len=64, n_kv_heads=n_kv_heads)
    torch.manual_seed(0)
    measured = _saved_activation_bytes(MiniCPM(cfg), batch=3, seq_len=64)
    # the hook counts tensors with a batch dimension; the (V, d) loss buffer has none
    assert measured == activation_bytes(cfg, 64, 3) - loss_buffer_bytes(cfg)


def test_fsdp_divides_state_by_workers():
    p = plan(_micro_spec(workers=4), 0.5, 1e15, 1 * GIB)
    act = p["activation_bytes"]["total"]
    state = p["state_bytes"]["bf16-mixed"]["total"]
    assert p["per_worker_bytes"]["ddp"] == state + act
    assert p["per_worker_bytes"]["fsdp"] == state / 4 + act


def test_advises_fsdp_when_ddp_does_not_fit():
    p = plan(_paper_spec(), 0.4, H100, 40 * GIB)  # 40.6 GiB of state alone
    assert p["fits"] == {"ddp": False, "fsdp": True}
    assert "fsdp" in p["advice"] and "does not fit" in p["advice"]
    assert plan(_paper_spec(), 0.4, H100, 80 * GIB)["advice"] == "ddp fits"


def test_gpu_hours_formula():
    assert gpu_hours(3.6e18, 0.5, 1e15) == pytest.approx(2.0)  # 3.6e18 / 5e14 FLOP/s = 7200 s
    with pytest.raises(ValueError, match="mfu"):
        plan(_micro_spec(), 0.0, 1e15, GIB)


def test_state_bytes_mixed_is_16_per_param():
    assert state_bytes(10)["total"] == 160


def test_command_prints_text_and_json(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(to_dict(_paper_spec())))
    p = argparse.ArgumentParser()
    add_plan_parser(p.add_subparsers())
    args = p.parse_args(["plan", str(path), "--gpu", "a100", "--mfu", "0.5"])
    assert args.fn(args) == 0
    text = capsys.readouterr().out
    assert "non-embedding 2,442,057,984" in text and "16 bytes/param" in text
    args = p.parse_args(["plan", str(path), "--json", "--peak-tflops", "100"])
    assert args.fn(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_flops"] == 100e12 and out["mfu"] == 0.4
    assert out["gpu_memory_bytes"] == 80 * GIB
