"""Weights & Biases logging from inside a trial: one run per trial, one group per study.

Logging from the trial (not Tune's `WandbLoggerCallback`) keeps the per-trial cost at one
`wandb.init` in the worker that already holds the metrics; runs are offline by default (kept on
disk for `wandb sync`) unless a key is configured or online mode is asked for.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from trainables import wandb_file

MODES = ("auto", "online", "offline", "disabled")
log = logging.getLogger(__name__)


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

        run_file = self.run.settings.sync_file
        self.run.finish(exit_code=exit_code)
        self.run = None
        if not _reached_file(run_file):
            wandb.teardown()  # closes every run's stream, so its file is complete
        _stop_service_at_exit()


def _reached_file(run_file: str, timeout_s: float = 2.0) -> bool:
    """Wait until the run's exit record is in its file. `run.finish` returns once the service
    has the run's records, but the service writes the file when it closes the run's stream,
    a moment later; a process that exits in between (a Ray actor at the end of a study) would
    lose the run. Usually one look: milliseconds."""
    deadline = time.monotonic() + timeout_s
    while not wandb_file.has_exit(run_file):
        if time.monotonic() > deadline:
            log.warning(
                "W&B run file %s incomplete after %.0f s; stopping the service", run_file, timeout_s
            )
            return False
        time.sleep(0.005)
    return True


def _stop_service_at_exit() -> None:
    """Keep this process's W&B service for its next run and stop it quietly at exit.

    A reused Tune actor runs trial after trial: starting a fresh service for each costs ~0.2 s
    of a trial's `wandb.init` (median 0.358 vs 0.151 s offline on 2 CPU cores,
    `bench/wandb_overhead.py`). At exit W&B's own hook races Ray's teardown of the actor's
    child processes and prints a ConnectionResetError; registered (again) after each run, so
    after any service W&B started, this hook runs first (atexit runs hooks last in, first
    out); every run's file was complete before.
    """
    atexit.unregister(_quiet_teardown)
    atexit.register(_quiet_teardown)


def _quiet_teardown() -> None:
    import wandb

    try:
        wandb.teardown()
    except (ConnectionError, OSError, SystemExit) as e:
        # The service went down with the process's children: the connection is gone, or W&B
        # calls sys.exit with the killed service's exit code (-9).
        log.debug("W&B service already gone at exit: %r", e)
