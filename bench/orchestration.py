"""Orchestration overhead: a study of many short trials on local Ray, against their own compute.

Runs the sandbox's own Tuner (`sandbox_service.study.build_tuner`: `tune_trial`, the token store
prepared once on the driver, μP micro-32 trials that train, evaluate, report and checkpoint)
with N short trials, 2 at a time on 2 CPUs. Each trial function is timed from inside (entry to
return), so with c trial slots and wall time W:
- overhead per trial = (c·W − Σ trial time) / N: slot-seconds each trial costs beyond its own run;
- overhead share = 1 − Σ trial time / (c·W): the part of the machine's time not spent in trials;
- in-trial set-up = (Σ trial time − Σ training-step time) / N: config parsing, opening the
  store, evaluation, reporting, checkpoints, W&B, inside the trial.
Four runs: actors reused (the sandbox's setting; `--trials`), and with `--small` trials each:
not reused; reused with W&B offline logging from inside each trial (its reports per second is
the result throughput); reused without the per-report checkpoints (`checkpoint_every: 0`).
Targets: ≤ 0.05 s overhead per trial and ≤ 10% of wall time. Ray's own release test accepts
+14% for 10,000 one-second trials.

    python bench/orchestration.py                        # 1000 trials reused; 100 for the others
    python bench/orchestration.py --trials 40 --small 20 --steps 20    # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from benchlib import add_out, describe, machine, start_ray, table, write

from sandbox_service import results, study
from sandbox_service.spec import parse_spec

SLOTS = 2  # trials at a time: 1 CPU each on 2 CPUs


def timed_trial(config: dict) -> None:
    """The sandbox's trial function, timed from inside; the times go to one file per trial."""
    import json
    import time
    from pathlib import Path

    from ray import tune

    from trainables.trial import tune_trial

    t0 = time.time()
    tune_trial(config)
    t1 = time.time()
    out = Path(config["runtime"]["bench_times"]) / f"{tune.get_context().get_trial_id()}.json"
    out.write_text(json.dumps({"start": t0, "end": t1}))


def spec_for(n: int, args, wandb: str, checkpoint_every: int):
    return parse_spec(
        {
            "name": f"bench-orchestration-{n}",
            "question": "What does Tune add to each of many short trials?",
            "model": {"preset": "micro-32", "max_seq_len": 64},
            "data": {"vocab_size": 512, "max_chars": 400_000},
            "train": {
                "tokens": args.steps * 8 * 64,
                "batch_size": 8,
                "seq_len": 64,
                "schedule": {"kind": "wsd", "warmup_steps": 4},
                "eval_every": max(1, args.steps // args.reports),
                "eval_tokens": 512,
                "checkpoint_every": checkpoint_every,
                "checkpoint_min_s": args.checkpoint_min_s,
            },
            "search": {
                "algorithm": "random",
                "num_samples": n,
                "max_concurrent": SLOTS,
                "space": {"train.lr": {"loguniform": [0.003, 0.03]}},
            },
            "resources": {"cpu": 1},
            "tracking": {"wandb": {"project": "bench", "mode": wandb}},
        }
    )


@contextlib.contextmanager
def timed_trainable():
    """build_tuner wraps the module's `tune_trial`; swap in the timed one while building."""
    original = study.tune_trial
    study.tune_trial = timed_trial
    try:
        yield
    finally:
        study.tune_trial = original


def run(n: int, reuse: bool, wandb: str, checkpoint_every: int, args, root: Path) -> dict:
    spec = spec_for(n, args, wandb, checkpoint_every)
    url = str(root / f"{n}-{reuse}-{wandb}-{checkpoint_every}")
    times = Path(url) / "times"
    times.mkdir(parents=True)
    runtime = study._runtime(spec, url, wandb) | {
        "token_store": study.prepare_data(spec),
        "bench_times": str(times),
    }
    with timed_trainable():
        tuner = study.build_tuner(spec, url, study.main_phase(spec, runtime), verbose=0)
    config = tuner._local_tuner._tune_config  # build_tuner always reuses actors
    tuner._local_tuner._tune_config = dataclasses.replace(config, reuse_actors=reuse)
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    trials, history = results.tables([grid], spec)
    results.write([grid], spec, url, wall)
    row = measure(n, wall, time.perf_counter() - t0, trials, history, times)
    return {"reuse_actors": reuse, "wandb": wandb, "checkpoint_every": checkpoint_every} | row


def measure(n, wall, write_s, trials, history, times: Path) -> dict:
    spans = [json.loads(p.read_text()) for p in times.glob("*.json")]
    trial_s = sum(s["end"] - s["start"] for s in spans)
    train_s = float(trials["elapsed_s"].sum())
    return {
        "trials": n,
        "completed": int((trials["status"] == "completed").sum()),
        "wall_s": wall,
        "trial_s": trial_s / n,
        "train_s": train_s / n,
        "overhead_per_trial_s": (SLOTS * wall - trial_s) / n,
        "overhead_share": 1 - trial_s / (SLOTS * wall),
        "in_trial_setup_s": (trial_s - train_s) / n,
        "results": len(history),
        "results_per_s": len(history) / wall,
        "write_tables_s": write_s,
    }


COLUMNS = {
    "trials": "d",
    "reuse_actors": "",
    "wandb": "s",
    "checkpoint_every": "d",
    "completed": "d",
    "wall_s": ",.1f",
    "trial_s": ".3f",
    "train_s": ".3f",
    "overhead_per_trial_s": ".3f",
    "overhead_share": ".1%",
    "in_trial_setup_s": ".3f",
    "results_per_s": ".1f",
    "write_tables_s": ".1f",
}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000, help="trials of the headline run")
    p.add_argument("--small", type=int, default=100, help="trials of the other two runs")
    p.add_argument("--steps", type=int, default=100, help="training steps per trial")
    p.add_argument("--reports", type=int, default=4, help="reports (evaluations) per trial")
    p.add_argument("--checkpoint-every", type=int, default=1, help="the trainer's default: 1")
    p.add_argument(
        "--checkpoint-min-s",
        type=float,
        default=0.0,
        help="train.checkpoint_min_s: seconds between a trial's checkpoints (default 0: every due)",
    )
    p.add_argument("--runs", nargs="+", default=["reuse", "no-reuse", "wandb", "no-checkpoints"])
    add_out(p, "orchestration")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    info = machine()
    print(describe(info))
    start_ray(SLOTS)
    every = args.checkpoint_every
    runs = {
        "reuse": (args.trials, True, "disabled", every),
        "no-reuse": (args.small, False, "disabled", every),
        "wandb": (args.small, True, "offline", every),
        "no-checkpoints": (args.small, True, "disabled", 0),
    }
    runs = [runs[name] for name in args.runs]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as d:
        for n, reuse, wandb, every in runs:
            rows.append(run(n, reuse, wandb, every, args, Path(d)))
            print(f"  {n} trials: {rows[-1]['wall_s']:.1f} s", flush=True)
    print(
        f"\nmicro-32, {args.steps} steps of 8 x 64 tokens, {args.reports} reports per trial, "
        f"{SLOTS} trials at a time; seconds per trial"
    )
    print(table(rows, COLUMNS))
    write(args.out, info, rows, args=vars(args) | {"out": str(args.out)})
    return rows


if __name__ == "__main__":
    main()
