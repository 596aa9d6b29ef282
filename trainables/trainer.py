"""The training loop of one small μP model: a token budget, a schedule, evaluations, checkpoints.

Plain PyTorch, no Ray: `train(...)` takes a `report(metrics, checkpoint_dir)` callback, so the
same loop runs under Ray Tune (`trainables.trial`), in tests and in benchmarks. Batches are a pure
function of (seed, step) and the checkpoint holds model, optimizer, step and RNG, so a resumed run
continues the very same loss curve.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainables import checkpoint as ckpt
from trainables.model import MiniCPM, build_optimizer, set_lr
from trainables.schedules import ScheduleConfig, lr_at
from trainables.shapes import ModelConfig, flops_per_token, non_embedding_params
from trainables.tokens import TokenStore, bits_per_byte, sample_batch, val_batches

Report = Callable[[dict, "Path | None"], None]
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW. MiniCPM-1's values are unpublished; defaults follow OpenBMB's later engine."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self):
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas}: each must be in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps}: must be > 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained: budget in tokens, batch, lr and its schedule, evaluation."""

    lr: float = 0.01  # base lr η; μP scales hidden matrices by d_base/d (model.param_groups)
    batch_size: int = 16  # sequences per optimizer step
    seq_len: int = 128
    tokens: int | None = None  # token budget; or tokens_per_param
    tokens_per_param: float | None = None  # budget = this × non-embedding params (paper: 10·N)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval_every: int = 50  # steps between validation evaluations (and reports)
    # or tokens between evaluations: runs at different batch sizes then share their eval points
    eval_every_tokens: int | None = None
    eval_tokens: int = 32768  # validation tokens per evaluation
    checkpoint_every: int = 1  # checkpoint at every n-th evaluation; 0 = never
    # and only once this many seconds of the run have passed since its last checkpoint (or its
    # start): a trial shorter than this writes none. 0 = at every due evaluation. Each
    # checkpoint also makes Ray Tune snapshot the whole experiment now and then.
    checkpoint_min_s: float = 0.0
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU (see autocast_dtype)
    seed: int = 0
    divergence_ratio: float = 1.5  # diverged if train loss > ratio × the step-0 loss, or not finite
    threads: int = 0  # torch intra-op threads; 0 = leave as set by the environment
    # WSD branching (MiniCPM §3.4): a stable run keeps checkpoints at save_steps; a branch
    # starts from one of them (init_from) and trains only its decay, with its own schedule.
    save_steps: tuple[int, ...] = ()
    init_from: str | None = None

    def __post_init__(self):
        if (self.tokens is None) == (self.tokens_per_param is None):
            raise ValueError("give exactly one of tokens or tokens_per_param")
        positive = {
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "eval_every": self.eval_every,
            "eval_every_tokens": self.eval_every_tokens,
            "eval_tokens": self.eval_tokens,
            "tokens": self.tokens,
            "tokens_per_param": self.tokens_per_param,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value}: must be > 0")
        # Far beyond any real run (MiniCPM-2.4B: ~1.1T tokens, 960 x 4096 batches), so a typo
        # such as 1e30 for 1e3 fails here rather than as a run that never ends.
        largest = {
            "tokens": 10**15,
            "tokens_per_param": 1e6,
            "eval_every_tokens": 10**15,
            "batch_size": 10**7,
            "seq_len": 10**6,
            "threads": 4096,
        }
        for name, most in largest.items():
            value = getattr(self, name)
            if value is not None and value > most:
                raise ValueError(f"{name}={value}: must be <= {most:.0e}")
        if not 0 <= self.seed < 2**63:  # numpy's PCG64 takes no negative seed, torch 64 bits
            raise ValueError(f"seed={self.seed}: must be in [0, 2**63)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: allowed {', '.join(PRECISIONS)}")
        if any(s <= 0 for s in self.save_steps) or list(self.save_steps) != sorted(self.save_steps):
            raise ValueError(f"save_steps={self.save_steps}: positive steps in increasing order")
        if self.checkpoint_every < 0 or self.threads < 0 or not self.divergence_ratio > 1:
            raise ValueError("checkpoint_every and threads must be >= 0, divergence_ratio > 1")
        seconds = self.checkpoint_min_s
        number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
        if not (number and 0 <= seconds < 1e9):
            raise ValueError(f"checkpoint_min_s={self.checkpoint_min_s!r}: seconds in [0, 1e9)")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def total_tokens(self, model_cfg: ModelConfig) -> int:
        if self.tokens is not None:
            return self.tokens
        return int(self.tokens_per_param * non_embedding_params(model_cfg))

    def total_steps(self, model_cfg: ModelConfig) -> int:
        return max(1, round(self.total_tokens(model_cfg) / self.tokens_per_step))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `auto` is bf16 on CUDA devices that support it and fp32 on CPUs: on an AMX CPU, bf16 is
    slower than fp32 at micro-32 (0.117 vs 0.091 CPU s a step, one thread; the step is
    element-wise work that autocast keeps in fp32), the width most studies use, and 1.4-2.4x
    faster from micro-128 up (`bench/step_time.py`, docs/benchmarks.md): ask for `bf16` there.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@torch.no_grad()
