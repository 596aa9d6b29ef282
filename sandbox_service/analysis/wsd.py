"""WSD vs cosine (study 4, MiniCPM §3.4): decays branched from one stable run per configuration.

    analysis: {kind: wsd, reference_fraction: 0.1}

Reads a branching study (see `sandbox_service.branching`): rows whose `branch/phase` is
`stable`, `decay` (a decay of fraction f and a shape, branched at stable step S) or `cosine`
(a baseline trained from scratch with T = S + D). For each branch step S it compares every
decay's final loss with the cosine run of the same length, and reports the compute each way
of getting the endpoints costs: the stable run once plus the decays, against one full cosine
run per endpoint (`own_flops`, what each trial computed itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from sandbox_service.analysis import _plots
from sandbox_service.analysis._common import METRICS, Analysis, Study, check_metric


@dataclass(frozen=True)
class Options:
    metric: str = "val_loss"
    reference_fraction: float = 0.1  # the decay fraction compared head-on with cosine

    def __post_init__(self):
        check_metric(self.metric)
        if not 0 < self.reference_fraction < 1:
            raise ValueError(f"reference_fraction={self.reference_fraction}: must be in (0, 1)")


def check(options: Options, spec) -> None:
    if getattr(spec, "branching", None) is None:
        from trainables.dictconfig import ConfigError

        raise ConfigError("analysis.kind: wsd needs a branching: section in the study")


def endpoints(study: Study, metric: str) -> pd.DataFrame:
    """One row per decay or cosine endpoint: S, fraction, shape, tokens, own FLOPs, final loss."""
    t = study.trials.assign(final=study.final(metric))
    t = t[t["branch/phase"].isin(["decay", "cosine"])]
    cols = [
        "trial_id",
        "branch/phase",
        "branch/stable_trial",
        "branch/stable_step",
        "branch/decay_fraction",
        "branch/decay_shape",
        "tokens",
        "own_flops",
        "flops",
        "final",
    ]
    out = t[cols].rename(columns=lambda c: c.replace("branch/", ""))
    return out.sort_values(["stable_trial", "stable_step", "phase", "decay_fraction"])


def comparison(ends: pd.DataFrame) -> pd.DataFrame:
    """Each decay's final loss minus the cosine baseline of the same stable trial and S."""
    cos = ends[ends["phase"] == "cosine"].set_index(["stable_trial", "stable_step"])["final"]
    dec = ends[ends["phase"] == "decay"].copy()
    keys = list(zip(dec["stable_trial"], dec["stable_step"], strict=True))
    dec["cosine_final"] = [cos.get(k, np.nan) for k in keys]
    dec["minus_cosine"] = dec["final"] - dec["cosine_final"]
    return dec


def compute_accounting(study: Study, ends: pd.DataFrame) -> dict:
    stable = study.trials[study.trials["branch/phase"] == "stable"]
    decays = ends[ends["phase"] == "decay"]
    cosine = ends[ends["phase"] == "cosine"]
    wsd_flops = float(stable["own_flops"].sum() + decays["own_flops"].sum())
    # One cosine run per endpoint length (the lengths of the reference-fraction decays).
    per_endpoint = {(r.stable_trial, r.stable_step): r.flops for r in cosine.itertuples()}
    cosine_flops = float(sum(per_endpoint.values()))
    return {
        "wsd_total_flops": wsd_flops,
        "n_wsd_endpoints": int(len(decays)),
        "cosine_total_flops": cosine_flops,
        "n_cosine_endpoints": int(len(cosine)),
        "wsd_flops_per_endpoint": wsd_flops / max(len(decays), 1),
        "cosine_flops_per_endpoint": cosine_flops / max(len(cosine), 1),
    }


def run(study: Study, options: Options) -> Analysis:
    metric = options.metric
    ends = endpoints(study, metric)
    comp = comparison(ends)
    by = comp.groupby(["decay_fraction", "decay_shape"])["minus_cosine"]
    table = by.agg(["mean", "min", "max", "count"]).reset_index()
    summary = study.base_summary("wsd", metric)
    compute = compute_accounting(study, ends)
    ref = options.reference_fraction
    summary.update(
        {
            "decay_vs_cosine": table.to_dict("records"),
            "headline": headline(table, comp, compute, ref),
            "compute": compute,
            "provenance": study.provenance(ends["trial_id"], metric),
            "notes": [
                f"Each decay's final {metric} minus the cosine run trained from scratch with "
                f"T = S + D({ref:.1%}) at the same branch step S; only the {ref:.1%} decays have "
                "exactly the cosine run's length, the others end at fewer or more tokens (see the "
                "endpoints table).",
                "Compute: the stable run once plus every decay's own steps (own_flops), against "
                "one full cosine run per endpoint length.",
            ],
        }
    )
    figures = {
        "wsd_curves": curves_figure(study, metric),
        "wsd_final_vs_compute": final_vs_compute(ends, metric),
    }
    return Analysis("wsd", summary, {"endpoints": ends, "decay_vs_cosine": table}, figures)


