"""The batch-size law: which batch reaches a loss with the fewest tokens (MiniCPM study 3).

MiniCPM (arXiv 2404.06395, wind tunnel, "Optimal Batch Size") trains 6 batch sizes at each of
0.009B, 0.036B and 0.17B, reads off, for each loss, the batch size that reaches it with the
fewest tokens, and fits across losses bs = a / L^b, reporting
bs_tokens = 1.2110e9 / L^6.2393 (≈ 3.98M tokens at L = 2.5, 1.28M at L = 3.0).
The objective is fewest tokens, not fewest steps.

    tokens = tokens_to_reach(curve_tokens, curve_losses, 3.5)
    best = optimal_batch_for_loss({bs: (tokens, losses), ...}, 3.5)
    law = fit_bs_law([3.5, 3.2, 3.0], [best35.batch_tokens_opt, ...])
    predict_bs(law, 2.5)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sandbox_service.laws._fit import (
    Fit,
    as_array,
    edge_estimate,
    fit_parabola,
    floats,
    r_squared,
    require_points,
    require_spread,
    same_length,
)


def tokens_to_reach(curve_tokens, curve_losses, target_loss: float) -> float | None:
    """Tokens after which a run's loss first reaches `target_loss`; None if it never does.

    The curve is made monotone by its running minimum (the best loss seen so far: eval noise
    must not make a run "un-reach" a loss) and interpolated linearly in tokens between the last
    point above the target and the first at or below it; curves are reported every few steps,
    so the interpolation scheme matters little. A curve at or below the target from its first
    point returns that point's tokens. NaN/inf losses (divergence) are skipped.
    """
    tokens = as_array("curve_tokens", curve_tokens)
    losses = as_array("curve_losses", curve_losses, finite=False)
    same_length(curve_tokens=tokens, curve_losses=losses)
    if not math.isfinite(target_loss):
        raise ValueError(f"target_loss={target_loss}: must be finite")
    if np.any(tokens < 0) or np.any(np.diff(tokens) <= 0):
        raise ValueError("curve_tokens: must be >= 0 and strictly increasing (one report a step)")
    keep = np.isfinite(losses)
    tokens, best = tokens[keep], np.minimum.accumulate(losses[keep])
    reached = np.flatnonzero(best <= target_loss)
    if len(reached) == 0:
        return None
    j = int(reached[0])
    if j == 0:
        return float(tokens[0])
    # best[j-1] > target >= best[j], so the denominator is positive.
    frac = (best[j - 1] - target_loss) / (best[j - 1] - best[j])
    return float(tokens[j - 1] + frac * (tokens[j] - tokens[j - 1]))


@dataclass(frozen=True)
class BatchOptimum(Fit):
    """The batch size (in tokens per step) that reaches `target_loss` with the fewest tokens.

    `refined`: the optimum is the vertex of a parabola in (ln bs, ln tokens) through the best
    grid batch and its two neighbours (all must reach the target); otherwise the best grid
    batch. `at_edge`: the best batch is the smallest or largest of the grid, so the optimum is
    a bound ("upper_bound": at or below it; "lower_bound": at or above it).
    """

    LAW = "batch_optimum"
    PARAMS = ("batch_tokens_opt", "tokens_opt")

    target_loss: float
    batch_tokens_opt: float
    tokens_opt: float  # tokens needed at the optimum
    refined: bool
    at_edge: bool
    estimate: str  # "interior" | "upper_bound" | "lower_bound"
    batch_tokens: tuple[float, ...]  # the grid, ascending
    tokens_to_target: tuple[float | None, ...]  # per grid batch; None: never reached


def optimal_batch_for_loss(
    curves_by_bs: Mapping[float, tuple[Sequence[float], Sequence[float]]],
    target_loss: float,
    *,
    refine: bool = True,
) -> BatchOptimum:
    """From {batch_tokens: (curve_tokens, curve_losses)}, the batch reaching the loss soonest."""
    if not isinstance(curves_by_bs, Mapping) or len(curves_by_bs) == 0:
        raise ValueError("curves_by_bs: expected a non-empty mapping bs_tokens -> (tokens, loss)")
    grid = as_array("batch sizes (keys of curves_by_bs)", sorted(curves_by_bs), positive=True)
    needed = [tokens_to_reach(*curves_by_bs[bs], target_loss) for bs in sorted(curves_by_bs)]
    if all(t is None for t in needed):
        raise ValueError(f"optimal_batch_for_loss: no run reaches loss {target_loss}")
    cost = np.array([math.inf if t is None else t for t in needed])
    best = int(np.argmin(cost))
    estimate = edge_estimate(best, len(grid))
    bs_opt, tokens_opt, refined = float(grid[best]), float(cost[best]), False
    near = slice(best - 1, best + 2)
    if refine and estimate == "interior" and np.all(np.isfinite(cost[near])) and cost[best] > 0:
        parabola = fit_parabola(np.log(grid[near]), np.log(cost[near]))
        if parabola.curvature > 0:
            bs_opt, tokens_opt = math.exp(parabola.x_min), math.exp(parabola.y_min)
            refined = True
    return BatchOptimum(
        target_loss=float(target_loss),
        batch_tokens_opt=bs_opt,
        tokens_opt=tokens_opt,
        refined=refined,
        at_edge=estimate != "interior",
        estimate=estimate,
        batch_tokens=floats(grid),
        tokens_to_target=tuple(needed),
    )


@dataclass(frozen=True)
class BatchSizeLaw(Fit):
    """batch_tokens = a / L^b, fitted as ln bs = ln a − b·ln L (MiniCPM, "Optimal Batch Size")."""

    LAW = "batch_size_law"
    PARAMS = ("a", "b")

    a: float
    b: float
    residuals: tuple[float, ...]  # in ln batch_tokens
    r2: float  # of the regression in log space
    n_points: int
    loss_range: tuple[float, float]  # predictions outside it extrapolate

    def __post_init__(self):
        if not self.a > 0:
            raise ValueError(f"a={self.a}: must be > 0")

    def predict(self, loss):
        return self.a / np.asarray(loss, dtype=float) ** self.b


def fit_bs_law(losses, batch_tokens) -> BatchSizeLaw:
    """Least squares of ln(batch_tokens) on ln(loss); the paper's form bs = a / L^b."""
    loss = as_array("losses", losses, positive=True)
    bs = as_array("batch_tokens", batch_tokens, positive=True)
    n = same_length(losses=loss, batch_tokens=bs)
    require_points("fit_bs_law", n, 2)
    require_spread("losses", loss)
    slope, intercept = np.polyfit(np.log(loss), np.log(bs), 1)
    fitted = intercept + slope * np.log(loss)
    return BatchSizeLaw(
        a=float(np.exp(intercept)),
        b=float(-slope),
        residuals=floats(np.log(bs) - fitted),
        r2=r_squared(np.log(bs), fitted),
        n_points=n,
        loss_range=(float(loss.min()), float(loss.max())),
    )


def predict_bs(law: BatchSizeLaw, loss):
    """Optimal batch size in tokens per step for a target loss (scalar or array)."""
    value = law.predict(as_array("loss", np.atleast_1d(loss), positive=True))
    return float(value[0]) if np.ndim(loss) == 0 else value
