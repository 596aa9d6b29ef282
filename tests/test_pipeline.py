"""The whole pipeline on a tiny model: killed mid-way by SIGKILL, rerun, completed without redoing
finished stages; every stage's output is usable (int4 generation, the HF export, the eval table)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

STUDY = {
    "name": "tiny-lr",
    "question": "Which lr do two tiny μP proxies prefer?",
    "model": {"preset": "micro-32", "max_seq_len": 64},
    "data": {"sources": ["embedded:python-stdlib"], "vocab_size": 512, "max_chars": 400000},
    "train": {
        "tokens": 16384,
        "batch_size": 8,
        "seq_len": 64,
        "lr": 0.01,
        "schedule": {"kind": "wsd", "warmup_steps": 4, "decay_fraction": 0.1},
        "eval_every": 16,
        "eval_tokens": 2048,
    },
    "search": {
        "algorithm": "grid",
        "space": {
            "model.preset": {"grid": ["micro-32"]},
            "train.lr": {"grid": [0.003, 0.01, 0.03]},
        },
    },
    "resources": {"cpu": 1},
    "analysis": {"kind": "lr_transfer", "width_key": "model.preset", "lr_key": "train.lr"},
    "tracking": {"wandb": {"mode": "disabled"}},
}
SMALL = {"seq_len": 64, "batch_size": 4, "eval_every": 4, "checkpoint_every": 4}
PIPELINE = {
    "name": "tiny",
    "question": "Does every stage run and resume?",
    "resources": {"cpu": 1},
    "stages": {
        "lr": {"kind": "study", "spec": "study.yaml"},
        "transfer": {
            "kind": "transfer",
            "from": "lr",
            "options": {
                "target": "micro-32",
                "name": "tiny-32",
                "seq_len": 64,
                "tokens": 60 * 1024,
                "global_batch_tokens": 1024,
                "num_workers": 2,
                "micro_batch_size": 8,
                "decay_fraction": 0.2,
                "overrides": {
                    "data": {"vocab_size": 512, "max_chars": 400000},
                    "checkpoint_every": 24,
                    "eval_every": 24,
                    "eval_tokens": 2048,
                },
            },
        },
        "pretrain": {"kind": "pretrain", "from": "transfer"},
        "anneal": {
            "kind": "anneal",
            "from": "pretrain",
            "options": {
                "overrides": {
                    "anneal_mixture": [
                        {"name": "pretrain", "weight": 0.7},
                        {
                            "name": "sft",
                            "weight": 0.3,
                            "sources": ["embedded:sft"],
                            "format": "sft",
                        },
                    ]
                }
            },
        },
        "sft": {"kind": "sft", "from": "anneal", "options": {**SMALL, "steps": 8}},
        "dpo": {"kind": "dpo", "from": "sft", "options": {**SMALL, "steps": 6, "eval_pairs": 16}},
        "int4": {"kind": "gptq", "from": "dpo", "options": {"n_calib": 8, "seq_len": 64}},
        "eval": {
            "kind": "eval",
            "from": ["anneal", "dpo", "int4"],
            "options": {"limit": 8, "tasks": ["embedded:arith-gen"], "heldout": []},
        },
        "hf": {"kind": "export", "from": "dpo"},
    },
}
STAGES = list(PIPELINE["stages"])


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("RAY_ADDRESS", None)  # its own local Ray, in its own process group
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(pipeline: Path, storage: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sandbox_service.cli", "pipeline", str(pipeline)]
    cmd += ["--storage", str(storage), "--num-cpus", "2", "--wandb-mode", "disabled"]
    return subprocess.Popen(
        cmd,
        cwd=pipeline.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # killpg ends the driver and the Ray it started, nothing else
    )


def _end(proc: subprocess.Popen) -> str:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return out or ""


def _records(root: Path) -> dict[str, str]:
    return {
        s: (root / s / "stage.json").read_text()
        for s in STAGES
        if (root / s / "stage.json").exists()
    }


@pytest.mark.slow
def test_killed_pipeline_resumes_without_redoing_finished_stages(tmp_path, capsys):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY, sort_keys=False))
    pipeline = tmp_path / "tiny.yaml"
    pipeline.write_text(yaml.safe_dump(PIPELINE, sort_keys=False, allow_unicode=True))
    storage, root = tmp_path / "runs", tmp_path / "runs" / "tiny"
    proc = _start(pipeline, storage)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and "pretrain" not in _records(root):
            time.sleep(0.5)
    finally:
        first = _end(proc)  # SIGKILL while the anneal starts, or later
    before = _records(root)
    assert "pretrain" in before, f"the pretrain did not finish in time:\n{first[-4000:]}"
    t0 = time.time()
    rerun = _start(pipeline, storage)
    try:
        out, _ = rerun.communicate(timeout=600)
    finally:
        out = (out if rerun.returncode is not None else "") + _end(rerun)
    assert rerun.returncode == 0, out[-4000:]
    after = _records(root)
    assert set(after) == set(STAGES)
    for stage, record in before.items():  # finished stages are skipped, their records untouched
        assert after[stage] == record
        assert f"[{stage}] complete, skipped" in out
    _check_outputs(root)
    with capsys.disabled():
        walls = {s: json.loads(after[s])["wall_time_s"] for s in STAGES}
        print(f"\npipeline rerun after SIGKILL: {time.time() - t0:.0f} s; stage wall times {walls}")


def _check_outputs(root: Path) -> None:
    from trainables.artifact import load_model_dir
    from trainables.generate import generate_from_dir
    from trainables.quantized import is_quantized

    records = {s: json.loads((root / s / "stage.json").read_text()) for s in STAGES}
    int4 = records["int4"]["outputs"]["model"]
    assert is_quantized(int4) and generate_from_dir(int4, "def ", max_new_tokens=4, temperature=0)
    assert load_model_dir(records["dpo"]["outputs"]["model"]).state["stage"] == "dpo"
    assert (Path(records["hf"]["outputs"]["hf"]) / "config.json").exists()
    assert "| int4/model | gptq | " in records["eval"]["outputs"]["table"]
    lineage = json.loads((root / "lineage.json").read_text())
    assert [s["stage"] for s in lineage["stages"]] == STAGES
    assert (
        lineage["stages"][4]["inputs"]["anneal"]["model"] == records["anneal"]["outputs"]["model"]
    )
    report = (root / "report.md").read_text()
    assert "| int4 | gptq |" in report and "## int4 vs full precision: int4 - dpo" in report
    (root / "report.md").unlink()
    from sandbox_service.cli import main

    assert main(["report", "tiny", "--storage", str(root.parent)]) == 0  # from the stored copy
    assert (root / "report.md").read_text() == report