def headline(table: pd.DataFrame, comp: pd.DataFrame, compute: dict, ref: float) -> dict:
    """Flat numbers for the report: decay-minus-cosine per fraction and shape, the best
    endpoint, and what one endpoint costs each way."""
    out = {
        f"wsd - cosine, {r.decay_fraction:.1%} {r.decay_shape} (mean over S)": r.mean
        for r in table.itertuples()
    }
    if len(comp):
        best = comp.loc[comp["final"].idxmin()]
        out["best endpoint"] = (
            f"{best['decay_fraction']:.1%} {best['decay_shape']} decay "
            f"at S={int(best['stable_step'])}: {best['final']:.4f}"
        )
    ratio = compute["cosine_flops_per_endpoint"] / max(compute["wsd_flops_per_endpoint"], 1)
    out["FLOPs per endpoint, cosine / WSD branching"] = ratio
    out["reference fraction"] = ref
    return out


def curves_figure(study: Study, metric: str):
    """Loss vs tokens: the stable run, its decays (by fraction) and the cosine baselines."""
    h, t = study.history, study.trials.set_index("trial_id")
    stables = t.index[t["branch/phase"] == "stable"]
    fig, axes = _plots.panels(len(stables), sharey=True, title="WSD decays vs cosine")
    for ax, sid in zip(axes, stables, strict=True):
        s = h[h["trial_id"] == sid]
        ax.plot(s["tokens"], s[metric], color="black", lw=1.5, marker=".", ms=3)
        fracs = sorted(t["branch/decay_fraction"].dropna().unique())
        colors = dict(zip(fracs, _plots.palette(len(fracs)), strict=True))
        for tid, row in t[t["branch/stable_trial"] == sid].iterrows():
            c = h[h["trial_id"] == tid]
            cos = row["branch/phase"] == "cosine"
            ax.plot(
                c["tokens"],
                c[metric],
                ls="--" if cos else "-",
                marker=".",
                ms=3,
                lw=1,
                color="tab:red" if cos else colors[row["branch/decay_fraction"]],
            )
        ax.set_xscale("log")
        _plots.count_ticks(ax.xaxis)
        ax.set_xlabel(_plots.TOKENS_LABEL)
        ax.set_ylabel(METRICS[metric])
        _plots.robust_ylim(ax, h[h["trial_id"].isin(t.index)][metric])
        handles = [Line2D([], [], color="black", label="stable (constant lr)")]
        handles += [Line2D([], [], color=colors[f], label=f"WSD decay {f:.1%}") for f in fracs]
        handles.append(Line2D([], [], color="tab:red", ls="--", label="cosine (T = S + D)"))
        ax.legend(handles=handles, fontsize=8)
    return fig


def final_vs_compute(ends: pd.DataFrame, metric: str):
    """Final loss of each endpoint against its tokens, WSD decays and cosine runs."""
    fig, (ax,) = _plots.panels(1, title="endpoints: final loss vs tokens")
    shapes = {"exp": "o", "linear": "s", "cosine": "^", "1-sqrt": "D", "megatron-exp": "v"}
    points = None
    for (phase, shape), g in ends.groupby(["phase", "decay_shape"]):
        style = {"marker": shapes.get(shape, "o"), "edgecolors": "black", "linewidths": 0.5}
        if phase == "cosine":
            ax.scatter(
                g["tokens"],
                g["final"],
                color="tab:red",
                s=50,
                label="cosine (from scratch)",
                **style,
            )
            continue
        points = ax.scatter(
            g["tokens"],
            g["final"],
            c=g["decay_fraction"],
            cmap="viridis",
            vmin=0,
            vmax=ends["decay_fraction"].max(),
            s=40,
            label=f"WSD, {shape} decay",
            **style,
        )
    if points is not None:
        fig.colorbar(points, ax=ax, label="decay fraction D / (S + D)")
    ax.set_xscale("log")
    _plots.count_ticks(ax.xaxis)
    ax.set_xlabel("tokens at the endpoint (stable + decay)")
    ax.set_ylabel(f"final {METRICS[metric]}")
    ax.legend(fontsize=8)
    return fig
