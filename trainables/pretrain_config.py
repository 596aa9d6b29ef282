"""The pretrain spec: what `sandbox transfer` writes and the Ray Train pretrain/anneal reads.

A YAML a human can read and edit; every derived value may carry its source under `derivation`
(which study, which law, which number), which the trainer ignores and the plan prints:

    name: minicpm-2.4b-pretrain
    model: {preset: minicpm-2.4b}
    data: {sources: [...], vocab_size: 122753}
    lr: 0.01                         # base lr η (μP: hidden matrices train at η·d_base/d)
    global_batch_tokens: 3932160     # tokens per optimizer step, across workers
    micro_batch_size: 4              # sequences per worker per forward/backward
    seq_len: 4096
    tokens: 1100000000000            # stable + decay
    warmup_steps: 2000
    decay_fraction: 0.1              # WSD: the last 10% of tokens decay (the anneal stage)
    decay_shape: exp
    batch_schedule:                  # optional: the global batch grows in the stable phase
      - {at_tokens: 200000000000, global_batch_tokens: 7864320}
    anneal_mixture:                  # optional: the anneal's data, named sources with weights
      - {name: pretrain, weight: 0.7}
      - {name: hq, weight: 0.2, sources: ["s3://bucket/hq/*.jsonl.gz"]}
      - {name: sft, weight: 0.1, sources: ["s3://bucket/sft-rendered.jsonl"]}
    optimizer: {betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, grad_clip: 1.0}
    scaling: {num_workers: 8, use_gpu: true, strategy: ddp}
    checkpoint_every: 1000           # optimizer steps
    derivation: {lr: "lr-transfer-micro: μP lr* at the widest width = 0.0081", ...}

Steps and tokens. Without a batch schedule every step takes global_batch_tokens B0 tokens and
there are round(tokens / B0) steps. With one, step s takes the batch in force at the tokens seen
before it; each change lands exactly on a step boundary (validated), so the run is a list of
`BatchSegment`s and `tokens_at(s)` is exact. The decay takes round(decay_fraction · tokens seen /
B_last) steps at the last batch (batch changes belong to the stable phase, as in MiniCPM's
batch-size-increase experiment, facts §3.6). The learning-rate schedule runs on a token clock:
position = tokens seen / u with u = gcd of the batch sizes, an integer that equals the step when
the batch never changes; warmup_steps counts steps of the first batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainables.data import DataConfig
from trainables.mixture import MixtureSource, check_mixture
from trainables.schedules import DECAY_SHAPES
from trainables.trainer import OptimizerConfig

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    strategy: str = "ddp"  # ddp: replicate the model; fsdp: shard it (FSDP2) when it won't fit

    def __post_init__(self):
        if not 1 <= self.num_workers <= 100_000:
            raise ValueError(f"num_workers={self.num_workers}: must be in 1..100000")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: allowed {', '.join(STRATEGIES)}")


@dataclass(frozen=True)
class BatchChange:
    """From `at_tokens` tokens seen on, every optimizer step takes `global_batch_tokens`."""

    at_tokens: int
    global_batch_tokens: int

    def __post_init__(self):
        for name in ("at_tokens", "global_batch_tokens"):
            value = getattr(self, name)
            if not 0 < value <= 10**15:
                raise ValueError(f"batch_schedule {name}={value}: must be in 1..1e15")


@dataclass(frozen=True)
class BatchSegment:
    """Steps start_step, start_step + 1, ... (up to the next segment) at one global batch."""

    start_step: int
    start_tokens: int
    global_batch_tokens: int


def batch_segments(first_batch: int, changes: tuple[BatchChange, ...]) -> tuple[BatchSegment, ...]:
    """The run's segments; a change's step is its predecessor's plus the steps to reach it."""
    segments = [BatchSegment(0, 0, first_batch)]
    for change in changes:
        prev = segments[-1]
        steps = (change.at_tokens - prev.start_tokens) // prev.global_batch_tokens
        segments.append(
            BatchSegment(prev.start_step + steps, change.at_tokens, change.global_batch_tokens)
        )
    return tuple(segments)


