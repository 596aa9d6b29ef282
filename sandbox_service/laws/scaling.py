"""Loss against compute: the envelope of many runs and the two candidate laws (MiniCPM study 5).

MiniCPM's WSD analysis (arXiv 2404.06395) takes the best loss reached at each compute
across WSD runs of several sizes and finds a power law L(C) = β·C^(−α) + L0 fits that envelope
better than an exponential α·e^(−β·C) + L0. Both fits here report RSS and RMSE on the same
points so they can be compared directly.

Conditioning: compute spans many decades (1e15-1e21 FLOPs), so C is divided by a reference
(the geometric mean for the power law, the largest C for the exponential) and the positive
parameters are fitted as logarithms. Starts come from a grid over the rate (α or β) with the
amplitude and L0 solved linearly at each rate; scipy's least_squares then refines all three
with L0 bounded to [0, min L] (a loss floor is non-negative and below every observed loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from sandbox_service.laws._fit import (
    Fit,
    as_array,
    floats,
    nonneg_lstsq,
    quality,
    require_points,
    require_spread,
    same_length,
)
from sandbox_service.laws.loss_nd import LossND


@dataclass(frozen=True)
class Envelope(Fit):
    """The best loss at each compute: points no run beats with less or equal compute.

    Monotone: compute strictly increasing, loss strictly decreasing. `index` points back into
    the input arrays (which run and step each envelope point came from).
    """

    LAW = "envelope"

    compute: tuple[float, ...]
    loss: tuple[float, ...]
    index: tuple[int, ...]
    n_dropped_nonfinite: int


def envelope(compute, loss) -> Envelope:
    """Pareto front of (compute, loss) over all points of all runs (diverged NaNs dropped).

    Not forced convex: a convex hull would discard real best-so-far points between runs of
    different sizes, which is the envelope the paper fits.
    """
    c = as_array("compute", compute, positive=True)
    y = as_array("loss", loss, finite=False)
    same_length(compute=c, loss=y)
    keep = np.flatnonzero(np.isfinite(y))
    order = keep[np.lexsort((y[keep], c[keep]))]  # by compute, ties by loss
    front, best = [], math.inf
    for i in order:
        if y[i] < best:
            front.append(int(i))
            best = y[i]
    return Envelope(
        compute=floats(c[front]),
        loss=floats(y[front]),
        index=tuple(front),
        n_dropped_nonfinite=int(len(y) - len(keep)),
    )


@dataclass(frozen=True)
class _CurveFit(Fit):
    PARAMS = ("alpha", "beta", "l0")

    alpha: float
    beta: float
    l0: float  # the loss floor the law approaches
    rss: float  # residual sum of squares, in loss²
    rmse: float
    r2: float
    residuals: tuple[float, ...]  # loss − law, in input order
    n_points: int
    compute_range: tuple[float, float]  # predictions outside it extrapolate


@dataclass(frozen=True)
class PowerLaw(_CurveFit):
    """L(C) = beta·C^(−alpha) + l0 (MiniCPM's law for the WSD envelope)."""

    LAW = "power_law"

    def predict(self, compute):
        return self.beta * np.asarray(compute, dtype=float) ** (-self.alpha) + self.l0


@dataclass(frozen=True)
class ExponentialLaw(_CurveFit):
    """L(C) = alpha·e^(−beta·C) + l0, the alternative MiniCPM rejects for the envelope."""

    LAW = "exponential_law"

    def predict(self, compute):
        return self.alpha * np.exp(-self.beta * np.asarray(compute, dtype=float)) + self.l0


def fit_power_law(compute, loss) -> PowerLaw:
    """Least squares of L = β·C^(−α) + L0 in loss units, C normalised by its geometric mean."""
    c, y = _curve_inputs("fit_power_law", compute, loss)
    c_ref = float(np.exp(np.log(c).mean()))
    amp, alpha, l0 = _fit_amplitude_rate_offset(
        lambda rate: (c / c_ref) ** -rate, y, np.geomspace(1e-3, 3.0, 80)
    )
    # A·(C/C_ref)^−α = (A·C_ref^α)·C^−α
    law = dict(alpha=alpha, beta=amp * c_ref**alpha, l0=l0)
    return PowerLaw(**law, **_quality(c, y, amp * (c / c_ref) ** -alpha + l0))


def fit_exponential(compute, loss) -> ExponentialLaw:
    """Least squares of L = α·e^(−β·C) + L0 in loss units, C normalised by its maximum."""
    c, y = _curve_inputs("fit_exponential", compute, loss)
    c_ref = float(c.max())
    amp, rate, l0 = _fit_amplitude_rate_offset(
        lambda rate: np.exp(-rate * c / c_ref), y, np.geomspace(1e-2, 1e3, 80)
    )
    law = dict(alpha=amp, beta=rate / c_ref, l0=l0)
    return ExponentialLaw(**law, **_quality(c, y, amp * np.exp(-rate * c / c_ref) + l0))


def predict_loss(law, *inputs):
    """The law's loss: `predict_loss(power_or_exp_law, compute)`, `predict_loss(nd_law, N, D)`."""
    if not isinstance(law, (PowerLaw, ExponentialLaw, LossND)):
        raise ValueError(
            f"predict_loss: {type(law).__name__} is not a loss law; "
            "expected PowerLaw, ExponentialLaw or LossND"
        )
    return law.predict(*inputs)


def _curve_inputs(what: str, compute, loss) -> tuple[np.ndarray, np.ndarray]:
    c = as_array("compute", compute, positive=True)
    y = as_array("loss", loss, positive=True)
    require_points(what, same_length(compute=c, loss=y), 3)
    require_spread("compute", c, 3)
    return c, y


def _fit_amplitude_rate_offset(basis, y: np.ndarray, rates: np.ndarray):
    """Fit y = amp·basis(rate) + l0 with amp, rate > 0 and 0 <= l0 <= min y.

    For a fixed rate the model is linear in (amp, l0): solve that on a grid of rates for a
    start, then refine (ln amp, ln rate, l0) jointly.
    """
    start = _best_linear_start(basis, y, rates)

    def residuals(theta):
        return np.exp(theta[0]) * basis(np.exp(theta[1])) + theta[2] - y

    bounds = ([-np.inf, -np.inf, 0.0], [np.inf, np.inf, float(y.min())])
    sol = least_squares(residuals, start, bounds=bounds, x_scale="jac", xtol=1e-12, ftol=1e-12)
    return float(np.exp(sol.x[0])), float(np.exp(sol.x[1])), float(sol.x[2])


def _best_linear_start(basis, y: np.ndarray, rates: np.ndarray) -> np.ndarray:
    best, best_rss = None, math.inf
    for rate in rates:
        (amp, l0), rss = nonneg_lstsq([basis(rate), np.ones_like(y)], y)
        if rss < best_rss:
            # The start must satisfy the bounds and have a finite logarithm.
            best = np.array([math.log(max(amp, 1e-12)), math.log(rate), min(l0, y.min())])
            best_rss = rss
    return best


def _quality(c: np.ndarray, y: np.ndarray, fitted: np.ndarray) -> dict:
    return {**quality(y, fitted), "compute_range": (float(c.min()), float(c.max()))}
