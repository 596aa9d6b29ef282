"""Scaling laws (MiniCPM study 5): loss against compute, and against model size and data.

MiniCPM (arXiv 2404.06395, "Measuring the Scaling Law with WSD LRS") takes the best loss at each
compute over many runs (the envelope) and finds L(C) = β·C^(−α) + L0 fits it better than an
exponential; across 6 sizes × 6 WSD endpoints it fits L(N, D) = C_N·N^(−α) + C_D·D^(−β) + L0
(α = 0.29, β = 0.23, compute-optimal D/N ≈ 192). The paper averages loss per byte, so the default
metric is val_bpb (tokenizer-independent, comparable across studies).

    analysis: {kind: scaling, compute: 1e18, target_preset: minicpm-2.4b, target_tokens: 1e12}

L(C): points are every evaluation of every trial (history.csv, compute = its `flops`), less
those before `min_progress` of a trial's budget (warm-up transients no law describes).
L(N, D): N is non-embedding parameters of each trial's model, D its tokens; `nd_points: final`
uses each finished trial's last evaluation (the decayed endpoint; in a branching study the
decays', not the un-decayed stable runs'), `all` every evaluation past `min_progress` (mid-run
points of WSD/cosine runs sit above a decayed run's loss: biased up), `auto` the final points
when N and D vary independently across them, else all evaluations.
"""

from __future__ import annotations

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
    try_bootstrap,
)
from sandbox_service.laws import (
    compute_optimal_ratio,
    envelope,
    fit_exponential,
    fit_loss_nd,
    fit_power_law,
)
from trainables.dictconfig import ConfigError
from trainables.shapes import flops_per_token, get_config, non_embedding_params
from trainables.trial import parse_trial_config

ND_POINTS = ("auto", "final", "all")


@dataclass(frozen=True)
class Options:
    metric: str = "val_bpb"
    min_progress: float = 0.1
    nd_points: str = "auto"
    compute: float | None = None  # FLOPs (6·N·D) for the compute-optimal split; default: largest
    target_preset: str | None = None  # predict this model's loss after target_tokens
    target_tokens: float | None = None
    n_boot: int = 200

    def __post_init__(self):
        check_metric(self.metric)
        if not 0 <= self.min_progress < 1:
            raise ConfigError(f"analysis.min_progress: {self.min_progress} must be in [0, 1)")
        if self.nd_points not in ND_POINTS:
            raise ConfigError(
                f"analysis.nd_points: {self.nd_points!r}; allowed: {', '.join(ND_POINTS)}"
            )
        if self.compute is not None and not self.compute > 0:
            raise ConfigError(f"analysis.compute: {self.compute} must be > 0 FLOPs")
        if (self.target_preset is None) != (self.target_tokens is None):
            raise ConfigError(
                "analysis.target_tokens: give target_preset and target_tokens together"
            )
        if self.target_tokens is not None and not self.target_tokens > 0:
            raise ConfigError(f"analysis.target_tokens: {self.target_tokens} must be > 0")
        if self.n_boot != 0 and self.n_boot < 20:
            raise ConfigError(f"analysis.n_boot: {self.n_boot}; use 0 (off) or >= 20")


def check(options: Options, spec) -> None:
    if options.target_preset is not None:
        try:
            get_config(options.target_preset)
        except ValueError as err:
            raise ConfigError(f"analysis.target_preset: {err}") from None


def compute_points(study: Study, options: Options) -> pd.DataFrame:
    """(trial_id, tokens, flops, loss, N) of every evaluation past min_progress."""
    frame = study.history.rename(columns={options.metric: "loss"})
    frame = frame[np.isfinite(frame["loss"]) & (frame["flops"] > 0)]
    if "progress" in frame:
        frame = frame[frame["progress"] >= options.min_progress]
    sizes = dict(
        zip(
            study.trials["trial_id"],
            study.derived(lambda c: non_embedding_params(c.model)),
            strict=True,
        )
    )
    return frame.assign(N=frame["trial_id"].map(sizes))[
        ["trial_id", "tokens", "flops", "loss", "N"]
    ]


def fit_compute(points: pd.DataFrame, options: Options, skipped: list) -> dict:
    """The envelope and both laws on it (power law bootstrapped)."""
    env = envelope(points["flops"], points["loss"])
    power = fit_power_law(env.compute, env.loss)
    expo = fit_exponential(env.compute, env.loss)
    boot = try_bootstrap(
        fit_power_law, env.compute, env.loss, n=options.n_boot, skipped=skipped, what="L(C)"
    )
    return {"envelope": env, "power": power, "exponential": expo, "bootstrap": boot}


def nd_candidates(
    study: Study, points: pd.DataFrame, options: Options
) -> list[tuple[str, pd.DataFrame]]:
    ended = study.trials["status"] == "completed"
    if "branch/phase" in study.trials:  # stable runs end un-decayed: the decays are the endpoints
        ended &= study.trials["branch/phase"] != "stable"
    finished = study.trials.loc[ended, "trial_id"]
    last = points[points["trial_id"].isin(set(finished))].groupby("trial_id").tail(1)
    order = {"auto": ["final", "all"], "final": ["final"], "all": ["all"]}[options.nd_points]
    return [(name, last if name == "final" else points) for name in order]


