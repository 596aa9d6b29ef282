"""Figure helpers: panels, colours and axis limits shared by the analyses.

Figures are built as `matplotlib.figure.Figure` objects, never through pyplot: no global figure
registry to leak between reports, and PNGs render with the Agg canvas on machines without a
display. Loss axes use the study's metric label with its unit (see `_common.METRICS`).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # PNG rendering only; never open a window

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
    ScalarFormatter,
)

PANEL = (5.0, 3.8)  # inches per panel: readable at the report's width with 2-3 panels a row
LOG_KINDS = ("loguniform", "qloguniform")
LR_LABEL = "learning rate"
TOKENS_LABEL = "tokens"
FLOPS_LABEL = "training FLOPs"


def panels(n: int, *, sharey: bool = False, title: str = ""):
    """A figure with n panels in a grid (at most 3 a row, 2 x 2 for four); returns (figure,
    list of axes)."""
    ncols = 2 if n == 4 else min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(PANEL[0] * ncols, PANEL[1] * nrows), layout="constrained")
    grid = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=12)
    for ax in axes[:n]:
        ax.grid(True, which="major", alpha=0.3)
    return fig, axes[:n]


def with_residuals(title: str):
    """A main panel over a short residual panel sharing its x axis; returns (fig, main, res)."""
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    main, res = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    main.set_title(title)
    for ax in (main, res):
        ax.grid(True, alpha=0.3)
    res.axhline(0, color="0.4", lw=0.8)
    return fig, main, res


def palette(n: int, name: str = "viridis") -> list:
    """n colours spread over a colormap, leaving out its palest end (unreadable on white)."""
    cmap = matplotlib.colormaps[name]
    return [cmap(x) for x in np.linspace(0.0, 0.85, max(n, 1))]


def is_log(dist, values) -> bool:
    """Log axis for log ranges, and for numeric choices/grids spanning more than a decade."""
    if dist.kind in LOG_KINDS:
        return True
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return dist.kind in ("choice", "grid") and len(v) > 0 and v.min() > 0 and v.max() / v.min() > 10


def axis_label(path: str) -> str:
    """The axis label of a searched key: its dotted path, or the named quantity."""
    return LR_LABEL if path == "train.lr" else path


def robust_ylim(ax, values, *, top_quantile: float = 0.9, pad: float = 0.08) -> None:
    """Y limits that show the interesting low-loss region: from the lowest value to the
    `top_quantile` of the values (early-training and near-divergence losses would otherwise
    flatten every curve near the optimum into a line)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return
    low, high = float(v.min()), float(np.quantile(v, top_quantile))
    if high <= low:
        high = float(v.max())
    span = (high - low) or abs(low) * 0.05 or 1.0
    ax.set_ylim(low - pad * span, high + pad * span)


def plain_ticks(axis) -> None:
    """Plain-number ticks on a log axis spanning less than a decade (e.g. losses 2.5-5), where
    the default log ticks would leave it unlabelled."""
    axis.set_major_locator(MaxNLocator(nbins=6))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def count(value: float) -> str:
    """Token and parameter counts the way people say them: 23.7K, 1.2M, 2.44B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def count_ticks(axis) -> None:
    """Tick labels as counts (10K, 2M) on a log axis of tokens; call after plotting. Minor ticks
    are labelled too when the axis spans under ~1.5 decades (else it may show one label)."""
    ax = axis.axes
    low, high = ax.get_xlim() if axis is ax.xaxis else ax.get_ylim()
    label = FuncFormatter(lambda v, _: count(v))
    axis.set_major_formatter(label)
    if high / low < 30:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(label)
    else:
        axis.set_minor_formatter(NullFormatter())


def number_ticks(axis) -> None:
    """Plain tick labels at 1, 2, 5 × 10^k (0.002, 0.005, 0.01) on a log axis spanning a few
    decades, instead of a lone 10⁻² label."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def fixed_ticks(axis, values, label=lambda v: f"{v:g}") -> None:
    """Ticks exactly at the given values (e.g. the widths of a sweep), no minor ticks."""
    axis.set_major_locator(FixedLocator(list(values)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))
    axis.set_minor_locator(NullLocator())


def marker(symbol: str | None, label: str, **style) -> Line2D:
    """A legend entry explaining a marker (star = vertex, x = diverged, ...)."""
    style = {"color": "0.3", "ls": "none", "ms": 9, **style}
    return Line2D([], [], marker=symbol, label=label, **style)


def legend_outside(fig, axes, extra: list | None = None, title: str = "") -> None:
    """One legend for the figure, outside the panels so it never covers data: right of a row
    of panels, below a single panel (whose width a side legend would halve)."""
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles += extra or []
    labels += [h.get_label() for h in extra or []]
    where = "outside lower center" if len(axes) == 1 else "outside right upper"
    ncol = 2 if len(axes) == 1 and len(handles) > 3 else 1
    fig.legend(handles, labels, loc=where, ncol=ncol, fontsize=8, title=title or None)
