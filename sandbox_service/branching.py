"""WSD branching as a study feature: one stable run per model, many decays branched from it.

MiniCPM §3.4: with Warmup-Stable-Decay the stable phase runs at constant η, so a checkpoint of it
at step S can be decayed later, and any number of endpoints branch from ONE stable run. A study
with a `branching:` section runs in two phases:

1. **stable**: each configuration of the search space trains at constant lr (after warmup) to
   the largest branch step, keeping checkpoints at every branch step (`train.save_steps`);
2. **decay**: for every stable trial, branch step S, decay fraction f and decay shape, a trial
   starts from the checkpoint at S and decays for D = f·S/(1−f) steps, so the decay is the
   fraction f of the endpoint's S + D steps. Optional cosine baselines train from scratch with
   T = S + D(cosine_fraction), the paper's Cosine(T) comparison.

Compute is accounted honestly: a decay trial's `own_flops` counts only its decay steps; the
stable run is counted once; a cosine baseline counts all of its steps.

    branching:
      steps: [200, 400, 800]             # stable-run steps to branch from
      decay_fractions: [0.025, 0.05, 0.1, 0.2]
      decay_shapes: [exp, linear]
      cosine_baselines: true
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from trainables.schedules import DECAY_SHAPES
from trainables.trainer import checkpoint_name


@dataclass(frozen=True)
class BranchingSpec:
    steps: tuple[int, ...]  # stable-run steps S to branch decays from, increasing
    decay_fractions: tuple[float, ...] = (0.025, 0.05, 0.1, 0.2)  # D / (S + D)
    decay_shapes: tuple[str, ...] = ("exp",)
    min_lr_ratio: float = 0.1  # where every decay ends, as a fraction of η
    cosine_baselines: bool = True
    cosine_fraction: float = 0.1  # baselines run T = S + D for this decay fraction

    def __post_init__(self):
        if (
            not self.steps
            or any(s <= 0 for s in self.steps)
            or list(self.steps) != sorted(set(self.steps))
        ):
            raise ValueError(f"steps={self.steps}: distinct positive steps in increasing order")
        if not self.decay_fractions or not all(0 < f < 1 for f in self.decay_fractions):
            raise ValueError(f"decay_fractions={self.decay_fractions}: each in (0, 1)")
        unknown = [s for s in self.decay_shapes if s not in DECAY_SHAPES]
        if not self.decay_shapes or unknown:
            raise ValueError(f"decay_shapes={self.decay_shapes}: allowed {', '.join(DECAY_SHAPES)}")
        if not 0 < self.min_lr_ratio < 1 or not 0 < self.cosine_fraction < 1:
            raise ValueError("min_lr_ratio and cosine_fraction must be in (0, 1)")


def decay_steps(stable_step: int, fraction: float) -> int:
    """D such that D / (S + D) = fraction (rounded; at least one step)."""
    return max(1, round(fraction * stable_step / (1 - fraction)))


def stable_train(train: dict, branching: BranchingSpec, tokens_per_step: int) -> dict:
    """The stable phase's train section: constant lr after warmup to the last branch step."""
    out = copy.deepcopy(train)
    warmup = out.get("schedule", {}).get("warmup_steps", 0)
    out.pop("tokens_per_param", None)
    out["tokens"] = branching.steps[-1] * tokens_per_step
    out["schedule"] = {"kind": "constant", "warmup_steps": warmup}
    out["save_steps"] = list(branching.steps)
    return out


def branch_variants(
    stable: list[tuple[str, dict]], branching: BranchingSpec, tokens_per_step: int, save_root: str
) -> list[dict]:
    """Full trial configs of the decay phase, for each (stable trial id, its config)."""
    variants = []
    for trial_id, config in stable:
        for s in branching.steps:
            for f in branching.decay_fractions:
                for shape in branching.decay_shapes:
                    ckpt = f"{save_root}/{trial_id}/{checkpoint_name(s)}"
                    variants.append(
                        _decay(config, trial_id, s, f, shape, ckpt, branching, tokens_per_step)
                    )
            if branching.cosine_baselines:
                variants.append(_cosine(config, trial_id, s, branching, tokens_per_step))
    return variants


def _decay(config, trial_id, s, f, shape, ckpt, branching, tokens_per_step) -> dict:
    d = decay_steps(s, f)
    out = _without_budget(config)
    warmup = config["train"]["schedule"]["warmup_steps"]
    out["train"].update(
        tokens=(s + d) * tokens_per_step,
        init_from=ckpt,
        schedule={
            "kind": "wsd",
            "warmup_steps": warmup,
            "decay_steps": d,
            "decay_shape": shape,
            "min_lr_ratio": branching.min_lr_ratio,
        },
    )
    out["branch"] = {
        "phase": "decay",
        "stable_trial": trial_id,
        "stable_step": s,
        "decay_fraction": f,
        "decay_shape": shape,
        "total_steps": s + d,
    }
    return out


def _cosine(config, trial_id, s, branching, tokens_per_step) -> dict:
    d = decay_steps(s, branching.cosine_fraction)
    out = _without_budget(config)
    warmup = config["train"]["schedule"]["warmup_steps"]
    out["train"].update(
        tokens=(s + d) * tokens_per_step,
        schedule={"kind": "cosine", "warmup_steps": warmup, "min_lr_ratio": branching.min_lr_ratio},
    )
    out["branch"] = {
        "phase": "cosine",
        "stable_trial": trial_id,
        "stable_step": s,
        "decay_fraction": branching.cosine_fraction,
        "decay_shape": "cosine",
        "total_steps": s + d,
    }
    return out


def _without_budget(config: dict) -> dict:
    out = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("runtime", "branch")}
    out["train"].pop("save_steps", None)
    out["train"].pop("tokens_per_param", None)
    return out
