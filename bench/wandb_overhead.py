"""What per-trial W&B logging costs in a study of many short trials (local Ray, offline W&B).

Runs the same study of N trivial trials (each reports R results) three ways: W&B disabled,
W&B offline with one run per trial logged from inside the trial (the sandbox's way), and Ray's
`WandbLoggerCallback` on the driver (the stock way). Prints wall time, the cost per trial
against the disabled run, the median time a trial spends in `wandb.init` (its tracker), and how
many offline runs landed on disk (a crashed or lossy
variant shows fewer runs than trials).

    python bench/wandb_overhead.py [--trials 40] [--reports 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def trial(config: dict) -> None:
    from ray import tune

    from trainables.tracking import TrialTracker, WandbConfig

    t0 = time.perf_counter()
    tracker = TrialTracker(
        WandbConfig(project="bench"),
        mode=config["mode"],
        group="bench",
        name=tune.get_context().get_trial_name(),
        config={"i": config["i"]},
        directory=config["dir"],
    )
    init_s = time.perf_counter() - t0
    for step in range(config["reports"]):
        metrics = {"step": step, "val_loss": 1.0 / (step + 1 + config["i"]), "init_s": init_s}
        tracker.log(metrics)
        tune.report(metrics)
    tracker.finish()


def run(mode: str, n: int, reports: int, root: Path, callback: bool = False) -> tuple:
    """Wall seconds of the study, and the median seconds a trial spent creating its tracker."""
    from ray import tune

    out = root / mode / ("callback" if callback else "in-trial")
    callbacks = []
    if callback:
        from ray.air.integrations.wandb import WandbLoggerCallback

        # mode goes through wandb.init: the logging actors do not see the driver's environment
        callbacks = [
            WandbLoggerCallback(
                project="bench", group="bench", dir=str(out), mode="offline", api_key="0" * 40
            )  # it demands a key even offline; never sent
        ]
    space = {
        "i": tune.grid_search(list(range(n))),
        "reports": reports,
        "mode": "disabled" if callback else mode,
        "dir": str(out),
    }
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=2),
        run_config=tune.RunConfig(
            storage_path=str(root / "ray"),
            name=f"{mode}-{callback}",
            verbose=0,
            callbacks=callbacks,
        ),
    )
    t0 = time.perf_counter()
    try:
        grid = tuner.fit()
    except Exception as e:  # the stock callback has crashed the experiment here
        print(f"{mode} (callback={callback}) failed: {type(e).__name__}: {str(e)[-200:]}")
        return time.perf_counter() - t0, float("nan")
    wall = time.perf_counter() - t0
    inits = [r.metrics["init_s"] for r in grid if r.metrics and "init_s" in r.metrics]
    return wall, statistics.median(inits) if inits else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--reports", type=int, default=5)
    args = p.parse_args()
    import ray

    os.environ.setdefault("WANDB_SILENT", "true")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base, init = run("disabled", args.trials, args.reports, root)
        rows = [("disabled", base, init, 0)]
        for label, mode, cb in (
            ("offline, in trial", "offline", False),
            ("offline, WandbLoggerCallback", "offline", True),
        ):
            wall, init = run(mode, args.trials, args.reports, root, cb)
            out = root / mode / ("callback" if cb else "in-trial")
            rows.append((label, wall, init, len(list(out.rglob("offline-run-*")))))
    ray.shutdown()
    print(f"{args.trials} trials x {args.reports} reports, 2 CPUs, reuse_actors=True")
    print(f"{'W&B':32s} {'wall s':>8s} {'+s/trial':>9s} {'init s':>7s} {'offline runs':>13s}")
    for label, wall, init, runs in rows:
        extra = (wall - base) / args.trials
        print(f"{label:32s} {wall:8.1f} {extra:9.3f} {init:7.3f} {runs:13d}")
    print("init s: median seconds a trial spent creating its W&B run (in-trial tracker)")


if __name__ == "__main__":
    main()
