"""Search efficiency on the μP hyper-parameter study: compute to come within 1% of the grid's best.

1. Measure a grid: `search_spaces/mup_hparams_micro.yaml` (micro-32, 10·N tokens, the embedded
   corpus) with its four searched constants (scale_emb, scale_depth, init_std, lr) each on a few
   values, every point trained by the sandbox (`run_study`, 2 trials at a time), evaluated often
   enough for ASHA's rungs.
2. Replay the searchers on it (`bench/search_replay.py`): TPE with and without ASHA, and random
   search, each drawing among the grid's values; a draw is LOOKED UP in the measured grid, not
   trained. Many seeds per searcher, each with a budget of as many trials as the grid has.
3. Run one case for real: TPE through the sandbox with a budget of a quarter of the grid, to
   check the replay: its trials' losses must equal the grid's at the same points (the trainer
   is deterministic), and its compute to target is set beside the replayed distribution.
Compute is counted in model FLOPs the trials ran (partial trials included) and given as a share
of the grid's compute. Target: ≤ 25% of the grid's compute.

    python bench/search_efficiency.py                        # 3^4 grid + replay + real TPE
    python bench/search_efficiency.py --grid-json /tmp/bench-search.json   # replay a saved grid
    python bench/search_efficiency.py --values 2 --seeds 5 --tokens-per-param 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import add_out, describe, machine, start_ray, table, write
from search_replay import Asha, RandomSearcher, simulate, tpe_searcher

from sandbox_service import storage, study, yaml_safe
from sandbox_service.spec import parse_spec

STUDY = Path(__file__).resolve().parents[1] / "search_spaces" / "mup_hparams_micro.yaml"
GRID_VALUES = {  # inside the study's ranges, MiniCPM's optimum (12, 1.4, 0.1, 0.01) in the middle
    "model.scale_emb": [4.0, 12.0, 36.0],
    "model.scale_depth": [0.5, 1.4, 4.0],
    "model.init_std": [0.03, 0.1, 0.3],
    "train.lr": [0.003, 0.01, 0.03],
}


def grid_values(n: int) -> dict[str, list[float]]:
    """n values per constant: the 3 above, or the outer 2."""
    return {k: v if n == 3 else [v[0], v[-1]] for k, v in GRID_VALUES.items()}


def study_spec(name: str, space: dict, algorithm: str, samples: int, args, asha=False):
    raw = yaml_safe.load(STUDY)
    raw["name"] = name
    raw["train"] |= {
        "tokens_per_param": args.tokens_per_param,
        "eval_every": args.eval_every,
        "eval_tokens": args.eval_tokens,
    }
    kind = "grid" if algorithm == "grid" else "choice"
    raw["search"] = {
        "algorithm": algorithm,
        "num_samples": samples,
        "max_concurrent": 2,
        "space": {k: {kind: v} for k, v in space.items()},
    }
    if asha:
        raw["search"]["scheduler"] = {"kind": "asha"}
    raw.pop("tracking", None)
    return parse_spec(raw, str(STUDY))


def run(spec, root: Path) -> str:
    study.run_study(spec, root=str(root), wandb_mode="disabled", num_cpus=2, verbose=0)
    return storage.join(str(root), spec.name)


def curves(url: str, keys: list[str]) -> tuple[dict[tuple, list], float]:
    """Each point's (progress, val_loss) curve, and the compute of one full trial."""
    trials, history = pd.read_csv(f"{url}/trials.csv"), pd.read_csv(f"{url}/history.csv")
    out = {}
    for _, row in trials.iterrows():
        point = tuple(float(row["config/" + k.replace(".", "/")]) for k in keys)
        h = history[history["trial_id"] == row["trial_id"]].sort_values("step")
        out[point] = list(
            zip(h["progress"].astype(float), h["val_loss"].astype(float), strict=True)
        )
    return out, float(trials["own_flops"].max())


def replay(grid: dict, space: dict, target: float, args) -> list[dict]:
    keys, budget = list(space), len(grid)
    methods = {
        "TPE": lambda s: (tpe_searcher(space, s, budget), None),
        "TPE + ASHA": lambda s: (tpe_searcher(space, s, budget), Asha()),
        "random": lambda s: (RandomSearcher(space, s), None),
    }
    rows = []
    for name, make in methods.items():
        spent = []
        for seed in range(args.seeds):
            searcher, asha = make(seed)
            spent.append(simulate(searcher, grid, keys, budget, target, asha=asha))
        reached = sorted(x for x in spent if x is not None)
        rows.append(summary_row(name, "replayed", reached, len(spent), budget))
    return rows


