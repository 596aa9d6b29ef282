"""The report of a study without an `analysis:` section: what was run and what came out best.

Tables: the best trials by the study's metric. Figures: the loss-vs-tokens curve of every trial
(log-x) and the final loss against each searched key (log-x for log ranges and for numeric
grids spanning more than a decade; categorical keys as labelled positions). No law is fitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sandbox_service.analysis import _plots
from sandbox_service.analysis._common import METRICS, Analysis, Study, best_trials, check_metric


@dataclass(frozen=True)
class Options:
    metric: str = "val_loss"

    def __post_init__(self):
        check_metric(self.metric)


def run(study: Study, options: Options) -> Analysis:
    best = best_trials(study, options.metric)
    summary = study.base_summary("generic", options.metric)
    top = best.iloc[0].to_dict() if len(best) else None
    summary.update(
        laws={},
        chosen={"best_trial": top},
        headline=(
            {"best_trial": top["trial_id"], f"best_{options.metric}": round(top[options.metric], 4)}
            if top
            else {}
        ),
        notes=["No analysis section in the spec: tables and plots only, no law fitted."],
        skipped=[],
    )
    figures = {"curves": figure_curves(study, options)}
    if study.spec.space:
        figures["loss_vs_searched"] = figure_searched(study, options)
    return Analysis(kind="generic", summary=summary, tables={"best_trials": best}, figures=figures)


def figure_curves(study: Study, options: Options, n_named: int = 6):
    """Every trial's curve faint grey; the `n_named` best in colour, named in the legend."""
    fig, (ax,) = _plots.panels(1, title="Loss vs tokens, every trial")
    history = study.history.dropna(subset=[options.metric])
    best = list(best_trials(study, options.metric, n_named)["trial_id"])
    for trial_id, run in history.groupby("trial_id"):
        if trial_id not in best:
            ax.plot(run["tokens"], run[options.metric], color="0.6", lw=0.8, alpha=0.5)
    for color, trial_id in zip(_plots.palette(len(best), "plasma"), best, strict=True):
        run = history[history["trial_id"] == trial_id]
        final = run[options.metric].iloc[-1]
        label = f"{trial_id} ({final:.4g})"
        ax.plot(run["tokens"], run[options.metric], color=color, lw=1.8, label=label)
    ax.set_xscale("log")
    _plots.count_ticks(ax.xaxis)
    ax.set_xlabel(_plots.TOKENS_LABEL)
    ax.set_ylabel(METRICS[options.metric])
    _plots.robust_ylim(ax, history[options.metric], top_quantile=0.9)
    grey = _plots.marker(None, "other trials", ls="-", color="0.6")
    _plots.legend_outside(fig, [ax], [grey], title=f"best {len(best)} trials (final loss)")
    return fig


def figure_searched(study: Study, options: Options):
    """Final loss vs each searched key; categories in the order the spec lists them."""
    dists = list(study.spec.space)
    fig, axes = _plots.panels(len(dists), sharey=True, title="Final loss vs each searched key")
    loss = study.final(options.metric).to_numpy()
    for ax, dist in zip(axes, dists, strict=True):
        raw = study.values(dist.path)
        numeric = raw.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all()
        if numeric:
            x = raw.astype(float).to_numpy()
            ax.scatter(x, loss, s=18, color="C0")
            if _plots.is_log(dist, x):
                ax.set_xscale("log")
                _plots.number_ticks(ax.xaxis)
        else:
            _categories(ax, dist, raw, loss)
        ax.set_xlabel(_plots.axis_label(dist.path))
    axes[0].set_ylabel(METRICS[options.metric])
    _plots.robust_ylim(axes[0], loss, top_quantile=0.9)
    return fig


def _categories(ax, dist, raw, loss) -> None:
    listed = dist.kind in ("grid", "choice")
    labels = [str(v) for v in dist.args] if listed else sorted(raw.astype(str).unique())
    x = raw.astype(str).map({v: i for i, v in enumerate(labels)}).to_numpy(float)
    # A small horizontal jitter keeps the trials of one category from hiding each other.
    jitter = np.random.default_rng(0).uniform(-0.08, 0.08, len(x))
    ax.scatter(x + jitter, loss, s=18, color="C0")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.5, len(labels) - 0.5)
