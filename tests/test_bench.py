"""The GPU benchmark script stays runnable: a CPU smoke run of its eager path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_mfu.py"


def test_gpu_mfu_script_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_mfu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = [
        "--device",
        "cpu",
        "--sizes",
        "micro-32",
        "--seq",
        "32",
        "--batch",
        "2",
        "--steps",
        "1",
        "--no-compile",
        "--peak-n",
        "256",
    ]
    rows = module.main(args)
    assert [r["model"] for r in rows] == ["micro-32"]
    assert rows[0]["tokens_per_s"] > 0 and 0 < rows[0]["mfu"] < 1
    assert "| micro-32 | no |" in capsys.readouterr().out
