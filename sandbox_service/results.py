"""Turn a finished Tune run into the study's tables and summary.

- `trials.csv`: one row per trial: its searched config (`config/...` columns), its last metrics
  and a status (`completed`, `stopped` by the scheduler, `diverged`, `error`);
- `history.csv`: every report of every trial (the loss-vs-tokens curves the analyses fit);
- `summary.json`: the best trial (by the study's metric, among completed, non-diverged trials),
  its config and value, counts by status and the wall time.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import pandas as pd

from sandbox_service import storage
from sandbox_service.spec import StudySpec

KEEP = (
    "step",
    "own_tokens",
    "own_flops",
    "tokens",
    "flops",
    "train_loss",
    "val_loss",
    "val_bpb",
    "lr",
    "tokens_per_s",
    "elapsed_s",
    "progress",
    "diverged",
    "completed",
)


def tune_trials(grid) -> list:
    """Tune's Trial objects behind a ResultGrid, in the grid's order (they carry the status)."""
    return list(grid._experiment_analysis.trials)


def trial_status(metrics: dict, error: Exception | None) -> str:
    if error is not None:
        return "error"
    if metrics.get("diverged"):
        return "diverged"
    return "completed" if metrics.get("completed") else "stopped"


def searched_columns(spec: StudySpec) -> list[str]:
    return [f"config/{d.path.replace('.', '/')}" for d in spec.space]


def tables(grids, spec: StudySpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) frames from the ResultGrids of a study's phases."""
    rows, curves = [], []
    for grid in grids:
        for result, trial in zip(grid, tune_trials(grid), strict=True):
            metrics = result.metrics or {}
            row = {"trial_id": trial.trial_id, "status": trial_status(metrics, result.error)}
            row.update(_flat_config(result.config or {}, spec))
            row.update({k: metrics.get(k) for k in KEEP})
            if result.error is not None:
                row["error"] = str(result.error).splitlines()[0][:300]
            rows.append(row)
            frame = result.metrics_dataframe
            if frame is not None and len(frame):
                keep = [c for c in KEEP if c in frame.columns]
                curves.append(frame[keep].assign(trial_id=trial.trial_id))
    history = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=KEEP)
    return pd.DataFrame(rows), history


def _flat_config(config: dict, spec: StudySpec) -> dict:
    """The searched values of one trial as `config/a/b` columns (the rest is in spec.yaml), and
    for a branched trial its `branch/...` columns (phase, stable trial and step, decay)."""
    config = config.get("variant", config)
    out = {}
    for dist in spec.space:
        node = config
        for key in dist.path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        out[f"config/{dist.path.replace('.', '/')}"] = node
    branch = config.get("branch")
    if spec.branching is not None:
        branch = branch or {"phase": "stable"}
    out.update({f"branch/{k}": v for k, v in (branch or {}).items()})
    return out


def summarize(trials: pd.DataFrame, spec: StudySpec, wall_time_s: float) -> dict:
    metric, mode = spec.search.metric, spec.search.mode
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    ok = trials[trials["status"] == "completed"] if len(trials) else trials
    ok = ok[ok[metric].map(lambda v: v is not None and math.isfinite(v))] if len(ok) else ok
    best = None
    if len(ok):
        row = ok.loc[ok[metric].idxmin() if mode == "min" else ok[metric].idxmax()]
        best = {
            "trial_id": row["trial_id"],
            metric: float(row[metric]),
            "config": {
                c[len("config/") :].replace("/", "."): _plain(row[c])
                for c in searched_columns(spec)
            },
        }
    unfinished = counts.get("error", 0)
    return {
        "study": spec.name,
        "question": spec.question,
        "status": "complete" if not unfinished else "complete-with-errors",
        "metric": metric,
        "mode": mode,
        "n_trials": int(len(trials)),
        "counts": {k: int(v) for k, v in counts.items()},
        "best": best,
        "wall_time_s": round(wall_time_s, 2),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def write(grids, spec: StudySpec, url: str, wall_time_s: float) -> dict:
    """Write the tables, then summary.json last: a study has a summary only when its tables are
    whole. A write that fails (StorageError) leaves no summary, not even a previous run's."""
    trials, history = tables(grids, spec)
    summary = summarize(trials, spec, wall_time_s)
    storage.remove(storage.join(url, "summary.json"))
    storage.write_text(storage.join(url, "trials.csv"), trials.to_csv(index=False))
    storage.write_text(storage.join(url, "history.csv"), history.to_csv(index=False))
    storage.write_text(storage.join(url, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def read_summary(url: str) -> dict | None:
    path = storage.join(url, "summary.json")
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def read_table(url: str, name: str = "trials.csv") -> pd.DataFrame:
    return pd.read_csv(storage.join(url, name))  # pandas reads fsspec URLs itself
