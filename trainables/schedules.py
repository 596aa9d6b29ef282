"""Learning-rate schedules as pure functions of the step: constant, cosine and WSD.

MiniCPM (arXiv 2404.06395 §4) trains with Warmup-Stable-Decay: a linear warmup, a long stable
phase at the peak lr η, and a short decay. Because the stable phase does not depend on how long
the run will be, one stable run's checkpoint can be continued at η and decayed later into any
number of endpoints. `lr_at` is the one entry point; each phase and decay shape is its own small
function with its formula and source, so tests and plots can pin them one by one.

Every formula is linear in η, so `lr_at(step, total_steps, 1.0, cfg)` is the multiplier to apply
to each μP parameter group's own learning rate.

Print one:
    python -c "import trainables.schedules as s; print(s.lr_curve(50, 0.01, s.ScheduleConfig()))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("constant", "cosine", "wsd")
DECAY_SHAPES = ("exp", "linear", "cosine", "1-sqrt", "megatron-exp")
# No run has more steps than its token budget allows (TrainConfig and PretrainConfig cap tokens
# at 1e15, at least one token per step), so a step count above this is a typo such as 1e30.
MAX_STEPS = 10**15


@dataclass(frozen=True)
class ScheduleConfig:
    """How the learning rate moves over a run; the peak lr η and the run length come per call.

    kind: "constant" | "cosine" | "wsd".
    warmup_steps: linear warmup η·s/W for s < W, for every kind.
    cosine_steps: cosine's T, counted from step 0 (None: the run's total steps); floor after T.
    min_lr_ratio: the floor as a fraction of η (0.1: MiniCPM's cosine baseline ends at 0.1η).
    decay_fraction: WSD decays over this fraction of the total steps (MiniCPM: ~10% suffices).
    decay_steps: WSD decay length in steps; when set it takes precedence over decay_fraction.
    decay_shape: the WSD decay: "exp", "linear", "cosine", "1-sqrt", "megatron-exp".
    half_life_steps: "exp" only; None picks the half-life that lands on min_lr_ratio·η at the
        end of the decay (see `exp_half_life_for`).
    """

    kind: str = "wsd"
    warmup_steps: int = 0
    cosine_steps: int | None = None
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.1
    decay_steps: int | None = None
    decay_shape: str = "exp"
    half_life_steps: float | None = None

    def __post_init__(self) -> None:
        _require(self.kind in KINDS, "kind", self.kind, f"one of {KINDS}")
        shape_ok = self.decay_shape in DECAY_SHAPES
        _require(shape_ok, "decay_shape", self.decay_shape, f"one of {DECAY_SHAPES}")
        warmup_ok = _is_int(self.warmup_steps) and 0 <= self.warmup_steps <= MAX_STEPS
        _require(warmup_ok, "warmup_steps", self.warmup_steps, f"an int in 0..{MAX_STEPS:.0e}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        fraction_ok = 0.0 < self.decay_fraction <= 1.0
        _require(fraction_ok, "decay_fraction", self.decay_fraction, "in (0, 1]")
        self._check_cosine_steps()
        self._check_decay_steps()
        self._check_half_life()

    def _check_cosine_steps(self) -> None:
        if self.cosine_steps is None:
            return
        _require(
            self.kind == "cosine", "cosine_steps", self.cosine_steps, "None unless kind='cosine'"
        )
        ok = _is_int(self.cosine_steps) and self.warmup_steps < self.cosine_steps <= MAX_STEPS
        allowed = f"an int > warmup_steps={self.warmup_steps} and <= {MAX_STEPS:.0e}"
        _require(ok, "cosine_steps", self.cosine_steps, allowed)

    def _check_decay_steps(self) -> None:
        if self.decay_steps is None:
            return
        _require(self.kind == "wsd", "decay_steps", self.decay_steps, "None unless kind='wsd'")
        ok = _is_int(self.decay_steps) and 1 <= self.decay_steps <= MAX_STEPS
        _require(ok, "decay_steps", self.decay_steps, f"None or an int in 1..{MAX_STEPS:.0e}")

    def _check_half_life(self) -> None:
        exp_wsd = self.kind == "wsd" and self.decay_shape == "exp"
        if self.half_life_steps is not None:
            allowed = "None unless kind='wsd' and decay_shape='exp'"
            _require(exp_wsd, "half_life_steps", self.half_life_steps, allowed)
            ok = 0 < self.half_life_steps <= MAX_STEPS
            _require(ok, "half_life_steps", self.half_life_steps, f"in (0, {MAX_STEPS:.0e}]")
        elif exp_wsd:
            # An exponential never reaches 0, so the derived half-life needs a positive floor.
            allowed = "> 0 for decay_shape='exp' without half_life_steps"
            _require(self.min_lr_ratio > 0, "min_lr_ratio", self.min_lr_ratio, allowed)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, field: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"ScheduleConfig.{field}={value!r} is invalid: must be {allowed}")


# --- phases -------------------------------------------------------------------------------------


def linear_warmup(step: int, lr: float, warmup_steps: int) -> float:
    """η·s/W for s < W (the W of MiniCPM's WSD, §4); the caller switches phase at s = W."""
    return lr * step / warmup_steps


def constant(lr: float) -> float:
    """η: the stable phase of WSD, and the whole schedule for kind="constant"."""
    return lr


def cosine(step: int, lr: float, T: int, min_ratio: float) -> float:
    """min·η + (1 − min)·η·(1 + cos(π·s/T))/2 for s < T, then min·η.

    With min = 0.1 this is MiniCPM's Cosine(T) baseline (arXiv 2404.06395 §4.1).
    """
    if step >= T:
        return min_ratio * lr
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * step / T)))


