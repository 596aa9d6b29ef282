"""WSD branching: K annealed endpoints from one stable run vs K independent cosine runs.

MiniCPM §3.4: a WSD stable run at constant η can be decayed from any of its checkpoints, so K
endpoints of lengths S_k + D_k (decay D_k = f·S_k/(1−f), the fraction f of the endpoint) cost
one stable run of S_K steps plus the K decays, where K Cosine(T = S_k + D_k) runs cost the sum
of their lengths. This times both ways with `trainables.trainer.train` in one process (no Ray),
on the embedded corpus, and prints compute (model FLOPs the runs did themselves), wall time
(model set-up, checkpoints and the final evaluations included) and the final losses side by side.

    python bench/wsd_branching.py                        # micro-64, S = 100, 200, 400, f = 0.1
    python bench/wsd_branching.py --steps 20 40 --model micro-32     # a quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from benchlib import add_out, describe, machine, table, write

from sandbox_service.branching import decay_steps
from trainables import data
from trainables.schedules import ScheduleConfig
from trainables.shapes import get_config
from trainables.trainer import TrainConfig, checkpoint_name, train

EVAL_NEVER = 10**9  # evaluate only at each run's last step


def run(model_cfg, store, steps: int, schedule: ScheduleConfig, args, **train_kw):
    """One run to `steps`; returns its last metrics and wall seconds. `train_kw`: save_steps
    and init_from (TrainConfig), save_dir (train)."""
    save_dir = train_kw.pop("save_dir", None)
    cfg = TrainConfig(
        tokens=steps * args.batch * args.seq,
        batch_size=args.batch,
        seq_len=args.seq,
        lr=args.lr,
        schedule=schedule,
        eval_every=EVAL_NEVER,
        eval_tokens=args.eval_tokens,
        checkpoint_every=0,
        threads=args.threads,
        **train_kw,
    )
    t0 = time.perf_counter()
    metrics = train(model_cfg, cfg, store, save_dir=save_dir)
    return metrics, time.perf_counter() - t0


def branched(model_cfg, store, args, root: Path) -> tuple[list[dict], float, float]:
    """One stable run keeping checkpoints at every S, then one decay from each."""
    warm = {"warmup_steps": args.warmup}
    stable, wall = run(
        model_cfg,
        store,
        args.steps[-1],
        ScheduleConfig(kind="constant", **warm),
        args,
        save_steps=tuple(args.steps),
        save_dir=root,
    )
    flops, ends = stable["own_flops"], []
    for s in args.steps:
        d = decay_steps(s, args.fraction)
        decay = ScheduleConfig(kind="wsd", decay_steps=d, decay_shape=args.shape, **warm)
        m, w = run(model_cfg, store, s + d, decay, args, init_from=str(root / checkpoint_name(s)))
        ends.append(m)
        flops, wall = flops + m["own_flops"], wall + w
    return ends, flops, wall


def independent(model_cfg, store, args) -> tuple[list[dict], float, float]:
    """K cosine runs from scratch, each as long as the matching branched endpoint."""
    ends, flops, wall = [], 0.0, 0.0
    for s in args.steps:
        total = s + decay_steps(s, args.fraction)
        cosine = ScheduleConfig(kind="cosine", warmup_steps=args.warmup)
        m, w = run(model_cfg, store, total, cosine, args)
        ends.append(m)
        flops, wall = flops + m["own_flops"], wall + w
    return ends, flops, wall


COLUMNS = {
    "stable_step": "d",
    "decay_steps": "d",
    "endpoint_steps": "d",
    "wsd_val_loss": ".4f",
    "cosine_val_loss": ".4f",
    "wsd_minus_cosine": "+.4f",
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="micro-64")
    p.add_argument("--steps", nargs="+", type=int, default=[100, 200, 400])
    p.add_argument("--fraction", type=float, default=0.1, help="decay share of each endpoint")
    p.add_argument("--shape", default="exp")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: as set")
    add_out(p, "wsd-branching")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(describe(info))
    store = data.prepare(data.DataConfig(vocab_size=args.vocab, max_chars=4_000_000))
    model_cfg = get_config(args.model, vocab_size=args.vocab, max_seq_len=args.seq)
    with tempfile.TemporaryDirectory(prefix="bench-wsd-") as d:
        wsd, wsd_flops, wsd_wall = branched(model_cfg, store, args, Path(d))
    cos, cos_flops, cos_wall = independent(model_cfg, store, args)
    rows = [
        {
            "stable_step": s,
            "decay_steps": decay_steps(s, args.fraction),
            "endpoint_steps": w["step"],
            "wsd_val_loss": w["val_loss"],
            "cosine_val_loss": c["val_loss"],
            "wsd_minus_cosine": w["val_loss"] - c["val_loss"],
        }
        for s, w, c in zip(args.steps, wsd, cos, strict=True)
    ]
    totals = {
        "branched_flops": wsd_flops,
        "cosine_flops": cos_flops,
        "flops_ratio": wsd_flops / cos_flops,
        "branched_wall_s": wsd_wall,
        "cosine_wall_s": cos_wall,
        "wall_ratio": wsd_wall / cos_wall,
    }
    print(
        f"{args.model}, {len(args.steps)} endpoints, decay {args.fraction:.0%} ({args.shape}), "
        f"batch {args.batch} x seq {args.seq}, val loss in nats/token"
    )
    print(table(rows, COLUMNS))
    print(
        f"\ncompute: branched {wsd_flops:.3g} FLOPs vs cosine {cos_flops:.3g} "
        f"(ratio {totals['flops_ratio']:.2f})\n"
        f"wall:    branched {wsd_wall:.1f} s vs cosine {cos_wall:.1f} s "
        f"(ratio {totals['wall_ratio']:.2f})"
    )
    write(args.out, info, rows, args=vars(args) | {"out": str(args.out)}, totals=totals)
    return totals


if __name__ == "__main__":
    main()