def evaluate(
    model: MiniCPM,
    store: TokenStore,
    cfg: TrainConfig,
    amp: torch.dtype | None,
    device: torch.device,
) -> tuple[float, float]:
    """Mean validation loss (nats/token) over cfg.eval_tokens, and bits per byte."""
    model.eval()
    total, count = 0.0, 0
    for x, y in val_batches(store.val, cfg.batch_size, cfg.seq_len, cfg.eval_tokens):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    loss = total / max(count, 1)
    bytes_ = round(count * store.val_bytes_per_token)
    return loss, bits_per_byte(loss, count, bytes_)


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    store: TokenStore,
    *,
    report: Report | None = None,
    resume_from: str | Path | None = None,
    save_dir: str | Path | None = None,
    device: str = "auto",
) -> dict:
    """Train to the token budget; returns the last reported metrics (with `diverged`)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else ("cpu" if device == "auto" else device)
    )
    amp = autocast_dtype(cfg.precision, dev)
    torch.manual_seed(cfg.seed)
    model = MiniCPM(model_cfg).to(dev)
    opt = build_optimizer(
        model,
        cfg.lr,
        betas=cfg.optimizer.betas,
        eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
        fused=True,  # one kernel per parameter instead of ~10 (CPU and CUDA)
    )
    state = {"step": 0, "first_loss": None, "elapsed_s": 0.0, "n_evals": 0, "start_step": 0}
    if resume_from is not None:
        state.update(ckpt.load_checkpoint(resume_from, model, opt))
        ckpt.set_rng_state(state.pop("rng"))
    elif cfg.init_from is not None:
        state.update(_branch_state(ckpt.load_checkpoint(cfg.init_from, model, opt)))
    if cfg.save_steps and save_dir is None:
        raise ValueError("train.save_steps needs a save_dir to keep the stable checkpoints in")
    loop = _Loop(model_cfg, cfg, store, model, opt, amp, dev, report, state)
    loop.save_dir = Path(save_dir) if save_dir is not None else None
    if cfg.init_from is not None and resume_from is None and loop.total_steps <= state["step"]:
        raise ValueError(
            f"the budget ends at step {loop.total_steps}, not after the start "
            f"step {state['step']} (init_from {cfg.init_from})"
        )
    return loop.run()


def _branch_state(stable: dict) -> dict:
    """A branch continues the stable run's step count but accounts only its own compute."""
    return {
        "step": stable["step"],
        "start_step": stable["step"],
        "first_loss": stable["first_loss"],
        "elapsed_s": 0.0,
        "n_evals": 0,
    }


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


