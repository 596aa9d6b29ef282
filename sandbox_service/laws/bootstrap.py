"""Parameter uncertainty of any law fit by the nonparametric bootstrap (Efron 1979).

Resample the points with replacement, refit, and read percentile intervals off the refits. A
resample can be unfittable (too few distinct points, a parabola opening downward): it is
counted in `n_failed` and left out, and the intervals describe the fits that succeeded.

    ci = bootstrap(fit_bs_law, losses, batch_tokens, n=200, seed=0)
    ci.low["b"], ci.high["b"]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from sandbox_service.laws._fit import Fit, as_array, same_length

# What a refit on a degenerate resample raises; anything else is a bug and propagates.
FIT_FAILURES = (ValueError, RuntimeError, FloatingPointError, np.linalg.LinAlgError)


@dataclass(frozen=True)
class BootstrapResult(Fit):
    """Per-parameter estimate (the fit on all points), percentile interval and spread."""

    LAW = "bootstrap"

    estimate: Mapping[str, float]
    low: Mapping[str, float]  # 2.5th percentile of the refits (for level 0.95)
    high: Mapping[str, float]  # 97.5th percentile
    std: Mapping[str, float]  # standard deviation of the refits
    level: float
    n_resamples: int
    n_failed: int
    seed: int


def bootstrap(
    fit_fn: Callable[..., Fit | Mapping[str, float]],
    *arrays,
    n: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Refit `fit_fn(*arrays)` on `n` resamples of the points (rows across all arrays).

    Deterministic for a seed. `fit_fn` returns a `Fit` (its `params()` are resampled) or a
    mapping of parameter name to value.
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n={n!r}: must be an integer >= 2 resamples")
    if not 0 < level < 1:
        raise ValueError(f"level={level}: must be in (0, 1), e.g. 0.95")
    if not arrays:
        raise ValueError("bootstrap: pass the fit's point arrays after fit_fn")
    data = [as_array(f"arrays[{i}]", a, finite=False) for i, a in enumerate(arrays)]
    size = same_length(**{f"arrays[{i}]": a for i, a in enumerate(data)})
    estimate = _params(fit_fn(*data))
    rng = np.random.default_rng(seed)
    draws, failed = [], 0
    for _ in range(n):
        rows = rng.integers(0, size, size)
        try:
            params = _params(fit_fn(*(a[rows] for a in data)))
        except FIT_FAILURES:
            failed += 1
            continue
        draws.append([params[k] for k in estimate])
    if len(draws) < 2:
        raise ValueError(f"bootstrap: {failed} of {n} resamples failed to fit; nothing to report")
    table = np.array(draws)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(table, [tail, 100 - tail], axis=0)
    return BootstrapResult(
        estimate=estimate,
        low=dict(zip(estimate, map(float, low), strict=True)),
        high=dict(zip(estimate, map(float, high), strict=True)),
        std=dict(zip(estimate, map(float, table.std(axis=0, ddof=1)), strict=True)),
        level=level,
        n_resamples=n,
        n_failed=failed,
        seed=seed,
    )


def _params(result) -> dict[str, float]:
    if isinstance(result, Fit):
        return result.params()
    if isinstance(result, Mapping):
        return {str(k): float(v) for k, v in result.items()}
    raise TypeError(f"fit_fn returned {type(result).__name__}; expected a Fit or a mapping")