def fit_nd(study: Study, points: pd.DataFrame, options: Options, skipped: list) -> dict | None:
    """L(N, D) on the first candidate point set that can separate N from D."""
    if points["N"].nunique() < 2:
        skipped.append("L(N, D): the study has one model size; search model.preset to fit it")
        return None
    for name, frame in nd_candidates(study, points, options):
        args = (
            frame["N"].to_numpy(float),
            frame["tokens"].to_numpy(float),
            frame["loss"].to_numpy(),
        )
        try:
            law = fit_loss_nd(*args)
        except ValueError as err:
            skipped.append(f"L(N, D) on {name} points: {err}")
            continue
        boot = try_bootstrap(fit_loss_nd, *args, n=options.n_boot, skipped=skipped, what="L(N, D)")
        return {"law": law, "bootstrap": boot, "points": name, "frame": frame}
    return None


def target_prediction(
    study: Study, options: Options, compute_fits: dict | None, nd: dict | None
) -> dict | None:
    if options.target_preset is None:
        return None
    cfg = get_config(options.target_preset)
    seq_len = parse_trial_config(study.spec.base_config()).train.seq_len
    n, d = non_embedding_params(cfg), float(options.target_tokens)
    flops = flops_per_token(cfg, seq_len) * d
    out = {"preset": options.target_preset, "N": n, "tokens": d, "flops": flops}
    if compute_fits:
        out["loss_power_law"] = float(compute_fits["power"].predict(flops))
    if nd:
        out["loss_nd"] = float(nd["law"].predict(n, d))
    return out


def run(study: Study, options: Options) -> Analysis:
    points = compute_points(study, options)
    skipped: list = []
    compute_fits = None
    try:
        compute_fits = fit_compute(points, options, skipped)
    except ValueError as err:
        skipped.append(f"L(C): {err}")
    nd = fit_nd(study, points, options, skipped)
    budget = options.compute or float(points["flops"].max())
    optimal = compute_optimal_ratio(nd["law"], budget) if nd else None
    target = target_prediction(study, options, compute_fits, nd)
    summary = study.base_summary("scaling", options.metric)
    summary.update(
        laws=_laws(study, options, points, compute_fits, nd, optimal),
        chosen={"compute_optimal": optimal.to_dict() if optimal else None, "target": target},
        headline=_headline(compute_fits, nd, optimal, target),
        notes=_notes(options, nd),
        skipped=skipped,
    )
    figures = {}
    if compute_fits:
        figures["loss_vs_compute"] = figure_compute(points, compute_fits, options)
    if nd:
        figures["loss_nd"] = figure_nd(nd, options)
    tables = {"best_trials": best_trials(study, options.metric)}
    if compute_fits:
        tables["law_comparison"] = _comparison_table(compute_fits)
    return Analysis(kind="scaling", summary=summary, tables=tables, figures=figures)


def _laws(study: Study, options: Options, points, compute_fits, nd, optimal) -> dict:
    out = {}
    if compute_fits:
        env = compute_fits["envelope"]
        ids = points["trial_id"].to_numpy()[list(env.index)]
        prov = study.provenance(set(ids), options.metric, points="envelope of every evaluation")
        out["envelope"] = {**env.to_dict(), "trial_ids": [str(t) for t in ids]}
        boot = compute_fits["bootstrap"]
        out["power_law"] = {
            **compute_fits["power"].to_dict(**prov),
            "bootstrap": boot.to_dict() if boot else None,
        }
        out["exponential_law"] = compute_fits["exponential"].to_dict(**prov)
        out["preferred"] = (
            "power_law"
            if compute_fits["power"].rss <= compute_fits["exponential"].rss
            else "exponential_law"
        )
    if nd:
        prov = study.provenance(set(nd["frame"]["trial_id"]), options.metric, points=nd["points"])
        boot = nd["bootstrap"]
        out["loss_nd"] = {
            **nd["law"].to_dict(**prov),
            "bootstrap": boot.to_dict() if boot else None,
        }
        out["compute_optimal"] = optimal.to_dict(**prov)
    return out


def _headline(compute_fits, nd, optimal, target) -> dict:
    out = {}
    if compute_fits:
        p, e = compute_fits["power"], compute_fits["exponential"]
        out["L(C) preferred"] = "power law" if p.rss <= e.rss else "exponential"
        out["power law"] = f"{p.beta:.4g}·C^-{p.alpha:.4g} + {p.l0:.4g}"
        out["rmse power / exponential"] = f"{p.rmse:.4g} / {e.rmse:.4g}"
    if nd:
        law = nd["law"]
        out["L(N,D) alpha, beta, L0"] = f"{law.alpha:.3g}, {law.beta:.3g}, {law.l0:.4g}"
        out[f"D/N at C = {optimal.compute:.3g}"] = round(optimal.d_over_n, 2)
    if target:
        for key in ("loss_power_law", "loss_nd"):
            if key in target:
                out[f"{target['preset']} @ {target['tokens']:.3g} tokens ({key})"] = round(
                    target[key], 4
                )
    return out


