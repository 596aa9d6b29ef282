"""CPU seconds per trainer step: the steadiest before/after figure on a shared machine.

Wall time on a busy machine measures the neighbours as much as the code; the CPU time this
process spends on one step of `trainables.trainer.train` (one thread) barely depends on them.
Best of `--steps` steps after a warm-up one, each followed by a 128-token evaluation.
To compare two versions of the code, point Python at the other one:

    python bench/step_time.py                                   # this checkout
    git archive 5126365 trainables | tar -x -C /tmp/before      # the code before the speed work
    PYTHONPATH=/tmp/before python bench/step_time.py --out /tmp/bench-step-before.json
"""

from __future__ import annotations

import argparse
import time

import torch
from benchlib import add_out, describe, machine, random_store, table, write

import trainables
from trainables.shapes import get_config
from trainables.trainer import TrainConfig, train


def step_cpu_seconds(size: str, precision: str, args) -> float:
    extra = {"vocab_size": args.vocab} if size.startswith("micro") else {}
    cfg = get_config(size, max_seq_len=args.seq, **extra)
    marks: list[float] = []
    train_cfg = TrainConfig(
        tokens=(args.steps + 1) * args.batch * args.seq,
        batch_size=args.batch,
        seq_len=args.seq,
        eval_every=1,  # a report after every step
        eval_tokens=args.seq,
        checkpoint_every=0,
        precision=precision,
    )
    train(
        cfg,
        train_cfg,
        random_store(cfg.vocab_size),
        report=lambda m, _: marks.append(time.process_time()),
    )
    return min(b - a for a, b in zip(marks[:-1], marks[1:], strict=True))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["micro-32", "micro-128", "micro-512", "0.009b"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the micro sizes")
    p.add_argument("--steps", type=int, default=4)
    add_out(p, "step-time")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    info = machine() | {"trainables": trainables.__file__}
    print(describe(info))
    print(f"trainables from {info['trainables']}; batch {args.batch} x seq {args.seq}, 1 thread")
    rows = [
        {"model": size, "precision": prec, "cpu_s_per_step": step_cpu_seconds(size, prec, args)}
        for size in args.sizes
        for prec in args.precisions
    ]
    for row in rows:
        row["tokens_per_cpu_s"] = args.batch * args.seq / row["cpu_s_per_step"]
    print(
        table(
            rows,
            {"model": "s", "precision": "s", "cpu_s_per_step": ".3f", "tokens_per_cpu_s": ",.0f"},
        )
    )
    write(args.out, info, rows, args=vars(args) | {"out": str(args.out)})
    return rows


if __name__ == "__main__":
    main()
