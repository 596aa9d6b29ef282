"""Studies on the session's local Ray: run, record, report status, resume after interruption."""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from sandbox_service import cli
from sandbox_service.spec import parse_spec
from sandbox_service.status import study_states
from sandbox_service.study import StudyError, run_study
from trainables import wandb_file

pytestmark = pytest.mark.ray

SPEC = {
    "name": "tiny",
    "question": "Does a tiny grid run, record and resume?",
    "model": {"preset": "micro-32", "vocab_size": 512},
    "data": {"vocab_size": 512, "max_chars": 300_000},
    "train": {
        "tokens": 24 * 4 * 32,
        "batch_size": 4,
        "seq_len": 32,
        "eval_every": 8,
        "eval_tokens": 1024,
        "precision": "fp32",
    },
    "search": {
        "algorithm": "grid",
        "space": {"train.lr": {"grid": [0.003, 0.01, 0.03]}},
        "max_concurrent": 2,
    },
    "resources": {"cpu": 1},
    "tracking": {"wandb": {"mode": "offline"}},
}


def spec_named(name: str, **search):
    raw = copy.deepcopy(SPEC)
    raw["name"] = name
    raw["search"].update(search)
    return parse_spec(raw, f"{name}.yaml")


def test_study_runs_and_records(ray_local, tmp_path):
    summary = run_study(spec_named("tiny-run"), root=str(tmp_path), verbose=0)
    folder = tmp_path / "tiny-run"
    assert summary["status"] == "complete" and summary["counts"] == {"completed": 3}
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}
    assert sorted(trials["config/train/lr"]) == [0.003, 0.01, 0.03]
    history = pd.read_csv(folder / "history.csv")
    assert len(history) == 3 * 3  # evaluations at steps 8, 16, 24
    best = trials.loc[trials["val_loss"].idxmin()]
    assert summary["best"]["config"]["train.lr"] == best["config/train/lr"]
    written = json.loads((folder / "summary.json").read_text())
    assert written["best"] == summary["best"] and written["n_trials"] == 3
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 3, "one offline W&B run per trial"
    for run in runs:  # complete, although each actor kept its W&B service for its next trial
        (run_file,) = run.glob("run-*.wandb")
        assert wandb_file.has_exit(run_file) and len(wandb_file.history(run_file)) == 3
    assert study_states(str(tmp_path))[0]["state"] == "complete"
    report = ["report", "tiny-run", "--storage", str(tmp_path), "--wandb-mode", "disabled"]
    assert cli.main(report) == 0
    assert (folder / "report" / "report.md").exists() and (folder / "analysis.json").exists()
    assert cli.main(["report", "../etc", "--storage", str(tmp_path)]) == 2


def _interrupt_when_a_trial_finishes(exp_dir: Path, timeout_s: float = 120) -> threading.Thread:
    """Send SIGINT (as Ctrl-C would) once a trial has reported its final result."""

    def watch():
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for result in exp_dir.glob("*/result.json"):
                if '"completed": true' in result.read_text():
                    os.kill(os.getpid(), signal.SIGINT)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_interrupted_study_resumes_without_rerunning_finished_trials(ray_local, tmp_path):
    spec = spec_named("tiny-resume", max_concurrent=1)
    exp_dir = tmp_path / "tiny-resume" / "tune"
    _interrupt_when_a_trial_finishes(exp_dir)
    with pytest.raises(StudyError, match="interrupted with [12] trials unfinished"):
        run_study(spec, root=str(tmp_path), verbose=0)
    assert study_states(str(tmp_path))[0]["state"] == "interrupted"
    done = {
        p.parent.name: p.read_text()
        for p in exp_dir.glob("*/result.json")
        if '"completed": true' in p.read_text()
    }
    assert done
    summary = run_study(spec, root=str(tmp_path), verbose=0)
    assert summary["counts"] == {"completed": 3}
    for trial, before in done.items():
        after = (exp_dir / trial / "result.json").read_text()
        assert after.startswith(before)
        # A trial interrupted between its last report and its end resumes from its final
        # checkpoint and only reports again: no training step is repeated.
        repeated = [json.loads(line)["step"] for line in after[len(before) :].splitlines()]
        assert all(step == 24 for step in repeated), f"{trial} retrained steps {repeated}"


def test_changed_spec_is_not_resumed(ray_local, tmp_path):
    run_study(spec_named("tiny-fixed"), root=str(tmp_path), verbose=0)
    changed = copy.deepcopy(SPEC) | {"name": "tiny-fixed"}
    changed["train"] = changed["train"] | {"seq_len": 16}
    with pytest.raises(StudyError, match="different spec"):
        run_study(parse_spec(changed, "changed.yaml"), root=str(tmp_path), verbose=0)


def test_bad_spec_launches_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nquestion: q\nmodel: {preset: micro-32}\ntrain: {tokens: 100, lr: -1}\n"
    )
    assert cli.main(["run", str(bad), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "lr=-1" in err
    assert not (tmp_path / "runs").exists()


def test_wsd_branches_start_from_the_stable_checkpoints(ray_local, tmp_path):
    raw = copy.deepcopy(SPEC) | {"name": "tiny-wsd"}
    raw["train"] = raw["train"] | {"schedule": {"kind": "wsd", "warmup_steps": 2}}
    raw["search"] = {"algorithm": "grid", "space": {"train.lr": {"grid": [0.01]}}}
    raw["branching"] = {"steps": [8, 16], "decay_fractions": [0.2], "decay_shapes": ["linear"]}
    summary = run_study(parse_spec(raw, "wsd.yaml"), root=str(tmp_path), verbose=0)
    assert summary["counts"] == {"completed": 5}
    trials = pd.read_csv(tmp_path / "tiny-wsd" / "trials.csv")
    phases = trials["branch/phase"].value_counts().to_dict()
    assert phases == {"stable": 1, "decay": 2, "cosine": 2}
    tokens_per_step = 4 * 32
    decays = trials[trials["branch/phase"] == "decay"].sort_values("branch/stable_step")
    assert list(decays["step"]) == [10, 20]  # S + D with D = 0.2 (S + D)
    assert list(decays["own_tokens"]) == [2 * tokens_per_step, 4 * tokens_per_step]
    cosine = trials[trials["branch/phase"] == "cosine"]
    assert list(cosine["own_tokens"]) == list(cosine["tokens"])  # baselines pay every step
    stable_id = trials.loc[trials["branch/phase"] == "stable", "trial_id"].item()
    kept = sorted(p.name for p in (tmp_path / "tiny-wsd" / "stable" / stable_id).iterdir())
    assert kept == ["step_00000008", "step_00000016"]
