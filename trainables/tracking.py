"""Weights & Biases logging from inside a trial: one run per trial, one group per study.

Logging from the trial (not Tune's `WandbLoggerCallback`) keeps the per-trial cost at one
`wandb.init` in the worker that already holds the metrics; runs are offline by default (kept on
disk for `wandb sync`) unless a key is configured or online mode is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODES = ("auto", "online", "offline", "disabled")


@dataclass(frozen=True)
class WandbConfig:
    project: str = "minicpm-sandbox"
    entity: str | None = None
    mode: str = "auto"  # auto: online when an API key is configured, else offline

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: allowed {', '.join(MODES)}")
        if not self.project or "/" in self.project:
            raise ValueError(f"project={self.project!r}: a non-empty name without '/'")


def resolve_mode(mode: str) -> str:
    """`auto` becomes online only when a key is configured (env or ~/.netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    has_key = netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if has_key else "offline"


class TrialTracker:
    """A W&B run for one trial; a no-op when the mode is `disabled`."""

    def __init__(
        self,
        cfg: WandbConfig,
        *,
        mode: str,
        group: str,
        name: str,
        config: dict,
        directory: str | None,
    ):
        self.run = None
        if mode == "disabled":
            return
        import wandb

        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            silent=True,
            console="off",
            disable_git=True,
            save_code=False,
            x_disable_stats=True,
            x_disable_machine_info=True,
        )
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            name=name,
            config=config,
            mode=mode,
            dir=directory,
            settings=settings,
            reinit="finish_previous",
            job_type="trial",
        )

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                step=int(metrics.get("step", 0)),
            )

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        import wandb

        self.run.finish(exit_code=exit_code)
        self.run = None
        # Stop the wandb service now (~30 ms): left to atexit, it races Ray's teardown of the
        # actor's child processes and prints a ConnectionResetError for every trial actor.
        wandb.teardown()