def _notes(options: Options, nd) -> list[str]:
    notes = [
        "L(C): envelope (best loss at each compute over every evaluation of every trial, "
        f"evaluations before {options.min_progress:.0%} of a trial's budget dropped); power law "
        "β·C^-α + L0 vs exponential α·e^(-βC) + L0 by least squares in loss units; the lower RSS "
        "is preferred. Compute is the trials' `flops` (PaLM App. B count, attention included).",
    ]
    if nd:
        notes.append(
            f"L(N, D) on {nd['points']} points: N non-embedding parameters, D tokens. The "
            "compute-optimal split uses C = 6·N·D (Hoffmann et al. 2022), a different count "
            "from the trials' flops; predictions far outside the fitted N and D extrapolate."
        )
    return notes


def _comparison_table(fits: dict) -> pd.DataFrame:
    rows = []
    for name in ("power", "exponential"):
        law = fits[name]
        rows.append(
            {
                "law": law.LAW,
                "alpha": law.alpha,
                "beta": law.beta,
                "l0": law.l0,
                "rss": law.rss,
                "rmse": law.rmse,
                "r2": law.r2,
                "n_points": law.n_points,
            }
        )
    return pd.DataFrame(rows)


def figure_compute(points: pd.DataFrame, fits: dict, options: Options):
    """Every curve faint, the envelope bold, both fits; residuals of both in a lower panel."""
    fig, ax, res = _plots.with_residuals("Loss vs compute")
    for _, run in points.groupby("trial_id"):
        ax.plot(run["flops"], run["loss"], color="0.6", lw=0.8, alpha=0.5)
    env, power, expo = fits["envelope"], fits["power"], fits["exponential"]
    envelope_label = "envelope (best loss at each compute)"
    ax.plot(env.compute, env.loss, "o-", color="black", lw=2, ms=4, label=envelope_label)
    grid = np.geomspace(min(env.compute), max(env.compute), 200)
    power_label = (
        f"power law {power.beta:.3g}·C^-{power.alpha:.3g} + {power.l0:.3g} (RMSE {power.rmse:.2g})"
    )
    ax.plot(grid, power.predict(grid), color="C0", lw=1.8, label=power_label)
    expo_label = f"exponential (RMSE {expo.rmse:.2g})"
    ax.plot(grid, expo.predict(grid), "--", color="C3", lw=1.8, label=expo_label)
    ax.set_xscale("log")
    ax.set_ylabel(METRICS[options.metric])
    _plots.robust_ylim(ax, env.loss, top_quantile=1.0)  # the envelope whole; curves may leave
    ax.legend(fontsize=8, loc="upper right")
    res.plot(env.compute, power.residuals, "o-", color="C0", ms=3)
    res.plot(env.compute, expo.residuals, "s--", color="C3", ms=3)
    res.set_xlabel(_plots.FLOPS_LABEL)
    res.set_ylabel("data − law")
    return fig


def figure_nd(nd: dict, options: Options):
    """Loss vs tokens per model size with the L(N, D) law, and predicted vs observed."""
    law, frame = nd["law"], nd["frame"]
    fig, (ax, scatter) = _plots.panels(2, title=f"L(N, D) fitted on {nd['points']} points")
    sizes = sorted(frame["N"].unique())
    colors = _plots.palette(len(sizes))
    for color, n in zip(colors, sizes, strict=True):
        mine = frame[frame["N"] == n].sort_values("tokens")
        grid = np.geomspace(mine["tokens"].min(), mine["tokens"].max(), 50)
        ax.plot(
            mine["tokens"], mine["loss"], "o", color=color, ms=4, label=f"N = {_plots.count(n)}"
        )
        ax.plot(grid, law.predict(n, grid), "-", color=color, lw=1)
        scatter.plot(law.predict(n, mine["tokens"]), mine["loss"], "o", color=color, ms=4)
    ax.set_xscale("log")
    _plots.count_ticks(ax.xaxis)
    ax.set_xlabel(_plots.TOKENS_LABEL)
    ax.set_ylabel(METRICS[options.metric])
    ax.legend(fontsize=8, title="non-embedding params")
    lims = [frame["loss"].min(), frame["loss"].max()]
    scatter.plot(lims, lims, "k--", lw=1, label="predicted = observed")
    scatter.set_xlabel(f"predicted by L(N, D): {METRICS[options.metric]}")
    scatter.set_ylabel(f"observed: {METRICS[options.metric]}")
    scatter.set_title(
        f"α = {law.alpha:.3g}, β = {law.beta:.3g}, L0 = {law.l0:.3g}, RMSE {law.rmse:.2g}"
    )
    scatter.legend(fontsize=8)
    return fig
