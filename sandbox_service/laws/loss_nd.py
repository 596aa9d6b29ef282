"""Loss as a function of model size and data, and the compute-optimal split (MiniCPM study 5).

MiniCPM (arXiv 2404.06395, "Measuring the Scaling Law with WSD LRS") fits
L(N, D) = C_N·N^(−α) + C_D·D^(−β) + L0 to WSD endpoints of 6 sizes × 6 decay points (the
Chinchilla form, Hoffmann et al. 2022, arXiv 2203.15556, eq. 2), finds α = 0.29, β = 0.23 and
reports a compute-optimal D/N ≈ 192 (Chinchilla: ≈ 20). N counts non-embedding parameters,
D training tokens, C = 6·N·D FLOPs.

    law = fit_loss_nd(N, D, L)
    opt = compute_optimal_ratio(law, 1e21)   # n_opt, d_opt, d_over_n
    predict_loss(law, 2.4e9, 1e12)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from sandbox_service.laws._fit import (
    Fit,
    as_array,
    nonneg_lstsq,
    quality,
    require_points,
    same_length,
)


@dataclass(frozen=True)
class LossND(Fit):
    """L(N, D) = c_n·N^(−alpha) + c_d·D^(−beta) + l0, N in parameters, D in tokens."""

    LAW = "loss_nd"
    PARAMS = ("alpha", "beta", "c_n", "c_d", "l0")

    alpha: float
    beta: float
    c_n: float
    c_d: float
    l0: float
    rss: float
    rmse: float
    r2: float
    residuals: tuple[float, ...]
    n_points: int
    n_range: tuple[float, float]
    d_range: tuple[float, float]

    def predict(self, n_params, tokens):
        n = np.asarray(n_params, dtype=float)
        d = np.asarray(tokens, dtype=float)
        return self.c_n * n ** (-self.alpha) + self.c_d * d ** (-self.beta) + self.l0


def fit_loss_nd(n_params, tokens, loss) -> LossND:
    """Least squares of L(N, D) in loss units.

    Conditioning: N and D are divided by their geometric means, the amplitudes and exponents are
    fitted as logarithms and L0 is bounded to [0, min L]. Start: a grid over (α, β) with the
    amplitudes and L0 solved as a non-negative linear problem at each pair.
    """
    n = as_array("n_params", n_params, positive=True)
    d = as_array("tokens", tokens, positive=True)
    y = as_array("loss", loss, positive=True)
    require_points("fit_loss_nd", same_length(n_params=n, tokens=d, loss=y), 5)
    _require_independent(n, d)
    n_ref, d_ref = (float(np.exp(np.log(v).mean())) for v in (n, d))
    u, v = n / n_ref, d / d_ref

    def model(theta):
        amp_n, alpha, amp_d, beta = np.exp(theta[:4])
        return amp_n * u**-alpha + amp_d * v**-beta + theta[4]

    start = _grid_start(u, v, y)
    bounds = ([-np.inf] * 4 + [0.0], [np.inf] * 4 + [float(y.min())])
    sol = least_squares(
        lambda t: model(t) - y, start, bounds=bounds, x_scale="jac", xtol=1e-12, ftol=1e-12
    )
    amp_n, alpha, amp_d, beta = (float(x) for x in np.exp(sol.x[:4]))
    return LossND(
        alpha=alpha,
        beta=beta,
        c_n=amp_n * n_ref**alpha,  # A·(N/N_ref)^−α = (A·N_ref^α)·N^−α
        c_d=amp_d * d_ref**beta,
        l0=float(sol.x[4]),
        **quality(y, model(sol.x)),
        n_range=(float(n.min()), float(n.max())),
        d_range=(float(d.min()), float(d.max())),
    )


def _require_independent(n: np.ndarray, d: np.ndarray) -> None:
    design = np.column_stack([np.ones_like(n), np.log(n), np.log(d)])
    if np.linalg.matrix_rank(design, tol=1e-8 * len(n)) < 3:
        raise ValueError(
            "fit_loss_nd: log N and log D do not vary independently (e.g. one size, one data "
            "amount, or D a fixed multiple of N), so α and β cannot be separated; use several "
            "data amounts per size (WSD decays branched from one stable run)"
        )


def _grid_start(u: np.ndarray, v: np.ndarray, y: np.ndarray) -> np.ndarray:
    best, best_rss = None, math.inf
    exponents = np.geomspace(0.02, 2.0, 30)
    for alpha, beta in itertools.product(exponents, exponents):
        (amp_n, amp_d, l0), rss = nonneg_lstsq([u**-alpha, v**-beta, np.ones_like(y)], y)
        if rss < best_rss:
            logs = [math.log(max(x, 1e-12)) for x in (amp_n, alpha, amp_d, beta)]
            best, best_rss = np.array([*logs, min(l0, y.min())]), rss
    return best


@dataclass(frozen=True)
class ComputeOptimal(Fit):
    """The N and D minimising L(N, D) at fixed compute C = 6·N·D, and how they scale with C."""

    LAW = "compute_optimal"
    PARAMS = ("n_opt", "d_opt", "d_over_n")

    compute: float  # FLOPs
    n_opt: float  # non-embedding parameters
    d_opt: float  # tokens
    d_over_n: float
    loss_opt: float
    n_exponent: float  # n_opt ∝ C^n_exponent = β/(α+β)
    d_exponent: float  # d_opt ∝ C^d_exponent = α/(α+β)
    ratio_exponent: float  # d_over_n ∝ C^ratio_exponent = (α−β)/(α+β)


def compute_optimal_ratio(law: LossND, compute: float) -> ComputeOptimal:
    """Closed-form compute-optimal split (Hoffmann et al. 2022, eq. 4, with L0 dropping out).

    With D = C/(6N): L(N) = C_N·N^−α + C_D·(C/6)^−β·N^β + L0, and dL/dN = 0 gives
        α·C_N·N^−α = β·C_D·(C/6)^−β·N^β
        N_opt = G·(C/6)^(β/(α+β)),  D_opt = (C/6)/N_opt = G^−1·(C/6)^(α/(α+β)),
        G = (α·C_N / (β·C_D))^(1/(α+β)),
        D_opt/N_opt = (β·C_D / (α·C_N))^(2/(α+β)) · (C/6)^((α−β)/(α+β)).
    So the ratio is not fixed by the exponents: it depends on C_D/C_N (with N in parameters
    and D in tokens) and, unless α = β, on the compute. For α = 0.29, β = 0.23 it grows as
    C^0.115 and equals (0.793·C_D/C_N)^3.85 · (C/6)^0.115.
    """
    if not (isinstance(compute, (int, float)) and math.isfinite(compute) and compute > 0):
        raise ValueError(f"compute={compute!r}: must be a finite number of FLOPs > 0")
    a, b = law.alpha, law.beta
    budget = compute / 6.0  # = N·D
    g = (a * law.c_n / (b * law.c_d)) ** (1.0 / (a + b))
    n_opt = g * budget ** (b / (a + b))
    d_opt = budget / n_opt
    return ComputeOptimal(
        compute=float(compute),
        n_opt=float(n_opt),
        d_opt=float(d_opt),
        d_over_n=float(d_opt / n_opt),
        loss_opt=float(law.predict(n_opt, d_opt)),
        n_exponent=b / (a + b),
        d_exponent=a / (a + b),
        ratio_exponent=(a - b) / (a + b),
    )
