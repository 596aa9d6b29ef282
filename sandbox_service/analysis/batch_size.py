"""The batch-size law (MiniCPM study 3): which batch reaches a loss with the fewest tokens.

MiniCPM (arXiv 2404.06395, wind tunnel, "Optimal Batch Size") trains 6 batch sizes at each of
three model sizes, reads off for each loss the batch size reaching it with the fewest tokens,
and fits across sizes bs_tokens = a / L^b (1.2110e9 / L^6.2393 with L the C4 loss). Here:

    analysis: {kind: batch_size, bs_key: train.batch_size, target_loss: 3.0}

Sizes are the distinct model shapes of the trials (non-embedding parameters), batch sizes are
tokens per step (batch_size × seq_len) from each trial's config, and the curves are
history.csv's evaluations (seeds of one size and batch averaged at equal tokens). Target losses
per size: `target_losses` if given, else `n_targets` evenly spaced from the worst loss that every
run of the size reaches (so each target has a full grid) down towards the best final loss (the
best end itself is left out: only one run reaches it, an edge by construction).

Which optima enter the law (`fit_points`): `refined` (default) those placed by the parabola
through the best batch and its two neighbours, accurate to the curves' resolution; `interior`
also best grid batches whose neighbours did not reach the loss (off by up to a grid step);
`all` also optima at a grid edge, which are only bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib
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
from sandbox_service.laws import fit_bs_law, optimal_batch_for_loss, predict_bs
from trainables.dictconfig import ConfigError
from trainables.shapes import non_embedding_params

PAPER_A, PAPER_B = 1.2110e9, 6.2393  # MiniCPM's law; its L is the C4 loss, not this study's
FIT_POINTS = ("refined", "interior", "all")


@dataclass(frozen=True)
class Options:
    bs_key: str = "train.batch_size"
    metric: str = "val_loss"
    target_losses: tuple[float, ...] = ()  # empty: n_targets automatic targets per size
    n_targets: int = 6
    target_loss: float | None = None  # predict the optimal batch at this loss
    fit_points: str = "refined"  # refined | interior | all (see the module docstring)
    paper_reference: bool = False  # draw MiniCPM's C4 law on the law figure
    n_boot: int = 200

    def __post_init__(self):
        check_metric(self.metric)
        if not 2 <= self.n_targets <= 50:
            raise ConfigError(f"analysis.n_targets: {self.n_targets} must be in 2..50")
        if any(not t > 0 for t in self.target_losses):
            raise ConfigError(f"analysis.target_losses: {list(self.target_losses)} must be > 0")
        if self.target_loss is not None and not self.target_loss > 0:
            raise ConfigError(f"analysis.target_loss: {self.target_loss} must be > 0")
        if self.fit_points not in FIT_POINTS:
            raise ConfigError(
                f"analysis.fit_points: {self.fit_points!r}; allowed: {', '.join(FIT_POINTS)}"
            )
        if self.n_boot != 0 and self.n_boot < 20:
            raise ConfigError(f"analysis.n_boot: {self.n_boot}; use 0 (off) or >= 20")


def check(options: Options, spec) -> None:
    check_searched("bs_key", options.bs_key, spec)


def curves(study: Study, metric: str) -> dict:
    """{size N: {batch_tokens: (tokens, losses)}} from history, seeds averaged at equal tokens."""
    trials = study.trials.assign(
        size=study.derived(lambda c: non_embedding_params(c.model)),
        bs=study.derived(lambda c: c.train.tokens_per_step),
    )[["trial_id", "size", "bs"]]
    frame = study.history.merge(trials, on="trial_id").dropna(subset=[metric])
    out: dict = {}
    for (size, bs), runs in frame.groupby(["size", "bs"]):
        mean = runs.groupby("tokens")[metric].mean().sort_index()
        mean = mean[mean.index > 0]
        out.setdefault(int(size), {})[float(bs)] = (mean.index.to_numpy(float), mean.to_numpy())
    return out


def auto_targets(by_bs: dict, n: int) -> np.ndarray:
    """Evenly spaced losses from the worst loss every run reaches towards the best final loss."""
    reached_by_all = max(float(np.min(loss)) for _, loss in by_bs.values())
    best_final = min(float(loss[-1]) for _, loss in by_bs.values())
    if not reached_by_all > best_final:
        return np.array([reached_by_all])
    return np.linspace(reached_by_all, best_final, n + 1)[:-1]


def optima(by_size: dict, options: Options) -> tuple[list, list]:
    """BatchOptimum records (with their size) for every size and target, and what was skipped."""
    found, skipped = [], []
    for size, by_bs in sorted(by_size.items()):
        if len(by_bs) < 2:
            skipped.append(f"size {size:,}: one batch size only, no optimum to find")
            continue
        targets = options.target_losses or auto_targets(by_bs, options.n_targets)
        for target in targets:
            try:
                found.append((size, optimal_batch_for_loss(by_bs, float(target))))
            except ValueError as err:
                skipped.append(f"size {size:,}, loss {target:.4g}: {err}")
    return found, skipped


def fit_law(found: list, options: Options, skipped: list):
    """(law, bootstrap, points used) from the pooled optima; ValueError when too few points."""
    used = [(s, o) for s, o in found if _fitted(o, options.fit_points)]
    losses = np.array([o.target_loss for _, o in used])
    bs = np.array([o.batch_tokens_opt for _, o in used])
    law = fit_bs_law(losses, bs)
    fit = lambda x, y: _law_params(x, y, options)
    boot = try_bootstrap(fit, losses, bs, n=options.n_boot, skipped=skipped, what="bs law")
    return law, boot, used


def _fitted(optimum, fit_points: str) -> bool:
    if fit_points == "all":
        return True
    return not optimum.at_edge if fit_points == "interior" else optimum.refined


def _law_params(losses, bs, options: Options) -> dict:
    law = fit_bs_law(losses, bs)
    params = law.params()
    if options.target_loss is not None:
        params["bs_at_target"] = predict_bs(law, options.target_loss)
    return params


def run(study: Study, options: Options) -> Analysis:
    by_size = curves(study, options.metric)
    found, skipped = optima(by_size, options)
    law = boot = None
    used: list = []
    try:
        law, boot, used = fit_law(found, options, skipped)
    except ValueError as err:
        skipped.append(f"batch-size law: {err}")
    summary = study.base_summary("batch_size", options.metric)
    summary.update(
        laws=_laws(study, options, law, boot, used, found),
        chosen=_chosen(law, boot, options),
        headline=_headline(law, boot, options, found, used),
        notes=_notes(options),
        skipped=skipped,
    )
    return Analysis(
        kind="batch_size",
        summary=summary,
        tables={
            "batch_optima": _optima_table(found, used),
            "best_trials": best_trials(study, options.metric),
        },
        figures={
            "loss_vs_tokens": figure_curves(by_size, found, options),
            "tokens_to_target": figure_tokens_to_target(found),
            "bs_law": figure_law(found, used, law, options),
        },
    )


def _laws(study: Study, options: Options, law, boot, used, found) -> dict:
    prov = study.provenance(study.trials["trial_id"], options.metric)
    out = {"batch_optima": [{**o.to_dict(), "size": s} for s, o in found]}
    if law is not None:
        points = [
            {"size": s, "loss": o.target_loss, "batch_tokens": o.batch_tokens_opt} for s, o in used
        ]
        out["batch_size_law"] = {
            **law.to_dict(**prov, points=points),
            "bootstrap": boot.to_dict() if boot else None,
        }
    return out


def _chosen(law, boot, options: Options) -> dict:
    if law is None:
        return {}
    out = {"a": law.a, "b": law.b}
    if options.target_loss is not None:
        out["target_loss"] = options.target_loss
        out["batch_tokens_at_target"] = predict_bs(law, options.target_loss)
        if boot:
            out["batch_tokens_interval"] = [boot.low["bs_at_target"], boot.high["bs_at_target"]]
        lo, hi = law.loss_range
        out["extrapolated"] = not lo <= options.target_loss <= hi
    return out


def _headline(law, boot, options: Options, found, used) -> dict:
    out = {"optima_found": len(found), "optima_in_fit": len(used)}
    if law is None:
        return out
    out.update(
        {
            "bs_law/a": float(f"{law.a:.4g}"),
            "bs_law/b": round(law.b, 4),
            "bs_law/r2": round(law.r2, 4),
        }
    )
    if boot:
        out["bs_law/b 95% interval"] = f"[{boot.low['b']:.3g}, {boot.high['b']:.3g}]"
    if options.target_loss is not None:
        out[f"bs_tokens at loss {options.target_loss:g}"] = round(
            predict_bs(law, options.target_loss)
        )
    return out


def _notes(options: Options) -> list[str]:
    notes = [
        "For each size and target loss, the batch (tokens per step) reaching the loss with the "
        "fewest tokens: tokens-to-target per batch read off the running-minimum loss curve, "
        "refined by a parabola in (ln bs, ln tokens) through the best batch and its neighbours "
        "(MiniCPM, 'Optimal Batch Size'). Objective: fewest tokens, not fewest steps.",
        "Law: least squares of ln bs on ln L over the optima pooled across sizes, using "
        f"'{options.fit_points}' optima (refined: parabola-placed; interior: also unrefined grid "
        "points; all: also grid-edge bounds).",
    ]
    if options.paper_reference:
        notes.append(
            "The MiniCPM law 1.2110e9 / L^6.2393 is drawn for reference only: its L is the C4 "
            "loss of the paper's tokenizer and data, not this study's loss."
        )
    return notes


def _optima_table(found, used) -> pd.DataFrame:
    in_fit = {id(o) for _, o in used}
    rows = [
        {
            "size (non-emb params)": s,
            "target_loss": o.target_loss,
            "batch_tokens_opt": o.batch_tokens_opt,
            "tokens_to_target": o.tokens_opt,
            "estimate": o.estimate,
            "refined": o.refined,
            "in_fit": id(o) in in_fit,
        }
        for s, o in found
    ]
    return pd.DataFrame(rows)


def figure_curves(by_size: dict, found, options: Options):
    """Loss vs tokens per batch size (log-x), one panel per size; target losses dotted."""
    sizes = sorted(by_size)
    fig, axes = _plots.panels(
        max(len(sizes), 1), sharey=True, title="Loss vs tokens per batch size"
    )
    all_bs = sorted({bs for s in sizes for bs in by_size[s]})
    colors = dict(zip(all_bs, _plots.palette(len(all_bs), "plasma"), strict=True))
    losses = []
    for ax, size in zip(axes, sizes, strict=False):
        for bs, (tokens, loss) in sorted(by_size[size].items()):
            ax.plot(tokens, loss, color=colors[bs], lw=1.4, label=f"{bs:,.0f}")
            losses.extend(loss)
        for target in sorted({o.target_loss for s, o in found if s == size}):
            ax.axhline(target, color="0.5", ls=":", lw=0.8)
        ax.set_xscale("log")
        _plots.count_ticks(ax.xaxis)
        ax.set_xlabel(_plots.TOKENS_LABEL)
        ax.set_title(f"{_plots.count(size)} non-embedding parameters")
    axes[0].set_ylabel(METRICS[options.metric])
    _plots.robust_ylim(axes[0], losses, top_quantile=0.7)
    target_key = _plots.marker(None, "target losses", ls=":", color="0.5")
    _plots.legend_outside(fig, axes, [target_key], title="batch (tokens/step)")
    return fig


def figure_tokens_to_target(found):
    """Tokens needed to reach each target vs batch size, per size: the optimum is the valley."""
    sizes = sorted({s for s, _ in found})
    title = "Tokens to reach a loss vs batch size (★ optimum, △ at a grid edge)"
    fig, axes = _plots.panels(max(len(sizes), 1), title=title)
    targets = [o.target_loss for _, o in found] or [0.0, 1.0]
    norm = matplotlib.colors.Normalize(min(targets), max(targets))
    cmap = matplotlib.colormaps["viridis"]
    for ax, size in zip(axes, sizes, strict=False):
        mine = [o for s, o in found if s == size]
        for o in mine:
            color = cmap(norm(o.target_loss))
            need = np.array([math.nan if t is None else t for t in o.tokens_to_target])
            ax.plot(o.batch_tokens, need, "o-", color=color, ms=3, lw=1)
            marker = "*" if not o.at_edge else "^"
            ax.plot([o.batch_tokens_opt], [o.tokens_opt], marker, color=color, mec="black", ms=11)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plots.fixed_ticks(ax.xaxis, mine[0].batch_tokens, lambda v: f"{v:,.0f}")
        _plots.count_ticks(ax.yaxis)
        ax.set_xlabel("batch size (tokens per step)")
        ax.set_title(f"{_plots.count(size)} non-embedding parameters")
    axes[0].set_ylabel(f"{_plots.TOKENS_LABEL} to reach the target")
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=axes, label="target loss", shrink=0.9)
    return fig


def figure_law(found, used, law, options: Options):
    """Optimal batch vs target loss on log-log axes with the fitted law; with
    `paper_reference`, a second panel adds MiniCPM's C4 law on axes wide enough for both."""
    n = 2 if options.paper_reference else 1
    fig, axes = _plots.panels(n, title="Optimal batch size vs loss")
    losses = [o.target_loss for _, o in found] + (
        [options.target_loss] if options.target_loss else []
    )
    grid = np.geomspace(min(losses) * 0.97, max(losses) * 1.03, 100) if losses else None
    for ax in axes:
        _draw_law(ax, found, used, law, grid, options)
    if options.paper_reference and grid is not None:
        axes[1].plot(
            grid,
            PAPER_A / grid**PAPER_B,
            "--",
            color="0.5",
            label="MiniCPM 1.211e9 / L^6.24\n(C4 loss: reference only)",
        )
        axes[1].set_title("with MiniCPM's law (a different loss)")
    axes[0].set_title("this study")
    for ax in axes:  # after every line is drawn: the labels depend on the axis range
        _plots.plain_ticks(ax.xaxis)
        _plots.count_ticks(ax.yaxis)
    keys = [_plots.marker("^", "not fitted (grid point or edge bound)", mfc="none")]
    _plots.legend_outside(fig, axes, keys)
    return fig


