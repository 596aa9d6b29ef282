"""The law fits recover known laws from synthetic study results, and refuse bad inputs.

Noise-free data must give the true parameters to 1e-6 (the brief asks 1%); noisy data gets the
looser tolerances stated beside each assertion, pinned by a seed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sandbox_service.laws import (
    LROptimum,
    bootstrap,
    compute_optimal_ratio,
    envelope,
    fit_bs_law,
    fit_exponential,
    fit_loss_nd,
    fit_lr_optimum,
    fit_power_law,
    lr_drift,
    optimal_batch_for_loss,
    predict_bs,
    predict_loss,
    tokens_to_reach,
)

BS_A, BS_B = 1.2110e9, 6.2393  # MiniCPM, optimal batch size: bs_tokens = 1.2110e9 / L^6.2393
LR_GRID = np.geomspace(1e-3, 1e-1, 6)  # 1e-3, 2.5e-3, 6.3e-3, 1.6e-2, 4.0e-2, 1e-1
ALPHA, BETA = 0.29, 0.23  # MiniCPM's L(N, D) fit


def lr_sweep(lr_opt, curvature=0.3, floor=3.0):
    return curvature * (np.log(LR_GRID) - math.log(lr_opt)) ** 2 + floor


def power_data():
    compute = np.geomspace(1e17, 1e20, 20)
    return compute, 2e3 * compute**-0.2 + 1.8


def exponential_data():
    compute = np.linspace(1e18, 1e19, 20)
    return compute, 1.5 * np.exp(-3e-19 * compute) + 2.0


def nd_data():
    n = np.repeat(np.geomspace(1e7, 5e8, 6), 6)  # 6 sizes x 6 data amounts, as in the paper
    d = n * np.tile([10, 20, 40, 80, 160, 320], 6)
    return n, d, 200 * n**-ALPHA + 300 * d**-BETA + 1.7


# --- learning rate -----------------------------------------------------------------------------


def test_lr_optimum_between_grid_points():
    assert not np.any(np.isclose(LR_GRID, 0.01, rtol=0.05))
    for window in (1, 2):
        fit = fit_lr_optimum(LR_GRID, lr_sweep(0.01), window=window)
        assert fit.lr_opt == pytest.approx(0.01, rel=1e-6)
        assert fit.curvature == pytest.approx(0.3, rel=1e-6)
        assert fit.loss_opt == pytest.approx(3.0, rel=1e-9)
        assert (fit.estimate, fit.at_edge) == ("interior", False)
    assert len(fit_lr_optimum(LR_GRID, lr_sweep(0.01)).lrs_used) == 3


def test_lr_optimum_with_noise_and_repeated_seeds():
    rng = np.random.default_rng(0)
    lrs = np.concatenate([LR_GRID, LR_GRID])  # two seeds per lr
    losses = np.concatenate([lr_sweep(0.01), lr_sweep(0.01)]) + rng.normal(0, 0.01, 12)
    fit = fit_lr_optimum(lrs, losses)
    assert fit.lr_opt == pytest.approx(0.01, rel=0.05)  # 0.01 loss noise: within 5%
    assert fit.n_points == 12


def test_diverged_trials_are_dropped_and_counted():
    losses = lr_sweep(0.01)
    losses[-1] = math.nan
    fit = fit_lr_optimum(LR_GRID, losses)
    assert fit.n_diverged == 1 and fit.n_points == 5
    assert fit.lr_opt == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize(
    ("true_opt", "estimate", "edge_lr"), [(0.5, "lower_bound", 0.1), (1e-4, "upper_bound", 1e-3)]
)
def test_lr_optimum_at_grid_edge_is_a_bound(true_opt, estimate, edge_lr):
    fit = fit_lr_optimum(LR_GRID, lr_sweep(true_opt))
    assert fit.at_edge and fit.estimate == estimate
    assert fit.lr_opt == pytest.approx(edge_lr)


def test_lr_drift_separates_mup_from_sp():
    mup = lr_drift({64: 0.0100, 128: 0.0102, 256: 0.0099, 512: 0.0101})
    assert abs(mup.slope) < 0.02 and mup.ratio < 1.05
    sp = lr_drift({w: 0.01 * 64 / w for w in (64, 128, 256, 512)})
    assert sp.slope == pytest.approx(-1.0) and sp.ratio == pytest.approx(8.0)
    edge = fit_lr_optimum(LR_GRID, lr_sweep(0.5))
    inner = fit_lr_optimum(LR_GRID, lr_sweep(0.01))
    assert lr_drift({64: inner, 256: edge}).bounded_widths == (256.0,)


# --- batch size --------------------------------------------------------------------------------


def test_tokens_to_reach_on_hand_built_curve():
    tokens = [0, 100, 200, 300, 400]
    losses = [5.0, 4.0, 4.2, 3.0, 2.5]  # the bump at 200 is eval noise: running min is 4.0
    assert tokens_to_reach(tokens, losses, 3.5) == pytest.approx(250.0)
    assert tokens_to_reach(tokens, losses, 4.0) == pytest.approx(100.0)
    assert tokens_to_reach(tokens, losses, 4.5) == pytest.approx(50.0)
    assert tokens_to_reach(tokens, losses, 6.0) == 0.0
    assert tokens_to_reach(tokens, losses, 2.0) is None
    assert tokens_to_reach(tokens, [5.0, math.nan, 4.0, 3.0, 2.5], 3.5) == pytest.approx(250.0)


def test_bs_law_recovers_the_paper_law():
    losses = np.linspace(2.5, 4.0, 7)
    law = fit_bs_law(losses, BS_A / losses**BS_B)
    assert law.a == pytest.approx(BS_A, rel=1e-6) and law.b == pytest.approx(BS_B, rel=1e-6)
    assert predict_bs(law, 2.5) == pytest.approx(3.98e6, rel=1e-3)  # the paper's ≈ 4M at L = 2.5
    assert predict_bs(law, 3.0) == pytest.approx(1.28e6, rel=3e-3)
    np.testing.assert_allclose(predict_bs(law, [2.5, 3.0]), BS_A / np.array([2.5, 3.0]) ** BS_B)


def test_bs_law_with_noise():
    losses = np.linspace(2.5, 4.0, 7)
    noisy = BS_A / losses**BS_B * np.exp(np.random.default_rng(0).normal(0, 0.02, 7))
    law = fit_bs_law(losses, noisy)
    assert law.b == pytest.approx(BS_B, rel=0.02)  # 2% noise in bs: b within 2%
    assert law.a == pytest.approx(BS_A, rel=0.15)  # a carries b's error times L^b
    assert predict_bs(law, 2.5) == pytest.approx(3.98e6, rel=0.03)


def synthetic_bs_curves(grid):
    """Runs whose tokens-to-loss are quadratic in ln bs around the paper's bs(L)."""

    def curve(bs):
        loss = np.linspace(4.5, 2.8, 3000)
        log_opt = math.log(BS_A) - BS_B * np.log(loss)
        tokens = 1e9 * loss**-3.0 * np.exp(0.05 * (math.log(bs) - log_opt) ** 2)
        return tokens, loss

    return {bs: curve(bs) for bs in grid}


