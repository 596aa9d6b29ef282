"""Learning-rate transfer across width (MiniCPM study 2): does lr* stay put as the model widens?

MiniCPM (arXiv 2404.06395, wind tunnel, "Optimal Learning Rate") sweeps 6 learning rates at each
of 0.04B-0.5B and finds the optimum at ≈ 0.01 throughout under μP; under standard
parametrisation it moves with width (μTransfer, arXiv 2203.03466, Fig. 1). Here, per group (e.g.
model.parametrization) and width, the optimum is the vertex of a parabola in ln(lr) fitted to
the final losses (`laws.fit_lr_optimum`; several seeds at one lr are averaged for the argmin),
and `laws.lr_drift` fits ln lr* against ln width per group.

    analysis: {kind: lr_transfer, width_key: model.preset, lr_key: train.lr,
               group_key: model.parametrization}

Recommended base lr (`chosen.lr`): the μP group's lr* at the widest width (rule `widest`, the
width closest to the target model), or the geometric mean of its lr* over widths (rule
`geomean`, which averages out per-width noise when the drift is flat). Optima at a grid edge
are only bounds: they are skipped by both rules when an interior optimum exists.
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
    try_bootstrap,
)
from sandbox_service.laws import fit_lr_optimum, lr_drift
from trainables.dictconfig import ConfigError

GROUP_NAMES = {"mup": "μP", "sp": "SP (standard)"}
RULES = ("widest", "geomean")


@dataclass(frozen=True)
class Options:
    width_key: str = "model.preset"  # a preset (width = its d_model) or model.d_model
    lr_key: str = "train.lr"
    group_key: str | None = None  # e.g. model.parametrization: one sweep per value
    mup_group: str = "mup"  # the group whose lr* is recommended
    metric: str = "val_loss"
    window: int = 1  # grid neighbours on each side of the best lr in the parabola fit
    base_lr: str = "widest"  # widest | geomean (see the module docstring)
    n_boot: int = 200  # bootstrap resamples per width; 0 skips the intervals

    def __post_init__(self):
        check_metric(self.metric)
        if self.base_lr not in RULES:
            raise ConfigError(f"analysis.base_lr: {self.base_lr!r}; allowed: {', '.join(RULES)}")
        if self.window < 1:
            raise ConfigError(f"analysis.window: {self.window} must be >= 1")
        if self.n_boot != 0 and self.n_boot < 20:
            raise ConfigError(f"analysis.n_boot: {self.n_boot}; use 0 (off) or >= 20")


def check(options: Options, spec) -> None:
    check_searched("width_key", options.width_key, spec)
    check_searched("lr_key", options.lr_key, spec)
    check_searched("group_key", options.group_key, spec, required=False)


def sweep_points(study: Study, options: Options) -> pd.DataFrame:
    """(trial_id, group, width, lr, loss) of every finished trial; diverged trials have NaN loss."""
    # Without a group key every trial shares the base parametrisation: name the group after it.
    if options.group_key:
        group = study.values(options.group_key).astype(str)
    else:
        group = study.derived(lambda c: c.model.parametrization)
    frame = pd.DataFrame(
        {
            "trial_id": study.trials["trial_id"],
            "group": group,
            "width": study.derived(lambda c: c.model.d_model),
            "lr": study.values(options.lr_key).astype(float),
            "loss": study.final(options.metric),
        }
    )
    return frame[study.finished()].reset_index(drop=True)


def fit_widths(points: pd.DataFrame, options: Options):
    """{group: {width: (LROptimum, bootstrap or None, trial ids)}} and the sweeps that failed."""
    fits, skipped = {}, []
    for (group, width), sweep in points.groupby(["group", "width"]):
        lrs, losses = sweep["lr"].to_numpy(), sweep["loss"].to_numpy()
        try:
            fit = fit_lr_optimum(lrs, losses, window=options.window)
        except ValueError as err:
            skipped.append(f"group {group}, width {width}: {err}")
            continue
        boot = try_bootstrap(
            lambda x, y: fit_lr_optimum(x, y, window=options.window),
            lrs,
            losses,
            n=options.n_boot,
            skipped=skipped,
            what=f"group {group}, width {width}",
        )
        fits.setdefault(group, {})[int(width)] = (fit, boot, list(sweep["trial_id"]))
    return fits, skipped


def recommend(fits: dict, options: Options) -> dict | None:
    """The base lr to transfer, from the μP group (or the only group)."""
    group = options.mup_group if options.mup_group in fits else None
    if group is None and len(fits) == 1:
        group = next(iter(fits))
    if group is None:
        return None
    by_width = fits[group]
    interior = {w: f for w, (f, _, _) in by_width.items() if not f.at_edge}
    pool = interior or {w: f for w, (f, _, _) in by_width.items()}
    widest = max(pool)
    if options.base_lr == "widest":
        lr = pool[widest].lr_opt
    else:
        lr = math.exp(np.mean([math.log(f.lr_opt) for f in pool.values()]))
    return {
        "lr": lr,
        "group": group,
        "rule": options.base_lr,
        "widths_used": sorted(pool) if options.base_lr == "geomean" else [widest],
        "only_bounds": not interior,  # every optimum sat at a grid edge: extend the grid
    }


def run(study: Study, options: Options) -> Analysis:
    points = sweep_points(study, options)
    fits, skipped = fit_widths(points, options)
    drifts = {
        g: lr_drift({w: f for w, (f, _, _) in by.items()}) for g, by in fits.items() if len(by) > 1
    }
    chosen = recommend(fits, options)
    summary = study.base_summary("lr_transfer", options.metric)
    summary.update(
        laws=_laws(fits, drifts, study, options, points),
        chosen=chosen,
        headline=_headline(fits, drifts, chosen),
        notes=_notes(options),
        skipped=skipped,
    )
    return Analysis(
        kind="lr_transfer",
        summary=summary,
        tables={
            "lr_optima": _optima_table(fits),
            "best_trials": best_trials(study, options.metric),
        },
        figures={
            "loss_vs_lr": figure_sweeps(points, fits, options),
            "lr_opt_vs_width": figure_drift(fits, drifts),
        },
    )


def _laws(fits, drifts, study: Study, options: Options, points) -> dict:
    optima = {}
    for group, by_width in fits.items():
        for width, (fit, boot, ids) in by_width.items():
            law = fit.to_dict(**study.provenance(ids, options.metric, group=group, width=width))
            law["bootstrap"] = boot.to_dict() if boot else None
            optima.setdefault(group, {})[str(width)] = law
    drift = {}
    for group, law in drifts.items():
        ids = points.loc[points["group"] == group, "trial_id"]
        drift[group] = law.to_dict(**study.provenance(ids, options.metric, group=group))
    return {"lr_optimum": optima, "lr_drift": drift}


def _headline(fits, drifts, chosen) -> dict:
    out = {}
    for group, by_width in fits.items():
        for width, (fit, _, _) in sorted(by_width.items()):
            edge = "" if not fit.at_edge else f" ({fit.estimate})"
            out[f"lr_opt/{group}/width {width}{edge}"] = float(f"{fit.lr_opt:.4g}")
    for group, drift in drifts.items():
        out[f"drift_slope/{group}"] = round(drift.slope, 4)
        out[f"drift_ratio/{group}"] = round(drift.ratio, 4)
    if chosen:
        out["recommended_lr"] = chosen["lr"]
    return out


def _notes(options: Options) -> list[str]:
    return [
        f"lr* per width: vertex of a parabola in ln(lr) through the best lr and {options.window} "
        "neighbour(s) each side (MiniCPM, 'Optimal Learning Rate'); seeds at one lr "
        "are averaged; diverged trials are dropped and counted; an optimum at a grid edge is a "
        "bound (extend the grid that way).",
        "Drift: slope of ln lr* vs ln width (μP predicts ≈ 0; SP a clearly negative slope) and "
        "the max/min ratio of lr* over widths.",
        f"Recommended lr (rule '{options.base_lr}'): the μP group's lr* at the widest width "
        "('widest') or the geometric mean over widths ('geomean'); bounded optima are skipped "
        "when an interior one exists.",
    ]


def _optima_table(fits) -> pd.DataFrame:
    rows = []
    for group, by_width in fits.items():
        for width, (fit, boot, _) in sorted(by_width.items()):
            rows.append(
                {
                    "group": group,
                    "width": width,
                    "lr_opt": fit.lr_opt,
                    "ci_low": boot.low["lr_opt"] if boot else math.nan,
                    "ci_high": boot.high["lr_opt"] if boot else math.nan,
                    "estimate": fit.estimate,
                    "loss_opt": fit.loss_opt,
                    "n_points": fit.n_points,
                    "n_diverged": fit.n_diverged,
                }
            )
    return pd.DataFrame(rows)


def figure_sweeps(points: pd.DataFrame, fits: dict, options: Options):
    """Loss vs lr per width (log-x), one panel per group, shared y; vertices starred."""
    groups = sorted(points["group"].unique())
    widths = sorted(points["width"].unique())
    colors = dict(zip(widths, _plots.palette(len(widths)), strict=True))
    fig, axes = _plots.panels(len(groups), sharey=True, title="Final loss vs learning rate")
    means = points.groupby(["group", "width", "lr"])["loss"].mean()
    for ax, group in zip(axes, groups, strict=True):
        for width in widths:
            _plot_sweep(ax, points, means, fits, group, width, colors[width])
        ax.set_xscale("log")
        _plots.number_ticks(ax.xaxis)
        ax.set_xlabel(_plots.LR_LABEL)
        ax.set_title(GROUP_NAMES.get(group, group))
    axes[0].set_ylabel(METRICS[options.metric])
    _plots.robust_ylim(axes[0], means.to_numpy(), top_quantile=0.9)
    keys = [
        _plots.marker("*", "parabola vertex (lr*)", ms=12),
        _plots.marker("^", "optimum at grid edge", mfc="none"),
        _plots.marker("x", "diverged (at top)"),
    ]
    _plots.legend_outside(fig, axes, keys, title="width (d_model)")
    return fig


def _plot_sweep(ax, points, means, fits, group, width, color) -> None:
    sweep = points[(points["group"] == group) & (points["width"] == width)]
    if sweep.empty:
        return
    curve = means.loc[(group, width)]
    ax.plot(curve.index, curve.values, "o-", color=color, ms=4, label=str(width))
    ax.scatter(sweep["lr"], sweep["loss"], s=8, color=color, alpha=0.35)
    bad = sweep.loc[~np.isfinite(sweep["loss"]), "lr"]
    ax.scatter(
        bad, np.full(len(bad), 0.97), marker="x", color=color, transform=ax.get_xaxis_transform()
    )
    fit = fits.get(group, {}).get(int(width), (None,))[0]
    if fit is None:
        return
    if fit.at_edge:
        ax.plot([fit.lr_opt], [fit.loss_opt], "^", mfc="none", mec=color, ms=11, mew=1.5)
        return
    x = np.geomspace(min(fit.lrs_used), max(fit.lrs_used), 50)
    y = fit.curvature * (np.log(x) - math.log(fit.lr_opt)) ** 2 + fit.loss_opt
    ax.plot(x, y, "--", color=color, lw=1)
    ax.plot([fit.lr_opt], [fit.loss_opt], "*", color=color, mec="black", mew=0.6, ms=13)


def figure_drift(fits: dict, drifts: dict):
    """lr* vs width per group on log-log axes, bootstrap intervals, the drift line."""
    fig, (ax,) = _plots.panels(1, title="Optimal learning rate vs width")
    for i, (group, by_width) in enumerate(sorted(fits.items())):
        color = f"C{i}"
        widths = np.array(sorted(by_width), dtype=float)
        opts = np.array([by_width[w][0].lr_opt for w in sorted(by_width)])
        edge = np.array([by_width[w][0].at_edge for w in sorted(by_width)])
        low, high = _intervals(by_width, opts)
        ax.errorbar(
            widths, opts, yerr=[opts - low, high - opts], fmt="none", ecolor=color, capsize=3
        )
        ax.plot(widths[~edge], opts[~edge], "o", color=color, ms=7)
        ax.plot(widths[edge], opts[edge], "^", mfc="none", mec=color, ms=9)
        label = GROUP_NAMES.get(group, group)
        if group in drifts:
            d = drifts[group]
            line = np.exp(np.polyval([d.slope, _intercept(d)], np.log(widths)))
            label += f": slope {d.slope:+.2f}, max/min {d.ratio:.2f}"
            ax.plot(widths, line, "--", color=color, lw=1.2)
        ax.plot([], [], "o--", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    all_widths = sorted({w for by_width in fits.values() for w in by_width})
    _plots.fixed_ticks(ax.xaxis, all_widths)
    _plots.number_ticks(ax.yaxis)
    ax.set_xlabel("width (d_model)")
    ax.set_ylabel(f"optimal {_plots.LR_LABEL}")
    keys = [
        _plots.marker("|", "bootstrap 95% interval", ms=12),
        _plots.marker("^", "grid-edge bound", mfc="none"),
    ]
    _plots.legend_outside(fig, [ax], keys)
    return fig


def _intervals(by_width: dict, opts: np.ndarray):
    boots = [by_width[w][1] for w in sorted(by_width)]
    low = np.array([b.low["lr_opt"] if b else o for b, o in zip(boots, opts, strict=True)])
    high = np.array([b.high["lr_opt"] if b else o for b, o in zip(boots, opts, strict=True)])
    return np.minimum(low, opts), np.maximum(high, opts)


def _intercept(drift) -> float:
    """The least-squares intercept of ln lr* on ln width: mean(ln lr* − slope·ln width)."""
    x, y = np.log(drift.widths), np.log(drift.lr_opts)
    return float(np.mean(y - drift.slope * x))
