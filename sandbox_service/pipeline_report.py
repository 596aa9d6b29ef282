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
    lines += int4_differences(spec, records)
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


def int4_differences(spec: PipelineSpec, records: dict) -> list[str]:
    """Per evaluated GPTQ stage: int4 minus its full-precision input, per task and held-out set."""
    lines: list[str] = []
    evals = [s for s in spec.stages if s.kind == "eval" and s.name in records]
    for q in (s for s in spec.stages if s.kind == "gptq" and s.name in records):
        int4 = records[q.name]["outputs"]["model"]
        fp = records[q.name]["inputs"][q.inputs[0]]["model"]
        for ev in evals:
            results = json.loads(storage.read_text(records[ev.name]["outputs"]["results"]))
            if int4 in results["tasks"] and fp in results["tasks"]:
                lines += _difference_table(results, int4, fp, q.name, q.inputs[0])
    return lines


def _difference_table(results: dict, int4: str, fp: str, q_name: str, fp_name: str) -> list[str]:
    rows = [
        f"## int4 vs full precision: {q_name} - {fp_name}",
        "",
        "| measure | full precision | int4 | difference |",
        "|---|---|---|---|",
    ]
    for task, r in results["tasks"][fp].items():
        q = results["tasks"][int4].get(task)
        if q is not None:
            a, b = r["best"], q["best"]
            rows.append(f"| {task} accuracy | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    fp_sets = results["heldout"].get(fp, {}).get("sets", {})
    q_sets = results["heldout"].get(int4, {}).get("sets", {})
    for name, r in fp_sets.items():
        if name in q_sets:
            a, b = r["bits_per_byte"], q_sets[name]["bits_per_byte"]
            rows.append(f"| {name} bits/byte | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    return [*rows, ""]
