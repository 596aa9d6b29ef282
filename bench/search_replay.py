"""Searchers replayed on a measured grid: each draw is looked up, not trained.

A grid study measures every point of a discrete space, with its validation loss at every
evaluation. A searcher over the same values (each dimension a choice among the grid's values)
can then be replayed many times in seconds: when it draws a point, the trial's curve is read
from the table instead of being trained. The replay keeps what matters for compute:
- trials run `slots` at a time in simulated time (one unit = one full trial's compute), so a
  searcher sees results late exactly as with `max_concurrent` trials in Tune;
- TPE is the sandbox's own searcher object (Ray's `HyperOptSearch`, the same seed rule and
  number of initial random points as `sandbox_service.study`), driven through suggest and
  on_trial_complete as Tune drives it;
- ASHA stops a trial at a rung with the rule of Ray's `ASHAScheduler` (Li et al. 2018, arXiv
  1810.05934; Ray's `_Bracket.on_result`): at the first evaluation past a milestone, stop unless
  the loss is in the best 1/η of the losses recorded at that milestone so far.
Compute to target = the simulated compute spent (partial trials included) when the first trial
that ran to its end has a final loss within the target.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

Curve = list[tuple[float, float]]  # (progress in (0, 1], val_loss) at each evaluation


@dataclass(frozen=True)
class Asha:
    grace: float = 0.1  # the sandbox's SchedulerSpec defaults
    reduction_factor: float = 3.0

    def milestones(self) -> list[float]:
        """grace·η^k below 1, as Ray's bracket builds them (max_t = 1, one bracket)."""
        n = int(math.log(1.0 / self.grace) / math.log(self.reduction_factor) + 1)
        return [self.grace * self.reduction_factor**k for k in range(n)]


def asha_stops(
    rungs: dict[float, dict[str, float]], tid: str, progress: float, loss: float, rf: float
) -> bool:
    """Ray's `_Bracket.on_result` for mode min: the highest milestone reached that this trial
    has not been recorded at decides; stop if the loss is outside the best 1/rf recorded there."""
    for milestone in sorted(rungs, reverse=True):
        recorded = rungs[milestone]
        if progress < milestone or tid in recorded:
            continue
        rewards = [-x for x in recorded.values()]
        stop = bool(rewards) and -loss < np.nanpercentile(rewards, (1 - 1 / rf) * 100)
        recorded[tid] = loss
        return stop
    return False


class RandomSearcher:
    """Each dimension drawn uniformly among its values (Tune's `choice` under random search)."""

    def __init__(self, space: dict[str, list], seed: int):
        self.space, self.rng = space, np.random.default_rng(seed)

    def suggest(self, trial_id: str) -> dict:
        return {k: v[self.rng.integers(len(v))] for k, v in self.space.items()}

    def on_trial_complete(self, trial_id: str, result: dict) -> None:
        pass


def tpe_searcher(space: dict[str, list], seed: int, budget: int):
    """The sandbox's TPE (`study._searcher`): HyperOptSearch, seeded, the same initial points."""
    from ray import tune
    from ray.tune.search.hyperopt import HyperOptSearch

    searcher = HyperOptSearch(random_state_seed=seed, n_initial_points=max(2, min(20, budget // 5)))
    searcher.set_search_properties("val_loss", "min", {k: tune.choice(v) for k, v in space.items()})
    return searcher


def simulate(
    searcher,
    curves: dict[tuple, Curve],
    keys: list[str],
    budget: int,
    target: float,
    slots: int = 2,
    asha: Asha | None = None,
) -> float | None:
    """Compute (in full trials) spent until a finished trial is within `target`; None if the
    budget of `budget` trials ends first."""
    events, starts, ends, rungs = [], {}, {}, {m: {} for m in (asha.milestones() if asha else [])}
    launched = 0

    def launch(now: float) -> None:
        nonlocal launched
        tid = str(launched)
        config = searcher.suggest(tid)
        curve = curves[tuple(config[k] for k in keys)]
        starts[tid], launched = now, launched + 1
        heapq.heappush(events, (now + curve[0][0], tid, 0, curve))

    for _ in range(min(slots, budget)):
        launch(0.0)
    while events:
        now, tid, k, curve = heapq.heappop(events)
        progress, loss = curve[k]
        last = k == len(curve) - 1
        stop = (
            asha is not None
            and not last
            and asha_stops(rungs, tid, progress, loss, asha.reduction_factor)
        )
        if not (last or stop):
            heapq.heappush(events, (starts[tid] + curve[k + 1][0], tid, k + 1, curve))
            continue
        ends[tid] = now
        searcher.on_trial_complete(tid, {"val_loss": loss})
        if last and loss <= target:
            return sum(min(now, ends.get(t, now)) - s for t, s in starts.items())
        if launched < budget:
            launch(now)
    return None
