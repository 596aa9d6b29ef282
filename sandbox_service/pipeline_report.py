"""report.md of a pipeline: each stage's wall time, outputs and metrics, and the eval table."""

from __future__ import annotations

import json

from sandbox_service import storage
from sandbox_service.pipeline_spec import PipelineSpec


def write_pipeline_report(spec: PipelineSpec, url: str, records: dict) -> str:
    """Write `<url>/report.md` from the stage records; returns its path."""
    lines = [f"# Pipeline {spec.name}", ""]
    if spec.question:
        lines += [spec.question, ""]
    lines += ["| stage | kind | wall time | outputs | metrics |", "|---|---|---|---|---|"]
    total = 0.0
    for stage in spec.stages:
        record = records.get(stage.name)
        if record is None:
            lines.append(f"| {stage.name} | {stage.kind} | - | not run | |")
            continue
        total += record["wall_time_s"]
        outputs = "<br>".join(f"{k}: `{v}`" for k, v in record["outputs"].items() if k != "table")
        lines.append(
            f"| {stage.name} | {stage.kind} | {_duration(record['wall_time_s'])} | {outputs} "
            f"| {_metrics(record['metrics'])} |"
        )
    lines += ["", f"Total stage time: {_duration(total)}.", ""]
    for stage in spec.stages:
        record = records.get(stage.name)
        if record and "table" in record["outputs"]:
            lines += [f"## Evaluation: {stage.name}", "", record["outputs"]["table"], ""]
    path = storage.join(url, "report.md")
    storage.write_text(path, "\n".join(lines))
    return path


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _metrics(metrics: dict) -> str:
    shown = []
    for key, value in metrics.items():
        if isinstance(value, float):
            shown.append(f"{key} {value:.4g}")
        elif isinstance(value, (int, str)):
            shown.append(f"{key} {value}")
        elif isinstance(value, dict):
            shown.append(f"{key} {json.dumps(value, default=str)[:80]}")
    return ", ".join(shown[:8])
