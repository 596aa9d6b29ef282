"""What every law fit shares: input checks, goodness of fit, the parabola, the JSON form.

Inputs are checked before any fitting: an error names the argument, the offending value and
position, and what is allowed, so a bad trials table fails loudly instead of fitting nonsense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import nnls


@dataclass(frozen=True)
class Fit:
    """Base of the fitted-law records: named parameters plus a JSON form with provenance.

    Subclasses are frozen dataclasses of plain floats, ints, strings and tuples (immutable, and
    hashable except the bootstrap's per-parameter dicts), and list the names of their fitted
    parameters in `PARAMS`.
    """

    LAW: ClassVar[str] = "fit"
    PARAMS: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict[str, float]:
        """The fitted parameters by name (what `bootstrap` resamples)."""
        return {name: float(getattr(self, name)) for name in self.PARAMS}

    def to_dict(self, **provenance: Any) -> dict[str, Any]:
        """JSON-ready form; `provenance` (study, run ids, trial ids, metric...) comes from the
        caller, which knows where the points came from. Non-finite numbers become None."""
        out: dict[str, Any] = {"law": self.LAW}
        out.update({f.name: jsonable(getattr(self, f.name)) for f in fields(self)})
        out["provenance"] = jsonable(provenance)
        return out


def jsonable(value: Any) -> Any:
    if isinstance(value, Fit):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def as_array(name: str, values, *, positive: bool = False, finite: bool = True) -> np.ndarray:
    """`values` as a 1-D float array; `positive` for quantities whose logarithm is taken."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected numbers, got {values!r} ({err})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    if finite and not np.all(np.isfinite(arr)):
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name}[{i}] = {arr[i]}: every value must be finite (no NaN or inf)")
    if positive and np.any(arr <= 0):
        i = int(np.flatnonzero(arr <= 0)[0])
        raise ValueError(
            f"{name}[{i}] = {arr[i]}: must be > 0 because its logarithm is taken; "
            "drop such points before fitting"
        )
    return arr


def same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have one length each, got {lengths}")
    return next(iter(lengths.values()))


def require_points(what: str, n_points: int, n_params: int) -> None:
    if n_points < n_params:
        raise ValueError(
            f"{what}: {n_points} point(s) for {n_params} parameters; need at least {n_params} "
            "(and more to judge the fit)"
        )


def require_spread(name: str, values: np.ndarray, n_distinct: int = 2) -> None:
    if len(np.unique(values)) < n_distinct:
        raise ValueError(
            f"{name}: needs at least {n_distinct} distinct values to fit a trend, "
            f"got {np.unique(values).tolist()}"
        )


def r_squared(y: np.ndarray, y_fit: np.ndarray) -> float:
    """Coefficient of determination; nan when y does not vary (nothing to explain)."""
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return math.nan
    return 1.0 - float(np.sum((y - y_fit) ** 2)) / ss_tot


def nonneg_lstsq(columns: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares y ≈ Σ coef_k·columns_k with every coef >= 0; returns (coef, rss).

    Used for starting points: amplitudes and loss floors of the laws are all non-negative."""
    coef, norm = nnls(np.column_stack(columns), y)
    return coef, float(norm**2)


def quality(y: np.ndarray, fitted: np.ndarray) -> dict:
    """Goodness-of-fit fields shared by the least-squares laws (loss units)."""
    res = y - fitted
    rss = float(np.sum(res**2))
    return {
        "rss": rss,
        "rmse": math.sqrt(rss / len(y)),
        "r2": r_squared(y, fitted),
        "residuals": floats(res),
        "n_points": len(y),
    }


def edge_estimate(best: int, n: int) -> str:
    """How to read the best of n grid points: a bracketed estimate or a one-sided bound."""
    if best == 0:
        return "upper_bound"  # the optimum is at or below the smallest grid value
    return "lower_bound" if best == n - 1 else "interior"


def floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Parabola:
    """y = curvature·(x − x_min)² + y_min, least squares over the given points."""

    curvature: float
    x_min: float
    y_min: float
    residuals: tuple[float, ...]
    r2: float


def fit_parabola(x: np.ndarray, y: np.ndarray) -> Parabola:
    if len(np.unique(x)) < 3:
        raise ValueError(f"a parabola needs 3 distinct x values, got {np.unique(x).tolist()}")
    c2, c1, c0 = np.polyfit(x, y, 2)
    y_fit = np.polyval([c2, c1, c0], x)
    # A flat or downward parabola has no minimum; its vertex would be a maximum or at infinity.
    x_min = -c1 / (2 * c2) if c2 > 0 else math.nan
    y_min = c0 - c1 * c1 / (4 * c2) if c2 > 0 else math.nan
    return Parabola(float(c2), float(x_min), float(y_min), floats(y - y_fit), r_squared(y, y_fit))