# --- WSD decay shapes: t = steps since the decay began, r = t / decay_steps in [0, 1] ----------


def exp_decay(t: float, lr: float, half_life_steps: float) -> float:
    """η·0.5^(t/T_half): MiniCPM's exponential anneal (paper §4, blog 2024-02-01).

    The paper quotes T_half = 5000 steps, the blog 8000; for the 2.4B model's ~0.1T-token decay
    8000 matches the stated 1e-2 → 1e-3. No floor: the end value is η·0.5^(D/T_half).
    """
    return lr * 0.5 ** (t / half_life_steps)


def exp_half_life_for(decay_steps: int, min_ratio: float) -> float:
    """The T_half with η·0.5^(D/T_half) = min_ratio·η: D·ln 2 / ln(1/min_ratio)."""
    return decay_steps * math.log(2.0) / math.log(1.0 / min_ratio)


def linear_decay(r: float, lr: float, min_ratio: float) -> float:
    """η·(1 − (1 − min)·r): straight to min·η (maintainer snippet, OpenBMB/MiniCPM issue #73)."""
    return lr * (1.0 - (1.0 - min_ratio) * r)


def cosine_decay(r: float, lr: float, min_ratio: float) -> float:
    """min·η + (1 − min)·η·(1 + cos(π·r))/2: a half cosine from η down to min·η."""
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * r)))


def one_minus_sqrt_decay(r: float, lr: float) -> float:
    """η·(1 − sqrt(r)): the "1-sqrt" cooldown of Hägele et al. 2024 (arXiv 2405.18392 §3).

    Exactly as published it cools down to 0, so min_lr_ratio does not apply; Megatron-LM's
    "minus_sqrt" variant differs by flooring at its min_lr.
    """
    return lr * (1.0 - math.sqrt(r))


def megatron_exp_decay(r: float, lr: float, min_ratio: float) -> float:
    """min + (2·0.5^r − 1)·(max − min), max = η, min = min·η: Megatron-LM's bounded exponential.

    From megatron/core/optimizer_param_scheduler.py (WSD, lr_wsd_decay_style="exponential"):
    it runs from η at r = 0 to exactly min·η at r = 1, unlike the half-life form above.
    """
    # Factored as η·(min + coeff·(1 − min)) so that r = 0 gives exactly η, never η + 1 ulp.
    return lr * (min_ratio + (2.0 * 0.5**r - 1.0) * (1.0 - min_ratio))