def test_bs_study_end_to_end_recovers_the_law():
    curves = synthetic_bs_curves(np.geomspace(1.5e5, 4e6, 6))
    targets = [3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6]
    optima = [optimal_batch_for_loss(curves, loss) for loss in targets]
    assert all(o.refined and o.estimate == "interior" for o in optima)
    law = fit_bs_law(targets, [o.batch_tokens_opt for o in optima])
    assert law.a == pytest.approx(BS_A, rel=0.01) and law.b == pytest.approx(BS_B, rel=0.01)


def test_best_batch_at_grid_edge_is_flagged():
    curves = synthetic_bs_curves(np.geomspace(2e6, 8e6, 4))  # all above bs(3.5) = 0.55M
    best = optimal_batch_for_loss(curves, 3.5)
    assert best.at_edge and best.estimate == "upper_bound" and not best.refined
    assert best.batch_tokens_opt == pytest.approx(2e6)
    with pytest.raises(ValueError, match="no run reaches loss 2.0"):
        optimal_batch_for_loss(curves, 2.0)


# --- scaling -----------------------------------------------------------------------------------


def test_envelope_is_the_monotone_best_so_far():
    rng = np.random.default_rng(0)
    compute, loss = [], []
    for size in (1.0, 3.0, 9.0):  # bigger runs start worse and end better
        c = np.geomspace(1e16, 1e19, 30) * size
        compute.extend(c)
        loss.extend(
            1e2 * size**0.5 * c**-0.15 + 1.8 - 0.05 * np.log(size) + rng.normal(0, 1e-3, 30)
        )
    loss[5] = math.nan
    env = envelope(compute, loss)
    assert env.n_dropped_nonfinite == 1
    assert np.all(np.diff(env.compute) > 0) and np.all(np.diff(env.loss) < 0)
    assert env.compute[0] == min(compute)
    for c, y in zip(compute, loss, strict=True):
        if math.isfinite(y):  # no point beats the envelope at its compute
            at_or_before = np.searchsorted(env.compute, c, side="right") - 1
            assert env.loss[at_or_before] <= y
    assert [loss[i] for i in env.index] == list(env.loss)