class _Loop:
    """The step loop's state; split out so each phase (step, evaluate, report) stays short."""

    def __init__(self, model_cfg, cfg, store, model, opt, amp, dev, report, state):
        self.model_cfg, self.cfg, self.store = model_cfg, cfg, store
        self.model, self.opt, self.amp, self.dev, self.report = model, opt, amp, dev, report
        self.state = state
        self.total_steps = cfg.total_steps(model_cfg)
        self.flops_per_token = flops_per_token(model_cfg, cfg.seq_len)
        self.window_loss, self.window_steps, self.window_t0 = 0.0, 0, time.perf_counter()
        self.last_metrics: dict = {}
        self.train_s = 0.0  # training seconds of the current window, evaluation excluded
        self.save_dir: Path | None = None  # where save_steps checkpoints go
        self.in_flight: deque[torch.Tensor] = deque()  # losses of queued steps, not yet read
        self.last_checkpoint_t = time.perf_counter()  # or the run's start

    def run(self) -> dict:
        if self.state["step"] >= self.total_steps:  # resumed from the final checkpoint
            self.train_s = 0.0
            return self.emit(val=evaluate(self.model, self.store, self.cfg, self.amp, self.dev))
        while self.state["step"] < self.total_steps:
            self.step()
            step = self.state["step"]
            last, saving = step == self.total_steps, step in self.cfg.save_steps
            # On a GPU the newest loss stays unread, so the host queues the next step while
            # the device runs this one; every loss is read before it is reported or saved.
            boundary = last or saving or self.eval_due(step) or self.dev.type != "cuda"
            if self.settle(keep=0 if boundary else 1):
                return self.emit(val=None, diverged=True)
            if saving:
                self.keep_checkpoint()
            if last or self.eval_due(step):
                self.train_s = time.perf_counter() - self.window_t0  # evaluation excluded
                self.emit(val=evaluate(self.model, self.store, self.cfg, self.amp, self.dev))
        return self.last_metrics

    def step(self) -> None:
        """Queue one optimizer step; its loss joins `in_flight` unread (no host sync here)."""
        step = self.state["step"]
        lr = lr_at(step, self.total_steps, self.cfg.lr, self.cfg.schedule)
        set_lr(self.opt, lr)
        x, y = sample_batch(
            self.store.train, self.cfg.batch_size, self.cfg.seq_len, self.cfg.seed, step
        )
        if self.dev.type == "cuda":  # pinned, so the copy does not wait for the device
            x, y = x.pin_memory(), y.pin_memory()
        with torch.autocast(
            self.dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
        ):
            loss = self.model(x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True))
        loss.backward()
        if self.cfg.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.in_flight.append(loss.detach())
        self.state["step"] = step + 1
        self.state["lr"] = lr

    def settle(self, keep: int) -> bool:
        """Read the losses of all but the newest `keep` queued steps into the window; True if
        one of them diverged."""
        while len(self.in_flight) > keep:
            value = self.in_flight.popleft().item()
            if self.state["first_loss"] is None:
                self.state["first_loss"] = value
            self.window_loss += value
            self.window_steps += 1
            if self.diverged(value):
                return True
        return False

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval_every_tokens
        if every is None:
            return step % self.cfg.eval_every == 0
        tps = self.cfg.tokens_per_step
        return (step * tps) // every > ((step - 1) * tps) // every

    def keep_checkpoint(self) -> None:
        """A persistent checkpoint for branches (not Tune's rotating one); idempotent on resume."""
        t0 = time.perf_counter()
        target = self.save_dir / checkpoint_name(self.state["step"])
        if not (target / ckpt.MANIFEST_FILE).exists():
            state = {**self.state, "rng": ckpt.rng_state()}
            ckpt.save_checkpoint(target, self.model, self.opt, state)
        self.window_t0 += time.perf_counter() - t0  # checkpoint I/O is not training time

    def diverged(self, loss: float) -> bool:
        limit = self.cfg.divergence_ratio * self.state["first_loss"]
        return not math.isfinite(loss) or loss > limit

    def emit(self, val: tuple[float, float] | None, diverged: bool = False) -> dict:
        window_s = self.train_s if val is not None else time.perf_counter() - self.window_t0
        self.state["elapsed_s"] += window_s
        self.state["n_evals"] += 1
        metrics = self.metrics(val, diverged, window_s)
        self.window_loss, self.window_steps, self.window_t0 = 0.0, 0, time.perf_counter()
        self.last_metrics = metrics
        if self.report is None:
            return metrics
        every = self.cfg.checkpoint_every
        recent = time.perf_counter() - self.last_checkpoint_t < self.cfg.checkpoint_min_s
        if diverged or not every or self.state["n_evals"] % every or recent:
            self.report(metrics, None)
            return metrics
        with tempfile.TemporaryDirectory(prefix="trial-ckpt-") as d:
            state = {**self.state, "rng": ckpt.rng_state()}
            ckpt.save_checkpoint(Path(d) / "state", self.model, self.opt, state)
            self.report(metrics, Path(d))
        self.window_t0 = self.last_checkpoint_t = time.perf_counter()  # I/O is not training time
        return metrics

    def metrics(self, val, diverged: bool, window_s: float) -> dict:
        step = self.state["step"]
        tokens = step * self.cfg.tokens_per_step
        own_tokens = (step - self.state["start_step"]) * self.cfg.tokens_per_step
        window_tokens = self.window_steps * self.cfg.tokens_per_step
        # A diverged trial reports the uniform-prediction loss ln(V): finite, so every searcher
        # can rank it, and no better than chance; the `diverged` column says what happened.
        chance = math.log(self.model_cfg.vocab_size)
        val_loss, val_bpb = val if val is not None else (chance, float("nan"))
        train_loss = self.window_loss / max(self.window_steps, 1)
        return {
            "step": step,
            "tokens": tokens,
            "flops": self.flops_per_token * tokens,
            "train_loss": train_loss if math.isfinite(train_loss) else chance,
            "val_loss": val_loss,
            "val_bpb": val_bpb,
            "lr": self.state.get("lr", 0.0),
            "tokens_per_s": window_tokens / max(window_s, 1e-9),
            "elapsed_s": self.state["elapsed_s"],
            "diverged": diverged,
            "completed": diverged or step >= self.total_steps,
            "total_steps": self.total_steps,
            "progress": step / self.total_steps,
            # what this trial computed itself: less than `flops` for a branch of a stable run
            "own_tokens": own_tokens,
            "own_flops": self.flops_per_token * own_tokens,
        }
