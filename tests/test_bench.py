"""The benchmark scripts stay runnable: a seconds-long smoke run of each one that needs no Ray.

Their numbers are not checked here (benchmarks are not timed tests); only that each prints its
table and writes its JSON. The Ray benchmarks (orchestration, search efficiency) run studies of
minutes and are left to `python bench/<name>.py`.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """The script as a module of its own name, importable again by a spawned child process."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import `benchlib` from beside themselves
    module = importlib.import_module(name)
    assert Path(module.__file__).parent == BENCH, module.__file__
    return module


@pytest.fixture
def keep_threads():
    """The scripts set torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def test_gpu_mfu_script_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--sizes", "micro-32", "--seq", "32", "--batch", "2"]
    args += ["--steps", "1", "--no-compile", "--peak-n", "256", "--out", str(out)]
    rows = load("gpu_mfu").main(args)
    assert [r["model"] for r in rows] == ["micro-32"]
    assert rows[0]["tokens_per_s"] > 0 and 0 < rows[0]["mfu"] < 1
    assert "| micro-32 | no |" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["rows"] == rows and record["machine"]["device"] == "cpu"


def test_throughput_compares_the_trainer_with_the_reference(tmp_path, keep_threads, capsys):
    out = tmp_path / "throughput.json"
    args = ["--sizes", "micro-32", "--precisions", "fp32", "--batch", "2", "--seq", "32"]
    rows = load("throughput").main(
        [*args, "--windows", "1", "--matmul-seconds", "0.01", "--out", str(out)]
    )
    (row,) = rows
    assert row["tokens_per_s"] > 0 and row["reference_tokens_per_s"] > 0
    assert row["matmul_gflops"] > 0
    assert row["of_matmul_rate"] == pytest.approx(row["gflops"] / row["matmul_gflops"])
    assert row["speedup"] == pytest.approx(row["tokens_per_s"] / row["reference_tokens_per_s"])
    assert json.loads(out.read_text())["rows"][0]["model"] == "micro-32"
    assert "| micro-32 |" in capsys.readouterr().out


def test_step_matmuls_are_the_models_linear_maps_and_its_head():
    from trainables.model import MiniCPM
    from trainables.shapes import get_config, non_embedding_params

    benchlib = load("benchlib")
    cfg = get_config("micro-32", vocab_size=512, max_seq_len=32)
    model = MiniCPM(cfg)
    shapes = benchlib.linear_shapes(model)
    assert sum(shapes.values()) == 7 * cfg.n_layers + 1  # q k v o gate up down, and the head
    assert shapes[(cfg.d_model, cfg.vocab_size)] == 1
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    weights = sum(n_in * n_out * count for (n_in, n_out), count in shapes.items())
    assert weights - cfg.d_model * cfg.vocab_size == non_embedding_params(cfg) - norms
    assert benchlib.step_matmul_rate(model, 64, torch.float32, seconds=0.001, passes=1) > 0


def test_profile_groups_the_trainers_step(tmp_path, keep_threads, capsys):
    out = tmp_path / "profile.json"
    args = ["--size", "micro-32", "--precision", "fp32", "--batch", "2", "--seq", "32"]
    rows = load("profile_step").main([*args, "--warmup", "1", "--steps", "2", "--out", str(out)])
    groups = {r["group"]: r["share"] for r in rows}
    assert groups["matmul"] > 0 and groups["optimizer"] > 0
    assert sum(groups.values()) == pytest.approx(1.0)
    assert "| aten::mm | matmul |" in capsys.readouterr().out and out.exists()


def test_step_time_counts_cpu_seconds(tmp_path, keep_threads):
    out = tmp_path / "step.json"
    args = ["--sizes", "micro-32", "--precisions", "fp32", "--batch", "2", "--seq", "32"]
    (row,) = load("step_time").main([*args, "--steps", "2", "--out", str(out)])
    assert row["cpu_s_per_step"] > 0 and out.exists()


def test_memory_measures_trials_sharing_one_store(tmp_path):
    out = tmp_path / "memory.json"
    args = ["--trials", "1", "--store-mb", "4", "--steps", "1", "--control", "0"]
    (row,) = load("memory").main([*args, "--out", str(out)])
    assert row["trials"] == 1 and row["store_rss_per_trial"] == pytest.approx(4, abs=1)