def test_power_law_recovered_and_preferred_on_power_data():
    compute, loss = power_data()
    power = fit_power_law(compute, loss)
    assert power.alpha == pytest.approx(0.2, rel=1e-6) and power.l0 == pytest.approx(1.8, rel=1e-6)
    assert power.beta == pytest.approx(2e3, rel=1e-5)
    np.testing.assert_allclose(predict_loss(power, compute), loss, rtol=1e-9)
    noisy = loss + np.random.default_rng(0).normal(0, 0.005, len(loss))
    power, expo = fit_power_law(compute, noisy), fit_exponential(compute, noisy)
    assert power.alpha == pytest.approx(0.2, rel=0.1)  # 0.005 loss noise: α within 10%
    assert power.l0 == pytest.approx(1.8, rel=0.02)
    assert expo.rss > 50 * power.rss


def test_exponential_recovered_and_preferred_on_exponential_data():
    compute, loss = exponential_data()
    expo = fit_exponential(compute, loss)
    assert expo.alpha == pytest.approx(1.5, rel=1e-6) and expo.beta == pytest.approx(
        3e-19, rel=1e-6
    )
    assert expo.l0 == pytest.approx(2.0, rel=1e-6)
    noisy = loss + np.random.default_rng(0).normal(0, 0.005, len(loss))
    assert fit_power_law(compute, noisy).rss > 10 * fit_exponential(compute, noisy).rss


def test_loss_nd_recovers_minicpm_exponents():
    n, d, loss = nd_data()
    law = fit_loss_nd(n, d, loss)
    for name, true in dict(alpha=ALPHA, beta=BETA, c_n=200, c_d=300, l0=1.7).items():
        assert getattr(law, name) == pytest.approx(true, rel=1e-6), name
    noisy = fit_loss_nd(n, d, loss + np.random.default_rng(0).normal(0, 0.003, len(loss)))
    assert noisy.alpha == pytest.approx(ALPHA, rel=0.03)  # 0.003 loss noise: within 3%
    assert noisy.beta == pytest.approx(BETA, rel=0.03)
    assert predict_loss(law, 2.4e9, 1e12) == pytest.approx(
        200 * 2.4e9**-ALPHA + 300 * 1e12**-BETA + 1.7
    )


def test_compute_optimal_split_matches_brute_force():
    law = fit_loss_nd(*nd_data())
    opt = compute_optimal_ratio(law, 1e21)
    sizes = np.geomspace(1e7, 1e11, 20001)
    brute = sizes[np.argmin(law.predict(sizes, 1e21 / (6 * sizes)))]
    assert opt.n_opt == pytest.approx(brute, rel=1e-3)
    assert 6 * opt.n_opt * opt.d_opt == pytest.approx(1e21)
    assert opt.ratio_exponent == pytest.approx((ALPHA - BETA) / (ALPHA + BETA))
    ten_x = compute_optimal_ratio(law, 1e22)
    assert ten_x.d_over_n / opt.d_over_n == pytest.approx(10**opt.ratio_exponent)
    # D/N = (β·C_D / (α·C_N))^(2/(α+β)) · (C/6)^((α−β)/(α+β))
    closed = (BETA * 300 / (ALPHA * 200)) ** (2 / (ALPHA + BETA)) * (1e21 / 6) ** (
        (ALPHA - BETA) / (ALPHA + BETA)
    )
    assert opt.d_over_n == pytest.approx(closed, rel=1e-5)
    assert opt.d_over_n == pytest.approx(420.1, rel=1e-3)


