"""The schedules pinned at hand-computed points, phase boundaries, end values and the WSD branch."""

import math

import numpy as np
import pytest

from trainables.schedules import (
    DECAY_SHAPES,
    ScheduleConfig,
    cosine,
    cosine_decay,
    decay_start,
    exp_decay,
    exp_half_life_for,
    linear_decay,
    linear_warmup,
    lr_at,
    lr_curve,
    megatron_exp_decay,
    one_minus_sqrt_decay,
)

ETA = 0.01


# --- each formula at hand-computed points -------------------------------------------------------


def test_cosine_baseline_points():
    # 0.1 + 0.9·(1 + cos(π/4))/2 = 0.1 + 0.9·0.853553 = 0.868198
    assert cosine(0, 1.0, 100, 0.1) == pytest.approx(1.0)
    assert cosine(25, 1.0, 100, 0.1) == pytest.approx(0.868198, abs=1e-6)
    assert cosine(50, 1.0, 100, 0.1) == pytest.approx(0.55)
    assert cosine(100, 1.0, 100, 0.1) == pytest.approx(0.1)
    assert cosine(250, 1.0, 100, 0.1) == pytest.approx(0.1)


def test_exp_half_life_points():
    assert exp_decay(0, ETA, 8000) == ETA
    assert exp_decay(8000, ETA, 8000) == pytest.approx(ETA / 2)
    assert exp_decay(16000, ETA, 8000) == pytest.approx(ETA / 4)
    # D·ln2/ln10 = 1000·0.693147/2.302585 = 301.03
    assert exp_half_life_for(1000, 0.1) == pytest.approx(301.0300, abs=1e-4)


def test_paper_half_life_8000_fits_the_2p4b_anneal():
    # ~0.1T decay tokens / 3.93M tokens per step ≈ 25,445 steps; 1e-2 should end near 1e-3.
    decay_steps = round(0.1e12 / 3.93e6)
    assert exp_decay(decay_steps, 1e-2, 8000) == pytest.approx(1.10e-3, rel=0.01)
    assert exp_decay(decay_steps, 1e-2, 5000) == pytest.approx(2.94e-4, rel=0.01)


def test_decay_shape_points():
    assert linear_decay(0.5, 1.0, 0.1) == pytest.approx(0.55)
    assert cosine_decay(0.5, 1.0, 0.1) == pytest.approx(0.55)
    assert cosine_decay(0.25, 1.0, 0.1) == pytest.approx(0.868198, abs=1e-6)
    assert one_minus_sqrt_decay(0.25, 1.0) == pytest.approx(0.5)
    # 0.1 + (2·0.5^0.5 − 1)·0.9 = 0.1 + 0.414214·0.9 = 0.472792
    assert megatron_exp_decay(0.5, 1.0, 0.1) == pytest.approx(0.472792, abs=1e-6)


@pytest.mark.parametrize(
    "fn, end",
    [
        (lambda r: linear_decay(r, 1.0, 0.1), 0.1),
        (lambda r: cosine_decay(r, 1.0, 0.1), 0.1),
        (lambda r: megatron_exp_decay(r, 1.0, 0.1), 0.1),
        (lambda r: one_minus_sqrt_decay(r, 1.0), 0.0),
    ],
)
def test_decay_shapes_run_from_peak_to_end(fn, end):
    assert fn(0.0) == pytest.approx(1.0)
    assert fn(1.0) == pytest.approx(end, abs=1e-12)


# --- whole schedules through lr_at --------------------------------------------------------------


def test_warmup_is_linear_for_every_kind():
    for kind in ("constant", "cosine", "wsd"):
        cfg = ScheduleConfig(kind=kind, warmup_steps=10)
        assert lr_at(0, 1000, ETA, cfg) == 0.0
        assert lr_at(5, 1000, ETA, cfg) == pytest.approx(ETA / 2)
        assert lr_at(10, 1000, ETA, cfg) == pytest.approx(ETA)
        assert linear_warmup(10, ETA, 10) == pytest.approx(lr_at(10, 1000, ETA, cfg))


def test_constant_stays_at_peak():
    curve = lr_curve(200, ETA, ScheduleConfig(kind="constant", warmup_steps=20))
    assert np.all(curve[20:] == ETA)


def test_cosine_through_lr_at():
    cfg = ScheduleConfig(kind="cosine")
    assert lr_at(500, 1000, ETA, cfg) == pytest.approx(0.55 * ETA)
    assert lr_at(1000, 1000, ETA, cfg) == pytest.approx(0.1 * ETA)
    short = ScheduleConfig(kind="cosine", cosine_steps=400)
    assert lr_at(200, 1000, ETA, short) == pytest.approx(0.55 * ETA)
    assert lr_at(700, 1000, ETA, short) == pytest.approx(0.1 * ETA)


def test_cosine_after_warmup_starts_at_peak_and_ends_at_floor():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=100)
    assert lr_at(100, 1100, ETA, cfg) == pytest.approx(ETA)
    assert lr_at(600, 1100, ETA, cfg) == pytest.approx(0.55 * ETA)
    assert lr_at(1100, 1100, ETA, cfg) == pytest.approx(0.1 * ETA)


def test_wsd_linear_hand_points():
    cfg = ScheduleConfig(decay_shape="linear")  # total 1000, decay 10% -> S = 900
    assert decay_start(1000, cfg) == 900
    assert lr_at(899, 1000, ETA, cfg) == ETA
    assert lr_at(900, 1000, ETA, cfg) == pytest.approx(ETA)
    assert lr_at(950, 1000, ETA, cfg) == pytest.approx(0.55 * ETA)
    assert lr_at(1000, 1000, ETA, cfg) == pytest.approx(0.1 * ETA)
    assert lr_at(1500, 1000, ETA, cfg) == pytest.approx(0.1 * ETA)


