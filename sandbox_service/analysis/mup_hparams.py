"""μP hyper-parameter search (MiniCPM study 1): the best config and how much each parameter matters.

MiniCPM (arXiv 2404.06395, wind tunnel, "Hyper-parameters") runs ~400 Bayesian-search trials on
the 0.009B model over scale_emb, scale_depth, init_std and lr, and keeps scale_emb 12,
scale_depth 1.4, init_std 0.1, lr 0.01. This analysis reads a TPE (hyperopt) or random study:

    analysis: {kind: mup_hparams}             # every searched key; or keys: [train.lr, ...]

Sensitivity (`sensitivity` per parameter, loss units): split the parameter's searched range into
`n_bins` equal bins (in log space for log-uniform ranges), take the best loss reached in each
bin, and report the spread max − min of those bin-bests. It answers "how much loss do I lose by
setting this parameter badly while tuning the rest", is robust to TPE's uneven sampling (each
bin counts once, however many trials it holds), and needs no model. Bins with fewer than 2
finite trials are ignored. `top_band` is the [min, max] of the parameter over the best
`top_fraction` of trials: the range a transfer can trust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sandbox_service.analysis import _plots
from sandbox_service.analysis._common import (
    METRICS,
    Analysis,
    Study,
    best_trials,
    check_metric,
    check_searched,
    column,
    plain,
)
from trainables.dictconfig import ConfigError

NOTE = (
    "Sensitivity: the parameter's searched range is cut into {n_bins} equal bins (log bins for "
    "log ranges); the best loss in each bin (>= 2 finite trials) is taken, and the spread max - "
    "min of these bin-bests is the loss lost by setting the parameter badly while the others "
    "are tuned. Top band: the parameter's range over the best {top:.0%} of trials. Trial index "
    "is the order of trials.csv (the searcher's order)."
)


@dataclass(frozen=True)
class Options:
    keys: tuple[str, ...] = ()  # searched keys to analyse; empty: every numeric searched key
    metric: str = "val_loss"
    top_fraction: float = 0.1
    n_bins: int = 6

    def __post_init__(self):
        check_metric(self.metric)
        if not 0 < self.top_fraction <= 0.5:
            raise ConfigError(f"analysis.top_fraction: {self.top_fraction} must be in (0, 0.5]")
        if not 2 <= self.n_bins <= 50:
            raise ConfigError(f"analysis.n_bins: {self.n_bins} must be in 2..50")


def check(options: Options, spec) -> None:
    dists = {d.path: d for d in spec.space}
    for i, key in enumerate(options.keys):
        check_searched(f"keys[{i}]", key, spec)
        if not numeric(dists[key]):
            raise ConfigError(
                f"analysis.keys[{i}]: {key!r} takes non-numeric values {list(dists[key].args)}; "
                "the marginal plots and sensitivity need numbers"
            )


def numeric(dist) -> bool:
    """Ranges are numeric; a grid or choice is when every value is a number."""
    if dist.kind not in ("grid", "choice"):
        return True
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dist.args)


def parameters(study: Study, options: Options) -> list:
    """The Distributions analysed: the listed keys, or every numeric searched key."""
    dists = {d.path: d for d in study.spec.space}
    if options.keys:
        return [dists[k] for k in options.keys]
    return [d for d in dists.values() if numeric(d)]


def sensitivity(x: np.ndarray, loss: np.ndarray, log: bool, n_bins: int) -> float:
    """Spread of the per-bin best loss across equal (log-)bins of x (see the module docstring)."""
    ok = np.isfinite(loss)
    u = np.log(x) if log else x
    if u.max() == u.min():
        return math.nan
    edges = np.linspace(u.min(), u.max(), n_bins + 1)
    which = np.clip(np.digitize(u, edges[1:-1]), 0, n_bins - 1)
    bests = [loss[ok & (which == b)].min() for b in range(n_bins) if (ok & (which == b)).sum() >= 2]
    return float(max(bests) - min(bests)) if len(bests) >= 2 else math.nan


def run(study: Study, options: Options) -> Analysis:
    frame = study.trials.assign(loss=study.final(options.metric))[study.finished()]
    frame = frame.reset_index(drop=True)
    finite = np.isfinite(frame["loss"].to_numpy())
    if not finite.any():
        raise ValueError(f"mup_hparams: no trial has a finite final {options.metric}")
    best = frame.loc[frame["loss"].idxmin()]
    dists = parameters(study, options)
    table = _sensitivity_table(frame, dists, options, best)
    summary = study.base_summary("mup_hparams", options.metric)
    best_config = {d.path: plain(best[column(d.path)]) for d in study.spec.space}
    summary.update(
        laws={},
        chosen={
            "trial_id": str(best["trial_id"]),
            "loss": float(best["loss"]),
            "config": best_config,
        },
        sensitivity={row["key"]: _row_summary(row) for row in table.to_dict("records")},
        provenance=study.provenance(frame["trial_id"], options.metric),
        headline=_headline(best, best_config, table, options),
        notes=[NOTE.format(n_bins=options.n_bins, top=options.top_fraction)],
        skipped=[],
    )
    return Analysis(
        kind="mup_hparams",
        summary=summary,
        tables={"sensitivity": table, "best_trials": best_trials(study, options.metric)},
        figures={
            "marginals": figure_marginals(frame, dists, best, options),
            "convergence": figure_convergence(frame, options),
        },
    )


def _sensitivity_table(frame, dists, options: Options, best) -> pd.DataFrame:
    loss = frame["loss"].to_numpy()
    top = frame[np.isfinite(loss)].nsmallest(
        max(2, math.ceil(options.top_fraction * len(frame))), "loss"
    )
    rows = []
    for d in dists:
        x = frame[column(d.path)].astype(float).to_numpy()
        log = _plots.is_log(d, x)
        band = top[column(d.path)].astype(float)
        rows.append(
            {
                "key": d.path,
                "best": float(best[column(d.path)]),
                "top_band_low": float(band.min()),
                "top_band_high": float(band.max()),
                "sensitivity": sensitivity(x, loss, log, options.n_bins),
                "log_scale": log,
            }
        )
    return pd.DataFrame(rows).sort_values("sensitivity", ascending=False, na_position="last")


def _row_summary(row: dict) -> dict:
    return {
        "best": row["best"],
        "top_band": [row["top_band_low"], row["top_band_high"]],
        "sensitivity": row["sensitivity"],
        "log_scale": bool(row["log_scale"]),
    }


def _headline(best, best_config, table, options: Options) -> dict:
    out = {
        "best_trial": str(best["trial_id"]),
        f"best_{options.metric}": round(float(best["loss"]), 4),
    }
    out.update({f"best/{k}": v for k, v in best_config.items()})
    for row in table.to_dict("records"):
        out[f"sensitivity/{row['key']}"] = round(row["sensitivity"], 4)
    return out


def figure_marginals(frame: pd.DataFrame, dists, best, options: Options):
    """Final loss vs each parameter, coloured by trial order; best starred, diverged marked."""
    fig, axes = _plots.panels(
        max(len(dists), 1), sharey=True, title="Final loss vs each searched parameter"
    )
    loss = frame["loss"].to_numpy()
    order = np.arange(len(frame))
    for ax, d in zip(axes, dists, strict=False):
        x = frame[column(d.path)].astype(float).to_numpy()
        ok = np.isfinite(loss)
        points = ax.scatter(x[ok], loss[ok], c=order[ok], cmap="viridis", s=16, alpha=0.8)
        ax.scatter(
            x[~ok],
            np.full((~ok).sum(), 0.97),
            marker="x",
            color="crimson",
            transform=ax.get_xaxis_transform(),
            label="diverged (at top)",
        )
        ax.plot(
            [float(best[column(d.path)])],
            [float(best["loss"])],
            "*",
            color="red",
            mec="black",
            ms=15,
            label="best",
        )
        if _plots.is_log(d, x):
            ax.set_xscale("log")
            _plots.number_ticks(ax.xaxis)
        ax.set_xlabel(_plots.axis_label(d.path))
    axes[0].set_ylabel(METRICS[options.metric])
    _plots.robust_ylim(axes[0], loss, top_quantile=0.75)
    if dists:
        fig.colorbar(points, ax=axes, label="trial index (search order)", shrink=0.8)
    _plots.legend_outside(fig, axes)
    return fig


def figure_convergence(frame: pd.DataFrame, options: Options):
    """Each trial's loss in search order and the best so far: has the search settled?"""
    fig, (ax,) = _plots.panels(1, title="Search convergence")
    loss = frame["loss"].to_numpy()
    order = np.arange(1, len(frame) + 1)
    best_so_far = np.fmin.accumulate(np.where(np.isfinite(loss), loss, np.inf))
    ax.scatter(order, loss, s=10, color="0.55", alpha=0.7, label="trial")
    ax.step(
        order,
        np.where(np.isfinite(best_so_far), best_so_far, np.nan),
        where="post",
        color="C3",
        lw=2,
        label="best so far",
    )
    ax.set_xlabel("trial index (search order)")
    ax.set_ylabel(METRICS[options.metric])
    _plots.robust_ylim(ax, loss, top_quantile=0.9)
    ax.legend(fontsize=8)
    return fig
