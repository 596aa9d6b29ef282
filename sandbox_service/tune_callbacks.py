"""Tune callbacks of the sandbox (this module imports Ray; import it only where Ray runs)."""

from __future__ import annotations

from ray.tune import Callback


class CompletionTracker(Callback):
    """Remembers the trials' states as of the last loop step of `Tuner.fit`.

    After Ctrl-C Tune stops the running trials and marks them TERMINATED like finished ones, and
    trials a searcher has not generated yet do not exist at all: the statuses seen at the last
    step and the total number of samples tell an interrupted study from a finished one.
    """

    def __init__(self):
        self.total: int | None = None
        self.statuses: list[str] = []

    def setup(self, total_num_samples: int | None = None, **info):
        self.total = total_num_samples

    def on_step_end(self, iteration, trials, **info):
        self.statuses = [t.status for t in trials]

    def unfinished(self) -> int:
        running = sum(s not in ("TERMINATED", "ERROR") for s in self.statuses)
        return running + max(0, (self.total or 0) - len(self.statuses))