def wsd_decay(t: int, decay_steps: int, lr: float, cfg: ScheduleConfig) -> float:
    """The lr t steps into a WSD decay of `decay_steps` steps, in the shape cfg.decay_shape."""
    r = min(t / decay_steps, 1.0)
    if cfg.decay_shape == "exp":
        half_life = cfg.half_life_steps or exp_half_life_for(decay_steps, cfg.min_lr_ratio)
        return exp_decay(r * decay_steps, lr, half_life)
    if cfg.decay_shape == "linear":
        return linear_decay(r, lr, cfg.min_lr_ratio)
    if cfg.decay_shape == "cosine":
        return cosine_decay(r, lr, cfg.min_lr_ratio)
    if cfg.decay_shape == "1-sqrt":
        return one_minus_sqrt_decay(r, lr)
    return megatron_exp_decay(r, lr, cfg.min_lr_ratio)


# --- whole schedules ----------------------------------------------------------------------------


def decay_steps_of(total_steps: int, cfg: ScheduleConfig) -> int:
    """D: cfg.decay_steps, else round(decay_fraction · total_steps), at least 1."""
    if cfg.decay_steps is not None:
        return cfg.decay_steps
    return max(1, round(cfg.decay_fraction * total_steps))


def decay_start(total_steps: int, cfg: ScheduleConfig) -> int:
    """S = total_steps − D: the step where WSD's decay begins, i.e. where an anneal branches off."""
    if cfg.kind != "wsd":
        raise ValueError(f"decay_start needs kind='wsd', got kind={cfg.kind!r}")
    start = total_steps - decay_steps_of(total_steps, cfg)
    if start < cfg.warmup_steps:
        raise ValueError(
            f"total_steps={total_steps} leaves decay_start={start} inside the warmup "
            f"(warmup_steps={cfg.warmup_steps}); use more steps or a shorter decay"
        )
    return start


def wsd(step: int, total_steps: int, lr: float, cfg: ScheduleConfig) -> float:
    """Stable η until S = decay_start, then the decay; held at its end value after total_steps.

    The lr before S is η whatever total_steps is: that is what lets decays branch from one stable
    checkpoint (MiniCPM §4). The warmup is applied by `lr_at`.
    """
    start = decay_start(total_steps, cfg)
    if step < start:
        return constant(lr)
    return wsd_decay(step - start, total_steps - start, lr, cfg)


def lr_at(step: int, total_steps: int, lr: float, cfg: ScheduleConfig) -> float:
    """The learning rate at optimizer step `step` (0-based) of a `total_steps` run peaking at lr.

    Decays reach their end value at step = total_steps, just after the last optimizer step, and
    hold it beyond.

    Cosine runs from the end of the warmup: cos(π·(s − W)/(T − W)), which is the paper's
    cos(π·s/T) when W = 0 and keeps the curve continuous at s = W otherwise.
    """
    _check_call(step, total_steps, lr, cfg)
    if step < cfg.warmup_steps:
        return linear_warmup(step, lr, cfg.warmup_steps)
    if cfg.kind == "constant":
        return constant(lr)
    if cfg.kind == "cosine":
        T = cfg.cosine_steps or total_steps
        return cosine(step - cfg.warmup_steps, lr, T - cfg.warmup_steps, cfg.min_lr_ratio)
    return wsd(step, total_steps, lr, cfg)


def _check_call(step: int, total_steps: int, lr: float, cfg: ScheduleConfig) -> None:
    if step < 0:
        raise ValueError(f"step={step} is invalid: must be >= 0")
    if total_steps <= cfg.warmup_steps:
        raise ValueError(
            f"total_steps={total_steps} is invalid: must exceed warmup_steps={cfg.warmup_steps}"
        )
    if lr < 0:
        raise ValueError(f"lr={lr} is invalid: must be >= 0")


def lr_curve(total_steps: int, lr: float, cfg: ScheduleConfig) -> np.ndarray:
    """The lr of each optimizer step 0 … total_steps − 1, shape (total_steps,), float64."""
    return np.fromiter(
        (lr_at(s, total_steps, lr, cfg) for s in range(total_steps)), float, count=total_steps
    )
