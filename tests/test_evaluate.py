"""run_eval on real micro model folders: Ray tasks per (model, task), resumable, a stage table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sandbox_service import evaluate
from sandbox_service.evaluate import (
    evaluate_unit,
    finished,
    format_table,
    plan_units,
    results_dir,
    run_eval,
)
from trainables.artifact import save_model_dir
from trainables.data import DataConfig, prepare
from trainables.heldout import load_heldout
from trainables.model import MiniCPM
from trainables.shapes import get_config
from trainables.tasks import load_task
from trainables.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(prepare(DataConfig()).meta["tokenizer"])


def micro_model(tok: Tokenizer, seed: int) -> MiniCPM:
    torch.manual_seed(seed)
    return MiniCPM(dataclasses.replace(get_config("micro-32"), vocab_size=tok.vocab_size))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok) -> list[str]:
    root = tmp_path_factory.mktemp("stages")
    return [
        str(save_model_dir(root / stage / "model", micro_model(tok, seed), tok, stage=stage))
        for seed, stage in ((0, "anneal"), (1, "sft"))
    ]


@pytest.fixture
def inputs(tmp_path) -> tuple[str, str]:
    records = [
        {"question": f"Which module defines {f}?", "choices": ["os", "json", "re"], "answer": a}
        for f, a in (("getcwd", 0), ("dumps", 1), ("sub", 2), ("listdir", 0), ("loads", 1))
    ]
    mc = tmp_path / "modules.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = tmp_path / "held.txt"
    text.write_text("import os\n\nprint(os.getcwd())\n\ndef f(x):\n    return x + 1\n")
    return str(mc), str(text)


def result_files(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.glob("*/*.json"))}


@pytest.mark.ray
def test_run_eval_completes_then_resumes_without_recomputing(
    ray_local, models, inputs, tmp_path, monkeypatch
):
    mc, text = inputs
    out = tmp_path / "eval"
    tasks = [mc, "embedded:arith-gen"]
    kwargs = dict(heldout=[text], shots=1, limit=4, batch_size=4)
    results = run_eval(models, tasks, str(out), **kwargs)
    assert results["stages"] == {models[0]: "anneal", models[1]: "sft"}
    for m in models:
        scores = results["tasks"][m]
        assert set(scores["modules"]) >= {"loglik", "loglik_norm", "generate", "best"}
        assert scores["modules"]["n"] == 4 and scores["embedded:arith-gen"]["n"] == 4
        assert scores["modules"]["best"] == max(
            scores["modules"][k] for k in ("loglik", "loglik_norm", "generate")
        )
        held = results["heldout"][m]
        assert held["average"]["bits_per_byte"] == held["sets"]["held"]["bits_per_byte"] > 0
    files = result_files(out)
    assert len(files) == 6  # 2 models x (2 tasks + 1 held-out set)
    assert json.loads((out / "results.json").read_text()) == results

    monkeypatch.setattr(evaluate, "_run_remote", lambda *a: pytest.fail("a unit was recomputed"))
    assert run_eval(models, tasks, str(out), **kwargs) == results
    assert result_files(out) == files
    monkeypatch.undo()

    zero_shot = run_eval(models, tasks, str(out), **(kwargs | {"shots": 0}))
    after = result_files(out)
    assert len(after) == 10 and all(after[f] == t for f, t in files.items())
    assert zero_shot["heldout"] == results["heldout"]
    table = format_table(zero_shot)
    assert table.startswith(
        "| model | stage | modules | embedded:arith-gen | held bpb | mean bpb |"
    )
    assert "| sft/model | sft | " in table and "ll = loglik" in table


def test_a_retrained_model_is_evaluated_anew_and_results_sit_beside_it(tok, tmp_path, inputs):
    mc, text = inputs
    folder = str(save_model_dir(tmp_path / "m", micro_model(tok, 0), tok, stage="dpo"))
    task, heldout = load_task(mc), load_heldout(text)
    units = plan_units([folder], [task], [heldout], None, 0, 2)
    assert [Path(u.path).parent for u, _ in units] == [Path(folder + ".eval")] * 2
    a, b = results_dir("/x/sft/model", "s3://b/eval"), results_dir("/y/sft/model", "s3://b/eval")
    assert (
        a.startswith("s3://b/eval/sft-model-") and b.startswith("s3://b/eval/sft-model-") and a != b
    )
    for unit, payload in units:
        record = evaluate_unit(unit, payload, shots=0, limit=2, batch_size=2)
        assert finished(unit) == record
    save_model_dir(folder, micro_model(tok, 5), tok, stage="dpo")
    with pytest.raises(evaluate.EvalError, match="changed while being evaluated"):
        evaluate_unit(units[0][0], task, shots=0, limit=2, batch_size=2)  # planned for old weights
    for unit, _ in plan_units([folder], [task], [heldout], None, 0, 2):
        assert finished(unit) is None  # new weights: new fingerprint


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shots": -1}, "shots=-1"),
        ({"limit": 0}, "limit=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"shots": 9}, "shots=9: task modules has only 5 items"),
    ],
)
def test_bad_requests_are_refused_before_any_work(models, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_eval(models, [inputs[0]], None, heldout=[], **kwargs)
    with pytest.raises(evaluate.EvalError, match="no model folders"):
        run_eval([], [inputs[0]])


def test_results_go_to_wandb_as_one_offline_run_per_model(tmp_path):
    results = {
        "tasks": {"/r/sft/model": {"t": {"loglik": 0.5, "best": 0.5, "chosen_mode": "loglik"}}},
        "heldout": {"/r/sft/model": {"sets": {"h": {"bits_per_byte": 2.0}}, "average": {}}},
        "stages": {"/r/sft/model": "sft"},
    }
    evaluate.log_wandb(results, "offline", str(tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
