"""The report of a finished study: Markdown, one PNG per figure, and the laws as JSON.

    write_report("./sandbox_runs/lr-micro")                      # or any fsspec URL
    write_report("./sandbox_runs/lr-micro", wandb_mode="offline")

Reads the study folder (`spec.yaml`, `trials.csv`, `history.csv`), runs the spec's analysis
(`sandbox_service.analysis`; the generic report when the spec has no `analysis:` section) and
writes, each file atomically:
- `<study>/report/report.md`: the question, what was run, headline numbers, method, figures and
  tables;
- `<study>/report/<figure>.png`;
- `<study>/analysis.json`: the machine-readable summary the transfer step reads (kind, laws with
  parameters, bootstrap intervals and provenance, chosen values).
Unless `wandb_mode` is `disabled`, the images, tables and headline numbers also go to a W&B run
in the study's group (job_type `report`); offline runs land in `<study>/wandb` beside the trials'.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from sandbox_service import results, storage, yaml_safe
from sandbox_service.analysis import Analysis, analyze
from sandbox_service.spec import StudySpec, parse_spec
from trainables.tracking import resolve_mode
from trainables.trial import parse_trial_config

DPI = 110  # ~550-1650 px wide figures: sharp in a browser, small in a repository


def write_report(study_url: str, *, wandb_mode: str = "disabled") -> Path | str:
    """Analyse the study at `study_url` and write its report; returns report.md's path/URL."""
    spec = read_spec(study_url)
    trials = results.read_table(study_url, "trials.csv")
    history = results.read_table(study_url, "history.csv")
    result = analyze(spec, trials, history, fingerprint=recorded_fingerprint(study_url))
    report_url = storage.join(study_url, "report")
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        images = save_figures(result, Path(tmp), report_url)
        summary = {**result.summary, "figures": [f"report/{p.name}" for p in images.values()]}
        storage.write_text(
            storage.join(study_url, "analysis.json"),
            json.dumps(summary, indent=2, allow_nan=False) + "\n",
        )
        storage.write_text(storage.join(report_url, "report.md"), markdown(spec, result, images))
        mode = resolve_mode(wandb_mode)
        if mode != "disabled":
            log_to_wandb(spec, result, images, mode, study_url)
    target = storage.join(report_url, "report.md")
    return storage.local_path(target) if storage.is_local(target) else target


def read_spec(study_url: str) -> StudySpec:
    source = storage.join(study_url, "spec.yaml")
    return parse_spec(yaml_safe.loads(storage.read_text(source), source), source)


def recorded_fingerprint(study_url: str) -> str | None:
    """The fingerprint the study was started with (spec.yaml is re-serialised, so its own hash
    need not match the file the user wrote)."""
    marker = storage.join(study_url, "fingerprint")
    return storage.read_text(marker).strip() if storage.exists(marker) else None


def save_figures(result: Analysis, tmp: Path, report_url: str) -> dict[str, Path]:
    """Render each figure to a local PNG, then copy it to storage; {name: local file}."""
    images = {}
    for name, fig in result.figures.items():
        path = tmp / f"{name}.png"
        fig.savefig(path, dpi=DPI)
        storage.write_bytes_from(storage.join(report_url, path.name), path)
        images[name] = path
    return images


# --- Markdown --------------------------------------------------------------------------------


def markdown(spec: StudySpec, result: Analysis, images: dict[str, Path]) -> str:
    s = result.summary
    lines = [f"# {spec.name}: {result.kind.replace('_', ' ')} report", ""]
    lines += [f"**Question.** {spec.question}", "", "## What was run", ""]
    lines += what_was_run(spec, s)
    lines += ["", "## Headline", "", *table_lines(headline_frame(s.get("headline", {})))]
    lines += ["", "## Method", "", *[f"- {n}" for n in s.get("notes", [])]]
    if s.get("skipped"):
        lines += ["", "## Not fitted", "", *[f"- {n}" for n in s["skipped"]]]
    lines += ["", "## Figures", ""]
    for name, path in images.items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({path.name})", ""]
    lines += ["## Tables", ""]
    for name, frame in result.tables.items():
        lines += [f"### {name.replace('_', ' ')}", "", *table_lines(frame), ""]
    lines += [
        f"Machine-readable results: `analysis.json` (study fingerprint `{s['fingerprint']}`).",
        "",
    ]
    return "\n".join(lines)


def what_was_run(spec: StudySpec, summary: dict) -> list[str]:
    base = parse_trial_config(spec.base_config())
    train = base.train
    budget = f"{train.tokens:,} tokens" if train.tokens else f"{train.tokens_per_param:g}·N tokens"
    counts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items() if v)
    lines = [
        f"- {summary['n_trials']} trials ({counts or 'none'}), search `{spec.search.algorithm}`"
        f"{', ASHA early stopping' if spec.search.scheduler else ''}.",
        f"- Base config (searched keys override it): model `{base.model.name}`, {budget}, "
        f"batch {train.batch_size} × {train.seq_len} = {train.tokens_per_step:,} tokens per "
        f"step, lr {train.lr:g}, schedule `{train.schedule.kind}`.",
        f"- Data: {', '.join(spec.data.sources)} (vocab {spec.data.vocab_size}).",
        f"- Metric: {summary['metric_label']} (`{summary['metric']}`).",
        "- Searched:",
    ]
    lines += [f"  - `{d.path}`: {d.kind} [{', '.join(map(cell, d.args))}]" for d in spec.space]
    return lines


def headline_frame(headline: dict) -> pd.DataFrame:
    return pd.DataFrame({"quantity": list(headline), "value": list(headline.values())})


def table_lines(frame: pd.DataFrame) -> list[str]:
    """A DataFrame as a Markdown table, numbers to 4 significant digits."""
    if frame.empty:
        return ["(empty)"]
    head = [str(c) for c in frame.columns]
    rows = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def cell(value) -> str:
    """One table cell: 4 significant digits; whole numbers >= 1000 (token counts, read back
    from CSV as floats) with thousands separators."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{int(value):,}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


# --- W&B -------------------------------------------------------------------------------------


def log_to_wandb(
    spec: StudySpec, result: Analysis, images: dict[str, Path], mode: str, study_url: str
) -> None:
    """One `report` run in the study's group: images, tables, headline numbers as summary."""
    import wandb

    directory = str(storage.local_path(study_url)) if storage.is_local(study_url) else None
    cfg = spec.tracking.wandb
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=spec.name,
        job_type="report",
        name=f"{spec.name}-report",
        mode=mode,
        dir=directory,
        config={"kind": result.kind, "analysis": result.summary.get("options", {})},
        settings=wandb.Settings(silent=True, console="off", disable_git=True, save_code=False),
        reinit="finish_previous",
    )
    try:
        run.log({f"report/{name}": wandb.Image(str(path)) for name, path in images.items()})
        run.log({f"table/{n}": wandb.Table(dataframe=t) for n, t in result.tables.items()})
        headline = result.summary.get("headline", {})
        run.summary.update({k: v for k, v in headline.items() if isinstance(v, (int, float, str))})
    finally:
        run.finish()
        wandb.teardown()  # stop the service now rather than at interpreter exit
