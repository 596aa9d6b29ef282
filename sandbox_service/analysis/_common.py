"""What every analysis shares: the result record, the study's tables read as typed data, provenance.

A study's `trials.csv` holds one row per trial with its searched values as `config/a/b` columns;
`history.csv` holds every evaluation. `Study` wraps both with the spec so an analysis asks for
"final val_loss by trial" or "the trial's model config" instead of parsing columns itself.
Diverged trials report the chance loss ln(V) (trainables.trainer), which is not a loss the model
reached: every metric of a diverged trial or evaluation reads as NaN here, and the law fits drop
or count NaNs explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sandbox_service.laws import bootstrap
from sandbox_service.spec import set_path
from trainables.dictconfig import ConfigError
from trainables.trial import TrialConfig, parse_trial_config

METRICS = {
    "val_loss": "validation loss (nats/token)",
    "val_bpb": "validation loss (bits per byte)",
    "train_loss": "training loss (nats/token)",
}
USABLE = ("completed", "stopped", "diverged")  # `error` rows carry no trustworthy metrics


@dataclass(frozen=True)
class Analysis:
    """An analysis result: `summary` is JSON-ready (laws with provenance, chosen values,
    `headline` numbers and `notes` on method); tables and figures go into the report."""

    kind: str
    summary: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib Figure


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(
            f"analysis.metric: {metric!r} is not a metric; allowed: {', '.join(METRICS)}"
        )


def check_searched(key: str, value: str | None, spec, *, required: bool = True) -> None:
    """`analysis.<key>` must name a searched dotted key of the spec (e.g. train.lr)."""
    searched = [d.path for d in spec.space]
    if value is None and not required:
        return
    if value not in searched:
        raise ConfigError(
            f"analysis.{key}: {value!r} is not searched by this study; "
            f"searched keys: {', '.join(searched) or 'none'}"
        )


def column(path: str) -> str:
    """The trials.csv column of a searched dotted key: train.lr -> config/train/lr."""
    return "config/" + path.replace(".", "/")


def truthy(values: pd.Series) -> pd.Series:
    """CSV booleans read back as bool, str or NaN; True only for a true value."""
    return values.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))


def plain(value: Any) -> Any:
    """numpy scalars as Python ones (the config parser and JSON accept only plain types)."""
    return value.item() if hasattr(value, "item") else value


class Study:
    """The spec plus its trials and history, filtered to usable rows, with per-trial configs."""

    def __init__(
        self, spec, trials: pd.DataFrame, history: pd.DataFrame, *, fingerprint: str | None = None
    ):
        self.spec = spec
        self.fingerprint = fingerprint or spec.fingerprint()
        self.trials = trials[trials["status"].isin(USABLE)].reset_index(drop=True)
        self.n_errors = int(len(trials) - len(self.trials))
        self.history = self._clean_history(history)
        self._configs: dict[tuple, TrialConfig] = {}

    def _clean_history(self, history: pd.DataFrame) -> pd.DataFrame:
        if not len(history):
            return history
        keep = history["trial_id"].isin(set(self.trials["trial_id"]))
        frame = history[keep].copy()
        if "diverged" in frame:
            bad = truthy(frame["diverged"])
            frame.loc[bad, [m for m in METRICS if m in frame]] = math.nan
        # A resumed trial may report a step twice: keep the last report of each step.
        frame = frame.drop_duplicates(["trial_id", "tokens"], keep="last")
        return frame.sort_values(["trial_id", "tokens"]).reset_index(drop=True)

    def final(self, metric: str) -> pd.Series:
        """Each usable trial's last value of `metric`; NaN for diverged trials."""
        values = pd.to_numeric(self.trials[metric], errors="coerce").astype(float)
        return values.where(self.trials["status"] != "diverged", math.nan)

    def finished(self) -> pd.Series:
        """Trials that ran their whole budget or diverged; a scheduler's stopped trials ran
        fewer tokens, so their final loss does not compare with the others'."""
        return self.trials["status"].isin(("completed", "diverged"))

    def values(self, path: str) -> pd.Series:
        return self.trials[column(path)].map(plain)

    def config(self, row: pd.Series) -> TrialConfig:
        """The typed config a trial ran with: the spec's base config plus its searched values."""
        searched = tuple((d.path, plain(row[column(d.path)])) for d in self.spec.space)
        if searched not in self._configs:
            config = self.spec.base_config()
            for path, value in searched:
                set_path(config, path, value)
            self._configs[searched] = parse_trial_config(config)
        return self._configs[searched]

    def derived(self, fn) -> pd.Series:
        """`fn(TrialConfig)` for every usable trial (widths, tokens per step, parameters)."""
        return self.trials.apply(lambda row: fn(self.config(row)), axis=1)

    def provenance(self, trial_ids, metric: str, **extra) -> dict:
        return {
            "study": self.spec.name,
            "fingerprint": self.fingerprint,
            "metric": metric,
            "trial_ids": sorted(str(t) for t in trial_ids),
            **extra,
        }

    def base_summary(self, kind: str, metric: str) -> dict:
        counts = self.trials["status"].value_counts().to_dict()
        return {
            "kind": kind,
            "study": self.spec.name,
            "fingerprint": self.fingerprint,
            "question": self.spec.question,
            "metric": metric,
            "metric_label": METRICS[metric],
            "n_trials": int(len(self.trials)) + self.n_errors,
            "counts": {**{k: int(v) for k, v in counts.items()}, "error": self.n_errors},
        }


def try_bootstrap(fit_fn, *arrays, n: int, skipped: list, what: str):
    """The bootstrap of a law fit (seed 0), or None when `n` is 0 or too few resamples fit
    (then the reason goes to `skipped`, and the law is reported without an interval)."""
    if not n:
        return None
    try:
        return bootstrap(fit_fn, *arrays, n=n, seed=0)
    except ValueError as err:
        skipped.append(f"{what}: no bootstrap interval ({err})")
        return None


def best_trials(study: Study, metric: str, n: int = 10) -> pd.DataFrame:
    """The n best non-diverged trials by final `metric`, with their searched values."""
    frame = study.trials.assign(**{metric: study.final(metric)})
    frame = frame[np.isfinite(frame[metric])].sort_values(metric).head(n)
    cols = ["trial_id", "status", *[column(d.path) for d in study.spec.space], metric, "tokens"]
    frame = frame[[c for c in cols if c in frame]]
    return frame.rename(columns={column(d.path): d.path for d in study.spec.space})