def summary_row(method: str, how: str, reached: list[float], runs: int, grid_size: int) -> dict:
    """Shares of the grid's compute over runs; a run that never reached the target counts as
    infinite, so a median of inf means most runs did not reach it within their budget."""
    padded = np.array(reached + [math.inf] * (runs - len(reached))) / grid_size
    q1, median, q3 = (float(np.percentile(padded, q, method="lower")) for q in (25, 50, 75))
    q1, median, q3 = (x if math.isfinite(x) else None for x in (q1, median, q3))  # "-": not reached
    return {
        "method": method,
        "how": how,
        "runs": runs,
        "reached": len(reached),
        "median_share": median,
        "q1_share": q1,
        "q3_share": q3,
    }


def real_compute_to_target(url: str, phase: str, target: float, full_flops: float):
    """From Tune's per-trial result.json: the compute all trials had reported when the first
    finished trial within `target` reported, in full trials; None if none did."""
    reports = []
    for path in Path(url, phase).glob("*/result.json"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            reports.append((r["timestamp"], r["own_flops"], path.parent.name, r))
    latest: dict[str, float] = {}
    for _, flops, trial, r in sorted(reports, key=lambda x: (x[0], x[1])):
        latest[trial] = flops
        if r["completed"] and not r["diverged"] and r["val_loss"] <= target:
            return sum(latest.values()) / full_flops
    return None


def real_losses(url: str, keys: list[str]) -> dict[tuple, float]:
    trials = pd.read_csv(f"{url}/trials.csv")
    trials = trials[trials["status"] == "completed"]
    cols = ["config/" + k.replace(".", "/") for k in keys]
    return {tuple(map(float, r[cols])): float(r["val_loss"]) for _, r in trials.iterrows()}


COLUMNS = {
    "method": "s",
    "how": "s",
    "runs": "d",
    "reached": "d",
    "q1_share": ".0%",
    "median_share": ".0%",
    "q3_share": ".0%",
}


def measure_grid(space: dict, args, root: Path) -> dict:
    spec = study_spec("bench-mup-grid", space, "grid", 1, args)
    grid, full = curves(run(spec, root), list(space))
    return {
        "space": space,
        "full_flops": full,
        "curves": {json.dumps(k): v for k, v in grid.items()},
    }


def real_tpe(space: dict, grid: dict, target: float, full: float, args, root: Path) -> dict:
    samples = math.ceil(len(grid) * args.real_share)
    spec = study_spec("bench-mup-tpe", space, "hyperopt", samples, args)
    url = run(spec, root)
    spent = real_compute_to_target(url, "tune", target, full)
    gaps = [abs(loss - grid[p][-1][1]) for p, loss in real_losses(url, list(space)).items()]
    row = summary_row("TPE", f"real, {samples} trials", [spent] if spent else [], 1, len(grid))
    return row | {"largest_gap_to_grid": max(gaps)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--values", type=int, default=3, choices=[2, 3], help="grid values per constant")
    p.add_argument("--tokens-per-param", type=float, default=10)
    p.add_argument("--eval-every", type=int, default=24, help="steps; rungs at 10%%, 30%%, 90%%")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--seeds", type=int, default=50, help="replays per searcher")
    p.add_argument("--within", type=float, default=0.01, help="target: best grid loss × (1 + this)")
    p.add_argument("--real-share", type=float, default=0.25, help="budget of the real TPE run")
    p.add_argument("--grid-json", type=Path, help="replay the grid saved by an earlier run")
    add_out(p, "search")
    args = p.parse_args(argv)
    info = machine()
    print(describe(info))
    start_ray()
    with tempfile.TemporaryDirectory(prefix="bench-search-") as d:
        if args.grid_json:
            saved = json.loads(args.grid_json.read_text())["grid"]
        else:
            saved = measure_grid(grid_values(args.values), args, Path(d))
        space, full = saved["space"], saved["full_flops"]
        grid = {tuple(json.loads(k)): v for k, v in saved["curves"].items()}
        best = min(c[-1][1] for c in grid.values() if c[-1][0] >= 1.0)
        target = best * (1 + args.within)
        rows = replay(grid, space, target, args)
        if not args.grid_json and args.real_share > 0:
            rows.append(real_tpe(space, grid, target, full, args, Path(d)))
    within = sum(c[-1][1] <= target for c in grid.values())
    print(
        f"\ngrid: {len(grid)} points, best val loss {best:.4f}, target {target:.4f} "
        f"({within} points within); shares of the grid's compute ({full:.3g} FLOPs per trial)"
    )
    print(table(rows, COLUMNS))
    if "largest_gap_to_grid" in rows[-1]:
        print(
            f"real TPE trials vs the grid at the same points: largest |Δ loss| "
            f"{rows[-1]['largest_gap_to_grid']:.1e}"
        )
    write(
        args.out,
        info,
        rows,
        args=vars(args) | {"out": str(args.out), "grid_json": str(args.grid_json)},
        grid=saved,
        target=target,
    )
    return rows


if __name__ == "__main__":
    main()
