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
    decay_fraction: 0.1              # WSD: the last 10% of steps decay (the anneal stage)
    decay_shape: exp
    optimizer: {betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, grad_clip: 1.0}
    scaling: {num_workers: 8, use_gpu: true, strategy: ddp}
    checkpoint_every: 1000           # optimizer steps
    derivation: {lr: "lr-transfer-micro: μP lr* at the widest width = 0.0081", ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainables.data import DataConfig
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
    seed: int = 0
    derivation: dict = field(default_factory=dict)  # value -> its source, for humans

    def __post_init__(self):
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
        if self.warmup_steps < 0 or self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be in 0..total steps")

    @property
    def sequences_per_step(self) -> int:
        return self.global_batch_tokens // self.seq_len

    @property
    def total_steps(self) -> int:
        return max(1, round(self.tokens / self.global_batch_tokens))

    @property
    def decay_start(self) -> int:
        """The first step of the anneal: WSD's stable phase ends here."""
        return self.total_steps - round(self.decay_fraction * self.total_steps)

    def accumulation_steps(self, num_workers: int | None = None) -> int:
        """Micro-batches per worker per optimizer step to reach the global batch."""
        workers = num_workers or self.scaling.num_workers
        per_step = workers * self.micro_batch_size
        if self.sequences_per_step % per_step:
            raise ValueError(
                f"global batch of {self.sequences_per_step} sequences is not a multiple of "
                f"{workers} workers x micro_batch_size {self.micro_batch_size}"
            )
        return self.sequences_per_step // per_step
