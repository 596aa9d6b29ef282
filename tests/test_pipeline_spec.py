"""Pipeline files: every stage validated before anything runs, errors naming the stage and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sandbox_service.pipeline import _stage_states, pipeline_states, write_lineage
from sandbox_service.pipeline_report import write_pipeline_report
from sandbox_service.pipeline_spec import PipelineError, load_pipeline

STUDY = Path(__file__).parents[1] / "search_spaces" / "pipelines" / "micro_lr.yaml"


def _write(tmp_path: Path, stages: dict, **top) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "stages": stages, **top}, sort_keys=False))
    return path


def _base() -> dict:
    return {
        "lr": {"kind": "study", "spec": str(STUDY)},
        "transfer": {"kind": "transfer", "from": "lr", "options": {"target": "micro-64"}},
        "pretrain": {"kind": "pretrain", "from": "transfer"},
        "anneal": {"kind": "anneal", "from": "pretrain", "options": {"tag": "a1"}},
    }


def test_a_valid_pipeline_loads_with_fingerprints_chained(tmp_path):
    spec = load_pipeline(_write(tmp_path, _base()))
    assert [s.name for s in spec.stages] == ["lr", "transfer", "pretrain", "anneal"]
    assert spec.stage("lr").spec == str(STUDY.resolve())
    changed = _base()
    changed["transfer"]["options"]["target"] = "micro-128"
    other = load_pipeline(_write(tmp_path, changed))
    # a changed stage changes its own fingerprint and every one downstream, not those upstream
    assert other.stage("lr").fingerprint == spec.stage("lr").fingerprint
    for name in ("transfer", "pretrain", "anneal"):
        assert other.stage(name).fingerprint != spec.stage(name).fingerprint


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["pretrain"].update({"from": "lr"}), "'lr' is a study stage"),
        (lambda s: s["pretrain"].update({"from": "anneal"}), "'anneal' is not an earlier stage"),
        (lambda s: s["pretrain"].pop("from"), "required: an earlier stage"),
        (lambda s: s["lr"].update({"kind": "train"}), "kind='train': allowed study"),
        (lambda s: s["lr"].update({"spec": "missing.yaml"}), "stages.lr.spec"),
        (lambda s: s["lr"].update({"from": "transfer"}), "takes no input"),
        (lambda s: s["transfer"]["options"].update({"bogus": 1}), "bogus: unknown key"),
        (lambda s: s["transfer"]["options"].update({"seq_len": 0}), "seq_len=0"),
        (lambda s: s["pretrain"].update({"options": {"tag": "x"}}), "only an anneal"),
        (lambda s: s["pretrain"].update({"options": {"num_workers": -1}}), "num_workers=-1"),
        (lambda s: s["anneal"].update({"from": ["pretrain", "pretrain"]}), "exactly one input"),
        (lambda s: s["anneal"].update({"resources": {"cpu": 0}}), "cpu=0"),
        (lambda s: s.update({"../x": {"kind": "study", "spec": str(STUDY)}}), "stage name"),
    ],
)
def test_bad_stages_are_refused_naming_the_stage(tmp_path, edit, message):
    stages = _base()
    edit(stages)
    with pytest.raises(PipelineError, match=message) as err:
        load_pipeline(_write(tmp_path, stages))
    assert str(tmp_path / "p.yaml") in str(err.value)


def test_bad_top_level_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="unknown key"):
        load_pipeline(_write(tmp_path, _base(), extra=1))
    with pytest.raises(PipelineError, match="name="):
        load_pipeline(_write(tmp_path, _base(), name="a/b"))
    with pytest.raises(PipelineError, match="non-empty mapping"):
        load_pipeline(_write(tmp_path, {}))


def test_status_lineage_and_report_from_records(tmp_path):
    spec = load_pipeline(_write(tmp_path, _base()))
    url = tmp_path / "runs" / "p"
    (url / "lr").mkdir(parents=True)
    (url / "pipeline.yaml").write_text((tmp_path / "p.yaml").read_text())
    record = {
        "stage": "lr",
        "kind": "study",
        "status": "complete",
        "fingerprint": spec.stage("lr").fingerprint,
        "inputs": {},
        "outputs": {"study": "micro-lr"},
        "metrics": {"n_trials": 6},
        "wall_time_s": 88.0,
    }
    (url / "lr" / "stage.json").write_text(json.dumps(record))
    (url / "transfer").mkdir()
    (url / "transfer" / "started.json").write_text("{}")
    states = {s["stage"]: s["state"] for s in _stage_states(str(url))}
    # no driver is running this pipeline, so the started stage was interrupted
    assert states == {
        "lr": "complete",
        "transfer": "interrupted",
        "pretrain": "pending",
        "anneal": "pending",
    }
    assert [p["pipeline"] for p in pipeline_states(str(tmp_path / "runs"))] == ["p"]
    write_lineage(spec, str(url), {"lr": record})
    assert json.loads((url / "lineage.json").read_text())["stages"][0]["outputs"] == {
        "study": "micro-lr"
    }
    report = Path(write_pipeline_report(spec, str(url), {"lr": record})).read_text()
    assert "| lr | study | 88 s |" in report and "| pretrain | pretrain | - | not run |" in report


PIPELINES = [
    p for p in sorted(STUDY.parent.glob("*.yaml")) if "stages" in yaml.safe_load(p.read_text())
]


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipelines_load(path):
    spec = load_pipeline(path)
    assert spec.stages[0].kind == "study" and len({s.fingerprint for s in spec.stages}) == len(
        spec.stages
    )