@dataclass(frozen=True)
class PretrainConfig:
    name: str
    model: dict  # {"preset": NAME, **ModelConfig overrides}
    lr: float
    global_batch_tokens: int
    seq_len: int
    tokens: int
    data: DataConfig = field(default_factory=DataConfig)
    micro_batch_size: int = 1
    warmup_steps: int = 0
    decay_fraction: float = 0.1
    decay_shape: str = "exp"
    min_lr_ratio: float = 0.1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint_every: int = 1000
    eval_every: int = 1000
    eval_tokens: int = 1 << 20
    precision: str = "auto"
    # torch.compile the training forward (under DDP/FSDP): fuses the element-wise work and
    # casts around the matmuls. It pays on long runs: the first steps compile (minutes).
    compile: bool = False
    seed: int = 0
    batch_schedule: tuple[BatchChange, ...] = ()  # the batch grows at these token counts
    anneal_mixture: tuple[MixtureSource, ...] = ()  # empty: the anneal reads `data` only
    derivation: dict = field(default_factory=dict)  # value -> its source, for humans

    def __post_init__(self):
        for name in ("batch_schedule", "anneal_mixture"):  # lists from Python callers
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in (
            "global_batch_tokens",
            "seq_len",
            "tokens",
            "micro_batch_size",
            "checkpoint_every",
            "eval_every",
            "eval_tokens",
        ):
            value = getattr(self, name)
            if not 0 < value <= 10**15:
                raise ValueError(f"{name}={value}: must be in 1..1e15")
        if not 0 < self.lr <= 10:
            raise ValueError(f"lr={self.lr}: must be in (0, 10]")
        if not 0 <= self.decay_fraction < 1 or not 0 < self.min_lr_ratio <= 1:
            raise ValueError("decay_fraction must be in [0, 1) and min_lr_ratio in (0, 1]")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape={self.decay_shape!r}: allowed {DECAY_SHAPES}")
        if self.global_batch_tokens % self.seq_len:
            raise ValueError(
                f"global_batch_tokens={self.global_batch_tokens} must be a "
                f"multiple of seq_len={self.seq_len}"
            )
        self._check_batch_schedule()
        if self.warmup_steps < 0 or self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be in 0..total steps")
        check_mixture(self.anneal_mixture)

    def _check_batch_schedule(self) -> None:
        """Token counts increase and land on step boundaries; batches grow, split evenly over
        the workers' micro-batches, and all changes come before the decay."""
        unit = self.seq_len * self.micro_batch_size * self.scaling.num_workers
        prev_at, batch = 0, self.global_batch_tokens
        for i, change in enumerate(self.batch_schedule):
            where = f"batch_schedule[{i}]"
            if not prev_at < change.at_tokens < self.tokens:
                raise ValueError(
                    f"{where}.at_tokens={change.at_tokens}: must exceed {prev_at} (the change "
                    f"before) and stay below tokens={self.tokens}"
                )
            if (change.at_tokens - prev_at) % batch:
                below = prev_at + (change.at_tokens - prev_at) // batch * batch
                raise ValueError(
                    f"{where}.at_tokens={change.at_tokens}: must land on a step boundary, "
                    f"{prev_at} + a multiple of the batch {batch} before it (e.g. {below} or "
                    f"{below + batch})"
                )
            if change.global_batch_tokens <= batch or change.global_batch_tokens % unit:
                raise ValueError(
                    f"{where}.global_batch_tokens={change.global_batch_tokens}: must exceed "
                    f"{batch} (the batch grows) and be a multiple of seq_len x micro_batch_size "
                    f"x num_workers = {unit}"
                )
            prev_at, batch = change.at_tokens, change.global_batch_tokens
        last = self.segments[-1]
        if last.start_step > self.decay_start:
            raise ValueError(
                f"batch_schedule: the last change, at step {last.start_step} (at_tokens "
                f"{last.start_tokens}), falls after decay_start={self.decay_start}: batch "
                "changes belong to the stable phase; move it earlier or lower decay_fraction"
            )

    # --- steps and tokens -----------------------------------------------------------------

    @property
    def segments(self) -> tuple[BatchSegment, ...]:
        return batch_segments(self.global_batch_tokens, self.batch_schedule)

    def segment_at(self, step: int) -> BatchSegment:
        return next(s for s in reversed(self.segments) if s.start_step <= step)

    def batch_tokens_at(self, step: int) -> int:
        """The global batch, in tokens, of optimizer step `step`."""
        return self.segment_at(step).global_batch_tokens

    def sequences_at(self, step: int) -> int:
        return self.batch_tokens_at(step) // self.seq_len

    def tokens_at(self, step: int) -> int:
        """Tokens seen before optimizer step `step` (after step - 1): exact across changes."""
        seg = self.segment_at(step)
        return seg.start_tokens + (step - seg.start_step) * seg.global_batch_tokens

    @property
    def sequences_per_step(self) -> int:
        """Sequences in the first batch (every batch, without a batch schedule)."""
        return self.global_batch_tokens // self.seq_len

    @property
    def total_steps(self) -> int:
        last = self.segments[-1]
        steps = round((self.tokens - last.start_tokens) / last.global_batch_tokens)
        return last.start_step + max(1, steps)

    @property
    def decay_start(self) -> int:
        """The first step of the anneal: WSD's stable phase ends here."""
        total = self.total_steps
        decay_steps = round(
            self.decay_fraction * self.tokens_at(total) / self.batch_tokens_at(total)
        )
        return total - decay_steps

    @property
    def clock_unit(self) -> int:
        """Tokens per tick of the lr schedule's clock: the gcd of the batch sizes."""
        return math.gcd(*(s.global_batch_tokens for s in self.segments))

    def clock(self, step: int) -> int:
        """The lr schedule's position at step `step`: tokens seen / clock_unit."""
        return self.tokens_at(step) // self.clock_unit

    def accumulation_steps(self, num_workers: int | None = None, step: int = 0) -> int:
        """Micro-batches per worker at optimizer step `step` to reach its global batch."""
        workers = num_workers or self.scaling.num_workers
        sequences = self.sequences_at(step)
        per_step = workers * self.micro_batch_size
        if sequences % per_step:
            raise ValueError(
                f"global batch of {sequences} sequences (step {step}) is not a multiple of "
                f"{workers} workers x micro_batch_size {self.micro_batch_size}"
            )
        return sequences // per_step

    def check_split(self, num_workers: int | None = None) -> None:
        """Refuse, before any worker starts, a batch of any segment that does not split."""
        for seg in self.segments:
            self.accumulation_steps(num_workers, seg.start_step)