# --- bootstrap and JSON --------------------------------------------------------------------------


def test_bootstrap_interval_covers_truth_and_is_deterministic():
    losses = np.linspace(2.5, 4.0, 12)
    noisy = BS_A / losses**BS_B * np.exp(np.random.default_rng(1).normal(0, 0.02, 12))
    ci = bootstrap(fit_bs_law, losses, noisy, n=200, seed=0)
    assert ci.low["b"] < BS_B < ci.high["b"] and ci.low["a"] < BS_A < ci.high["a"]
    assert ci.std["b"] > 0 and ci.n_failed == 0
    assert bootstrap(fit_bs_law, losses, noisy, n=200, seed=0) == ci
    assert bootstrap(fit_bs_law, losses, noisy, n=200, seed=1).low != ci.low


def test_bootstrap_counts_failed_resamples():
    def needs_four_distinct(x, y):
        if len(np.unique(x)) < 4:
            raise ValueError("too few distinct points")
        return {"mean": float(np.mean(y))}

    x = np.arange(5.0)
    ci = bootstrap(needs_four_distinct, x, x, n=100, seed=0)
    assert 20 < ci.n_failed < 80  # P(fewer than 4 distinct of 5 drawn) = 0.58
    only_all_points = lambda x, y: needs_four_distinct(x if np.all(np.diff(x) > 0) else x[:1], y)
    with pytest.raises(ValueError, match="10 of 10 resamples failed"):
        bootstrap(only_all_points, x, x, n=10)


def test_to_dict_is_json_with_provenance():
    fit = fit_lr_optimum(LR_GRID, lr_sweep(0.01))
    record = json.loads(json.dumps(fit.to_dict(study="lr-transfer", width=256), allow_nan=False))
    assert record["law"] == "lr_optimum" and record["provenance"]["study"] == "lr-transfer"
    assert record["lr_opt"] == pytest.approx(0.01)
    ci = bootstrap(fit_bs_law, np.linspace(2.5, 4, 6), BS_A / np.linspace(2.5, 4, 6) ** BS_B, n=5)
    assert json.loads(json.dumps(ci.to_dict(), allow_nan=False))["n_resamples"] == 5
    assert isinstance(fit, LROptimum) and fit.params().keys() == {"lr_opt", "curvature", "loss_opt"}


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fit_bs_law([3.0], [1e6]), "1 point.*need at least 2"),
        (lambda: fit_bs_law([3.0, -1.0], [1e6, 2e6]), r"losses\[1\] = -1.0: must be > 0"),
        (lambda: fit_bs_law([3.0, 2.5], [1e6, math.nan]), r"batch_tokens\[1\].*finite"),
        (lambda: fit_bs_law([3.0, 2.5, 2.0], [1e6, 2e6]), "one length"),
        (lambda: fit_bs_law([3.0, 3.0], [1e6, 2e6]), "distinct"),
        (lambda: fit_lr_optimum([1e-3, 1e-2, 0.1], [3.0, 2.9, math.nan]), "need at least 3"),
        (lambda: fit_lr_optimum([0.0, 1e-2, 0.1], [3.0, 2.9, 3.1]), r"lrs\[0\] = 0.0"),
        (lambda: fit_lr_optimum(LR_GRID, lr_sweep(0.01), window=0), "window=0"),
        (lambda: fit_power_law([1e18, 1e19], [3.0, 2.9]), "2 point.*need at least 3"),
        (lambda: fit_exponential([1e18, 0.0, 1e20], [3.0, 2.9, 2.8]), r"compute\[1\]"),
        (lambda: fit_loss_nd([1e7] * 4, [1e9] * 4, [3.0] * 4), "need at least 5"),
        (lambda: fit_loss_nd(*nd_data()[:1], nd_data()[0] * 20, nd_data()[2]), "independently"),
        (lambda: tokens_to_reach([0, 200, 100], [4.0, 3.0, 2.0], 3.0), "strictly increasing"),
        (lambda: compute_optimal_ratio(fit_loss_nd(*nd_data()), -1.0), "compute=-1.0"),
        (lambda: lr_drift({64: 0.01}), "distinct"),
        (lambda: predict_loss(fit_bs_law([3.0, 2.5], [1e6, 2e6]), 3.0), "not a loss law"),
    ],
)
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
