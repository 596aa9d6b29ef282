"""The optimal learning rate of a sweep, and how it moves with width (MiniCPM study 2).

MiniCPM (arXiv 2404.06395, wind tunnel, "Optimal Learning Rate") runs 6 learning rates at each
of 0.04B-0.5B and finds the optimum stays at ≈ 0.01 under μP; μTransfer (Yang et al. 2022, arXiv
2203.03466, Fig. 1) shows the same sweep drifting with width under standard parametrisation.
Loss is close to a parabola in log(lr) around its minimum, so the optimum is the vertex of a
parabola fitted to the points next to the best grid point; it may lie between grid points.

    fit = fit_lr_optimum(lrs, final_losses)          # one width
    drift = lr_drift({64: fit64, 128: fit128, ...})  # slope of log lr* vs log width
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sandbox_service.laws._fit import (
    Fit,
    as_array,
    edge_estimate,
    fit_parabola,
    floats,
    require_spread,
    same_length,
)

ESTIMATES = ("interior", "upper_bound", "lower_bound")


@dataclass(frozen=True)
class LROptimum(Fit):
    """loss ≈ curvature·(ln lr − ln lr_opt)² + loss_opt near the best learning rate.

    `estimate` says how to read `lr_opt`: "interior" is the parabola's vertex; at a grid edge
    the optimum was not bracketed, `lr_opt` is the best grid lr and the true optimum lies at or
    below it ("upper_bound") or at or above it ("lower_bound"): extend the grid that way.
    """

    LAW = "lr_optimum"
    PARAMS = ("lr_opt", "curvature", "loss_opt")

    lr_opt: float
    curvature: float  # loss per (ln lr)²; larger means a sharper optimum
    loss_opt: float
    at_edge: bool
    estimate: str
    window: int
    lrs_used: tuple[float, ...]  # the distinct learning rates the parabola was fitted to
    residuals: tuple[float, ...]  # loss − parabola at the points used
    r2: float
    n_points: int  # finite points in the sweep
    n_diverged: int  # points dropped for a NaN/inf loss

    def __post_init__(self):
        if self.estimate not in ESTIMATES:
            raise ValueError(f"estimate={self.estimate!r}: must be one of {ESTIMATES}")
        if self.at_edge != (self.estimate != "interior"):
            raise ValueError(f"at_edge={self.at_edge} contradicts estimate={self.estimate!r}")
        if not self.lr_opt > 0:
            raise ValueError(f"lr_opt={self.lr_opt}: must be > 0")


def fit_lr_optimum(lrs, losses, *, window: int = 1) -> LROptimum:
    """The optimal learning rate of one sweep by a parabola in ln(lr).

    Window rule: take the distinct lr with the lowest (mean) loss and `window` distinct lrs on
    each side, clipped at the grid ends and widened to 3 distinct lrs when clipped. The default
    of 1 (the best point and its two neighbours) keeps the fit local: loss vs ln(lr) is steeper
    on the high side, and wider windows let that asymmetry pull the vertex.
    Repeated lrs (several seeds) are all kept; the argmin uses their mean.
    Divergence rule: a NaN or inf loss marks a diverged trial; it is dropped and counted in
    `n_diverged`. So a minimum at the largest stable lr is flagged as an edge: the optimum lies
    between it and the smallest diverged lr.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r}: must be an integer >= 1 (neighbours on each side)")
    lr = as_array("lrs", lrs, positive=True)
    loss = as_array("losses", losses, finite=False)
    same_length(lrs=lr, losses=loss)
    stable = np.isfinite(loss)
    x, y = np.log(lr[stable]), loss[stable]
    grid = np.unique(x)
    if len(grid) < 3:
        raise ValueError(
            f"fit_lr_optimum: {len(grid)} distinct lr(s) with a finite loss "
            f"({int((~stable).sum())} diverged); need at least 3 to fit a parabola"
        )
    means = np.array([y[x == g].mean() for g in grid])
    best = int(np.argmin(means))
    lo, hi = _window(best, len(grid), window)
    used = (x >= grid[lo]) & (x <= grid[hi])
    parabola = fit_parabola(x[used], y[used])
    estimate = edge_estimate(best, len(grid))
    if estimate == "interior":
        if not parabola.curvature > 0:
            raise ValueError(
                f"fit_lr_optimum: the parabola over lrs {np.exp(grid[lo : hi + 1]).tolist()} "
                f"opens downward (curvature {parabola.curvature:.3g}); use window=1 or a "
                "denser grid around the minimum"
            )
        lr_opt, loss_opt = float(np.exp(parabola.x_min)), parabola.y_min
    else:
        lr_opt, loss_opt = float(np.exp(grid[best])), float(means[best])
    return LROptimum(
        lr_opt=lr_opt,
        curvature=parabola.curvature,
        loss_opt=loss_opt,
        at_edge=estimate != "interior",
        estimate=estimate,
        window=window,
        lrs_used=floats(np.exp(grid[lo : hi + 1])),
        residuals=parabola.residuals,
        r2=parabola.r2,
        n_points=int(stable.sum()),
        n_diverged=int((~stable).sum()),
    )


def _window(best: int, n: int, window: int) -> tuple[int, int]:
    lo, hi = max(0, best - window), min(n - 1, best + window)
    if hi - lo < 2:  # clipped at an edge: widen inwards to the 3 points a parabola needs
        lo, hi = (0, 2) if lo == 0 else (n - 3, n - 1)
    return lo, hi


@dataclass(frozen=True)
class LRDrift(Fit):
    """ln lr* = slope·ln width + const across widths.

    μP predicts slope ≈ 0 and ratio ≈ 1 (MiniCPM: 0.01 from 0.04B to 0.5B); standard
    parametrisation gives a clearly negative slope (μTransfer Fig. 1: wider wants smaller lr).
    `bounded_widths` lists widths whose optimum was only a bound (at a grid edge).
    """

    LAW = "lr_drift"
    PARAMS = ("slope", "ratio")

    slope: float  # d ln lr* / d ln width
    ratio: float  # max lr* / min lr* over the widths
    widths: tuple[float, ...]
    lr_opts: tuple[float, ...]
    residuals: tuple[float, ...]  # in ln lr
    bounded_widths: tuple[float, ...]


def lr_drift(optima: Mapping[float, float | LROptimum]) -> LRDrift:
    """Slope of ln lr* against ln width, from {width: lr*} (a float or an `LROptimum`)."""
    if not isinstance(optima, Mapping):
        raise ValueError(f"optima: expected a mapping width -> lr*, got {type(optima).__name__}")
    order = sorted(optima)
    widths = as_array("widths (keys of optima)", order, positive=True)
    values = [optima[w] for w in order]
    lr_opts = as_array(
        "lr* (values of optima)",
        [v.lr_opt if isinstance(v, LROptimum) else v for v in values],
        positive=True,
    )
    require_spread("widths (keys of optima)", widths)
    slope, intercept = np.polyfit(np.log(widths), np.log(lr_opts), 1)
    residuals = np.log(lr_opts) - (slope * np.log(widths) + intercept)
    bounded = [w for w, v in zip(order, values, strict=True) if getattr(v, "at_edge", False)]
    return LRDrift(
        slope=float(slope),
        ratio=float(lr_opts.max() / lr_opts.min()),
        widths=floats(widths),
        lr_opts=floats(lr_opts),
        residuals=floats(residuals),
        bounded_widths=floats(bounded),
    )