def _draw_law(ax, found, used, law, grid, options: Options) -> None:
    in_fit = {id(o) for _, o in used}
    for i, size in enumerate(sorted({s for s, _ in found})):
        mine = [o for s, o in found if s == size]
        fill = [o for o in mine if id(o) in in_fit]
        hollow = [o for o in mine if id(o) not in in_fit]
        ax.plot(
            [o.target_loss for o in fill],
            [o.batch_tokens_opt for o in fill],
            "o",
            color=f"C{i}",
            label=f"{_plots.count(size)} params",
        )
        ax.plot(
            [o.target_loss for o in hollow],
            [o.batch_tokens_opt for o in hollow],
            "^",
            mfc="none",
            mec=f"C{i}",
        )
    if law is not None:
        ax.plot(grid, law.predict(grid), "k-", lw=1.5, label=f"fit: {law.a:.3g} / L^{law.b:.2f}")
        if options.target_loss is not None:
            bs = predict_bs(law, options.target_loss)
            ax.plot(
                [options.target_loss],
                [bs],
                "*",
                color="gold",
                mec="black",
                ms=16,
                label=f"L = {options.target_loss:g}: {_plots.count(bs)} tokens",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"target loss: {METRICS[options.metric]}")
    ax.set_ylabel("optimal batch size (tokens per step)")