def test_wsd_exp_with_and_without_half_life():
    derived = ScheduleConfig(decay_shape="exp")
    assert lr_at(1000, 1000, ETA, derived) == pytest.approx(0.1 * ETA)
    explicit = ScheduleConfig(decay_steps=200, half_life_steps=50.0)
    assert lr_at(850, 1000, ETA, explicit) == pytest.approx(ETA / 2)
    assert lr_at(1000, 1000, ETA, explicit) == pytest.approx(ETA / 16)


def test_decay_steps_overrides_fraction():
    cfg = ScheduleConfig(decay_fraction=0.5, decay_steps=30)
    assert decay_start(1000, cfg) == 970


@pytest.mark.parametrize("shape", DECAY_SHAPES)
def test_every_shape_is_continuous_at_decay_start_and_monotone(shape):
    cfg = ScheduleConfig(warmup_steps=10, decay_shape=shape)
    curve = lr_curve(1000, ETA, cfg)
    start = decay_start(1000, cfg)
    assert lr_at(start, 1000, ETA, cfg) == pytest.approx(ETA, rel=1e-12)
    assert np.all(np.diff(curve[:10]) > 0)
    assert np.all(np.diff(curve[10:]) <= 1e-18)
    end = 0.0 if shape == "1-sqrt" else 0.1 * ETA
    assert lr_at(1000, 1000, ETA, cfg) == pytest.approx(end, abs=1e-15)
    assert lr_at(1200, 1000, ETA, cfg) == pytest.approx(end, abs=1e-15)


def test_no_jump_at_phase_boundaries_beyond_the_phases_own_slope():
    # Warmup rises η/W per step, a linear decay falls 0.9η/D: no step may move more than that.
    cfg = ScheduleConfig(warmup_steps=20, decay_steps=100, decay_shape="linear")
    steps = np.abs(np.diff(lr_curve(1000, ETA, cfg)))
    assert steps.max() <= max(ETA / 20, 0.9 * ETA / 100) * (1 + 1e-9)


@pytest.mark.parametrize("shape", DECAY_SHAPES)
def test_stable_phase_does_not_depend_on_total_steps(shape):
    cfg = ScheduleConfig(warmup_steps=50, decay_steps=100, decay_shape=shape)
    short, long = lr_curve(600, ETA, cfg), lr_curve(2000, ETA, cfg)
    start = decay_start(600, cfg)
    np.testing.assert_array_equal(short[:start], long[:start])
    # With a fixed decay length every branch decays the same way from its own start.
    branch = decay_start(2000, cfg)
    np.testing.assert_array_equal(short[start:], long[branch:])


@pytest.mark.parametrize("kind", ["constant", "cosine", "wsd"])
def test_schedule_is_linear_in_peak_lr(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=7)
    for step in (0, 3, 7, 500, 950, 999):
        assert lr_at(step, 1000, 0.03, cfg) == pytest.approx(3 * lr_at(step, 1000, 0.01, cfg))


def test_lr_curve_matches_lr_at():
    cfg = ScheduleConfig(warmup_steps=5, decay_shape="cosine")
    curve = lr_curve(100, ETA, cfg)
    assert curve.shape == (100,)
    assert curve.tolist() == [lr_at(s, 100, ETA, cfg) for s in range(100)]


def test_tiny_run_rounds_decay_to_at_least_one_step():
    assert decay_start(5, ScheduleConfig(decay_fraction=0.1)) == 4
    assert math.isclose(lr_at(5, 5, ETA, ScheduleConfig()), 0.1 * ETA)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kind": "step"}, "kind"),
        ({"decay_shape": "poly"}, "decay_shape"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"decay_fraction": 0.0}, "decay_fraction"),
        ({"decay_steps": 0}, "decay_steps"),
        ({"kind": "cosine", "decay_steps": 10}, "decay_steps"),
        ({"cosine_steps": 100}, "cosine_steps"),
        ({"kind": "cosine", "warmup_steps": 10, "cosine_steps": 10}, "cosine_steps"),
        ({"half_life_steps": -3.0}, "half_life_steps"),
        ({"decay_shape": "linear", "half_life_steps": 100.0}, "half_life_steps"),
        ({"min_lr_ratio": 0.0}, "min_lr_ratio"),
    ],
)
def test_config_errors_name_field_value_and_allowed(kwargs, field):
    with pytest.raises(ValueError, match=rf"ScheduleConfig\.{field}=.* must be") as err:
        ScheduleConfig(**kwargs)
    assert repr(kwargs[field]) in str(err.value)


def test_zero_floor_is_fine_where_the_shape_can_reach_it():
    cfg = ScheduleConfig(min_lr_ratio=0.0, decay_shape="linear")
    assert lr_at(1000, 1000, ETA, cfg) == 0.0


def test_call_errors():
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, 100, ETA, ScheduleConfig())
    with pytest.raises(ValueError, match="total_steps=10 .* warmup_steps=10"):
        lr_at(0, 10, ETA, ScheduleConfig(warmup_steps=10))
    with pytest.raises(ValueError, match="lr=-0.1"):
        lr_at(0, 100, -0.1, ScheduleConfig())
    with pytest.raises(ValueError, match="inside the warmup"):
        decay_start(100, ScheduleConfig(warmup_steps=95))
    with pytest.raises(ValueError, match="kind='wsd'"):
        decay_start(100, ScheduleConfig(kind="cosine"))
