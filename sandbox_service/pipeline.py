"""`sandbox pipeline FILE`: run a pipeline's stages in order, skipping those already complete.

Under `<storage>/<pipeline>/`:
    pipeline.yaml         the file as given at the first run
    running.json          host and pid of the driver while it runs (see sandbox_service.status)
    <stage>/stage.json    written last, atomically, when the stage completes: its kind,
                          fingerprint, inputs, outputs, metrics and wall time
    lineage.json          every completed stage in order: which inputs produced which outputs
    report.md             per-stage wall time and metrics, and the evaluation table

A stage with a `stage.json` of the same fingerprint is skipped; one with another fingerprint
(its options, its spec file or an upstream stage changed) is refused with a message saying what
to do. A stage killed mid-way has no `stage.json`: the rerun runs it again, and each runner
resumes its own work (Tune restores the study, Ray Train and SFT/DPO their last checkpoint).
"""

from __future__ import annotations

import functools
import json
import time
from datetime import datetime, timezone

from sandbox_service import status, storage
from sandbox_service.pipeline_spec import PipelineError, PipelineSpec, Stage
from sandbox_service.stages import Context, run_stage

RECORD = "stage.json"
STARTED = "started.json"  # written when a stage starts: with no stage.json, it did not finish


def pipeline_url(spec: PipelineSpec, root: str) -> str:
    return storage.join(root, spec.name)


def read_record(url: str, stage: str) -> dict | None:
    path = storage.join(url, stage, RECORD)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def run_pipeline(
    spec: PipelineSpec,
    root: str = storage.DEFAULT_ROOT,
    *,
    address: str | None = None,
    wandb_mode: str = "offline",
    num_cpus: int | None = None,
    verbose: bool = False,
    echo=None,
) -> dict:
    """Run (or resume) every stage; returns {stage: record}. Raises on the first failed stage.

    Workers' logs go to Ray's session folder unless `verbose`; each stage prints one line when
    it starts and one with its outputs when it ends."""
    from sandbox_service.study import init_ray

    echo = echo or functools.partial(print, flush=True)  # progress shows at once, even in a pipe
    url = pipeline_url(spec, root)
    storage.check_writable(url)  # an unwritable root fails now, not after the first stage
    _claim(spec, url)
    records = {s.name: r for s in spec.stages if (r := _usable_record(url, s)) is not None}
    if len(records) == len(spec.stages):
        echo(f"pipeline {spec.name}: every stage is complete")
        return records
    init_ray(address, num_cpus, log_to_driver=verbose)
    status.mark_running(url)
    try:
        for stage in spec.stages:
            if stage.name in records:
                echo(f"[{stage.name}] complete, skipped: {_outputs_line(records[stage.name])}")
                continue
            records[stage.name] = _run_one(spec, stage, url, records, address, wandb_mode, echo)
            write_lineage(spec, url, records)
    finally:
        status.clear_running(url)
    from sandbox_service.pipeline_report import write_pipeline_report

    echo(f"report: {write_pipeline_report(spec, url, records)}")
    return records


def _claim(spec: PipelineSpec, url: str) -> None:
    """Keep the file as first run, its study files as absolute paths so it reloads from here."""
    import yaml

    from sandbox_service import yaml_safe

    copy = storage.join(url, "pipeline.yaml")
    if storage.exists(copy):
        return
    raw = yaml_safe.load(spec.source)
    for stage in spec.stages:
        if stage.spec is not None:
            raw["stages"][stage.name]["spec"] = stage.spec
    storage.write_text(copy, yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))


def _usable_record(url: str, stage: Stage) -> dict | None:
    record = read_record(url, stage.name)
    if record is None:
        return None
    if record.get("fingerprint") != stage.fingerprint:
        raise PipelineError(
            f"{storage.join(url, stage.name, RECORD)}: stage {stage.name!r} completed with "
            f"other settings (fingerprint {record.get('fingerprint')} vs {stage.fingerprint}: "
            "its options, spec file or an upstream stage changed). Rename the stage to keep "
            "both, or delete that folder (and those of the stages after it) to redo it"
        )
    return record


def _run_one(spec, stage: Stage, url: str, records: dict, address, wandb_mode, echo) -> dict:
    folder = storage.join(url, stage.name)
    inputs = {name: records[name]["outputs"] for name in stage.inputs}
    ctx = Context(url, folder, inputs, address=address, wandb_mode=wandb_mode)
    echo(f"[{stage.name}] {stage.kind} from {list(stage.inputs) or 'its spec'} ...")
    started = time.time()
    begun = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    storage.write_text(storage.join(folder, STARTED), json.dumps(begun) + "\n")
    outputs, metrics = run_stage(stage, ctx)
    record = {
        "stage": stage.name,
        "kind": stage.kind,
        "status": "complete",
        "fingerprint": stage.fingerprint,
        "inputs": {name: records[name]["outputs"] for name in stage.inputs},
        "outputs": outputs,
        "metrics": metrics,
        "wall_time_s": round(time.time() - started, 2),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_text(storage.join(folder, RECORD), json.dumps(record, indent=1) + "\n")
    echo(f"[{stage.name}] done in {record['wall_time_s']:.0f} s: {_outputs_line(record)}")
    return record


def _outputs_line(record: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in record["outputs"].items() if k != "table")


def rewrite_report(url: str) -> str:
    """report.md again from the stage records on disk (`sandbox report PIPELINE`)."""
    from sandbox_service.pipeline_report import write_pipeline_report
    from sandbox_service.pipeline_spec import load_pipeline

    spec = load_pipeline(storage.join(url, "pipeline.yaml"))
    records = {s.name: r for s in spec.stages if (r := read_record(url, s.name)) is not None}
    return write_pipeline_report(spec, url, records)


def write_lineage(spec: PipelineSpec, url: str, records: dict) -> None:
    """lineage.json: the chain from study winners to specs, checkpoints and models."""
    chain = [
        {k: records[s.name][k] for k in ("stage", "kind", "inputs", "outputs", "fingerprint")}
        for s in spec.stages
        if s.name in records
    ]
    lineage = {"pipeline": spec.name, "source": spec.source, "stages": chain}
    storage.write_text(storage.join(url, "lineage.json"), json.dumps(lineage, indent=1) + "\n")


def pipeline_states(root: str) -> list[dict]:
    """Every pipeline under `root` with each stage's state: complete, running, interrupted or
    pending; for `sandbox status`."""
    rows = []
    for name in storage.subfolders(root):
        url = storage.join(root, name)
        if not storage.exists(storage.join(url, "pipeline.yaml")):
            continue
        rows.append({"pipeline": name, "stages": _stage_states(url)})
    return rows


def _stage_states(url: str) -> list[dict]:
    from sandbox_service import yaml_safe

    raw = yaml_safe.loads(storage.read_text(storage.join(url, "pipeline.yaml")), url)
    running = storage.join(url, "running.json")
    alive = (
        status.driver_alive(json.loads(storage.read_text(running)))
        if storage.exists(running)
        else False
    )
    states, current_taken = [], False
    for name, body in (raw.get("stages") or {}).items():
        record = read_record(url, str(name))
        if record is not None:
            state, where = "complete", _outputs_line(record)
        elif not current_taken and storage.exists(storage.join(url, str(name), STARTED)):
            state, where = ("running" if alive is not False else "interrupted"), "-"
            current_taken = True
        else:
            state, where = "pending", "-"
        states.append(
            {"stage": str(name), "kind": body.get("kind"), "state": state, "output": where}
        )
    return states
