"""Where the trainer's step spends its time: `torch.profiler` over steps of `trainables.trainer`.

Profiles `train` itself (the `_Loop.step` of a real run, after warm-up steps), then groups the
operators' self CPU time (the calling thread's; an operator running on all threads counts
once): matmuls, attention kernels, dtype casts, the optimizer, the loss, element-wise work,
Python between operators, the rest. Profile before changing anything: the groups say what a
change can buy.

    python bench/profile_step.py                                  # micro-512, bf16
    python bench/profile_step.py --size micro-32 --precision fp32 --rows 25
"""

from __future__ import annotations

import argparse

import torch
from benchlib import add_out, describe, machine, random_store, table, write
from throughput import DTYPES, model_config
from torch.profiler import ProfilerActivity, profile, schedule

from trainables import trainer
from trainables.trainer import TrainConfig

GROUPS = {  # operator name → group, first match wins
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "casts": ("aten::copy_", "aten::_to_copy", "aten::to"),
    "optimizer": ("adam",),
    "loss": ("log_softmax", "linearcrossentropy", "nll_loss", "cross_entropy"),
    # the step's own self time: Python and dispatch between operators
    "python": ("ProfilerStep",),
    "element-wise": (
        "aten::mul",
        "aten::add",
        "aten::div",
        "aten::pow",
        "aten::neg",
        "aten::silu",
        "aten::rsqrt",
        "aten::mean",
        "aten::sum",
        "aten::cat",
        "aten::fill_",
        "aten::sub",
        "aten::exp",
        "aten::where",
    ),
}


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS.items():
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def profile_steps(cfg, train_cfg: TrainConfig, store, warmup: int, steps: int):
    """Run `train` with the profiler stepping after each optimizer step of the loop."""
    original = trainer._Loop.step
    traces = []
    prof = profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
        on_trace_ready=lambda p: traces.append(p.key_averages()),
    )

    def step(self) -> None:
        original(self)
        prof.step()

    trainer._Loop.step = step
    try:
        with prof:
            trainer.train(cfg, train_cfg, store)
    finally:
        trainer._Loop.step = original
    if not traces:
        raise RuntimeError(f"the run ended before {warmup} + {steps} steps were profiled")
    return traces[0]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="micro-512")
    p.add_argument("--precision", default="bf16", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the micro sizes")
    p.add_argument("--warmup", type=int, default=2, help="steps before the profiled ones")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--rows", type=int, default=15, help="operators listed")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_out(p, "profile")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    cfg = model_config(args.size, args.seq, args.vocab)
    train_cfg = TrainConfig(
        tokens=(args.warmup + args.steps + 1) * args.batch * args.seq,
        batch_size=args.batch,
        seq_len=args.seq,
        eval_every=10**9,  # no evaluation inside the profiled steps (only the final one)
        eval_tokens=args.seq,
        checkpoint_every=0,
        precision=args.precision,
    )
    averages = profile_steps(cfg, train_cfg, random_store(cfg.vocab_size), args.warmup, args.steps)
    total = sum(e.self_cpu_time_total for e in averages)
    groups: dict[str, float] = {}
    for e in averages:
        group = group_of(e.key)
        groups[group] = groups.get(group, 0.0) + e.self_cpu_time_total
    rows = [
        {"group": g, "ms_per_step": us / 1e3 / args.steps, "share": us / total}
        for g, us in sorted(groups.items(), key=lambda kv: -kv[1])
    ]
    print(describe(info))
    print(f"{args.size} {args.precision}, batch {args.batch} x seq {args.seq}, {args.steps} steps")
    print(table(rows, {"group": "s", "ms_per_step": ",.1f", "share": ".0%"}))
    top = sorted(averages, key=lambda e: -e.self_cpu_time_total)[: args.rows]
    ops = [
        {
            "operator": e.key[:60],
            "group": group_of(e.key),
            "calls_per_step": e.count / args.steps,
            "ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
            "share": e.self_cpu_time_total / total,
        }
        for e in top
    ]
    print(
        table(
            ops,
            {
                "operator": "s",
                "group": "s",
                "calls_per_step": ",.0f",
                "ms_per_step": ",.1f",
                "share": ".0%",
            },
        )
    )
    write(args.out, info, rows, args=vars(args) | {"out": str(args.out)}, operators=ops)
    return rows


if __name__ == "__main__":
    main()
