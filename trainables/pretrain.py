"""The pretrain worker loop: one PretrainConfig, N data-parallel workers, WSD in two stages.

Plain PyTorch and torch.distributed: `train_pretrain(cfg, store, runtime)` runs in one process
(tests, a laptop) or on each Ray Train worker (`pretrain_worker`, the only Ray code here), which
passes a `Runtime` holding its rank, device, strategy (ddp replicates the model, fsdp shards it
with FSDP2: trainables.fsdp) and report callback.

Data: optimizer step s reads the global batch `sample_batch(train, N_s, seq_len, seed, s)` with
N_s = cfg.sequences_at(s) (the batch may grow at set token counts: cfg.batch_schedule); rank r
takes rows [r·N/W, (r+1)·N/W) and micro-step m the next micro_batch_size rows of those. The global
batch is therefore the same for any worker count, and the step alone is the data position, so a
resumed run sees exactly the batches it would have seen. An anneal with `cfg.anneal_mixture`
draws its rows from the mixture's sources instead (trainables.mixture), again by (seed, s) alone,
and reports each source's loss and tokens.

Stages (MiniCPM §4, WSD): `pretrain` runs warmup and stable steps 0 .. decay_start and ends with a
checkpoint there; `anneal` starts from a stable checkpoint (`init_from`) and runs the decay, so
any number of anneals branch from one stable run. An anneal from an earlier stable step s0 decays
over the same D = total_steps - decay_start steps, shifted to start at s0.

    runtime = Runtime(report=lambda metrics, ckpt_dir: print(metrics))
    train_pretrain(cfg, prepare(cfg.data), runtime)
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainables import checkpoint as ckpt
from trainables.mixture import Mixture, per_source, prepare_mixture, row_losses
from trainables.model import MiniCPM, build_optimizer, set_lr
from trainables.pretrain_config import PretrainConfig
from trainables.schedules import ScheduleConfig, lr_at
from trainables.shapes import ModelConfig, flops_per_token
from trainables.tokens import TokenStore, sample_batch
from trainables.trainer import TrainConfig, autocast_dtype, evaluate
from trainables.trial import model_config

STAGES = ("pretrain", "anneal")
Report = Callable[[dict, "Path | None"], None]


@dataclass
class Runtime:
    """What the loop needs from its launcher; the defaults are one process without Ray."""

    world_size: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m  # DDP (ray.train.torch.prepare_model)
    strategy: str = "ddp"  # "fsdp" with world_size > 1: shard instead of `wrap`
    report: Report | None = None  # (metrics, checkpoint folder or None), called on every rank
    resume_from: Path | None = None  # a checkpoint folder of this run: continue it exactly
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: no MFU reported
    log: Callable[[dict], None] | None = None  # rank 0's tracker (W&B)


# --- pure parts: model, schedule, data slicing, throughput --------------------------------------


def pretrain_model_config(cfg: PretrainConfig) -> ModelConfig:
    """The model section as a ModelConfig; its vocabulary follows the tokenizer's."""
    section = {"vocab_size": cfg.data.vocab_size, **cfg.model}
    model = model_config(section)
    if cfg.seq_len > model.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds model max_seq_len={model.max_seq_len}")
    return model


def schedule_config(cfg: PretrainConfig) -> ScheduleConfig:
    """WSD on the token clock (cfg.clock: the step itself when the batch never changes): the
    warmup spans warmup_steps first batches, the decay the ticks from decay_start to the end;
    constant when decay_fraction is 0. Evaluate it as lr_at(cfg.clock(s), cfg.clock(total))."""
    warmup = cfg.warmup_steps * cfg.global_batch_tokens // cfg.clock_unit
    decay_ticks = cfg.clock(cfg.total_steps) - cfg.clock(cfg.decay_start)
    if decay_ticks == 0:
        return ScheduleConfig(kind="constant", warmup_steps=warmup)
    return ScheduleConfig(
        kind="wsd",
        warmup_steps=warmup,
        min_lr_ratio=cfg.min_lr_ratio,
        decay_steps=decay_ticks,
        decay_shape=cfg.decay_shape,
    )


def lr_of_step(cfg: PretrainConfig, schedule: ScheduleConfig, step: int) -> float:
    """The lr of optimizer step `step` (anneals pass step + their offset)."""
    return lr_at(cfg.clock(step), cfg.clock(cfg.total_steps), cfg.lr, schedule)


def stage_end(cfg: PretrainConfig, stage: str, offset: int) -> int:
    """The step after the stage's last: decay_start for pretrain, the decay's end for anneal."""
    if stage == "pretrain":
        return cfg.decay_start
    return cfg.total_steps - offset


def anneal_offset(cfg: PretrainConfig, stable_step: int) -> int:
    """Schedule shift of an anneal from stable step s0: lr(s) = lr_at(s + decay_start - s0)."""
    if cfg.decay_start == cfg.total_steps:
        raise ValueError("decay_fraction=0 leaves no decay steps to anneal")
    if not cfg.warmup_steps <= stable_step <= cfg.decay_start:
        raise ValueError(
            f"init_from is at step {stable_step}: an anneal starts from a stable step in "
            f"{cfg.warmup_steps}..{cfg.decay_start} (warmup_steps..decay_start) of this spec"
        )
    last_change = cfg.segments[-1].start_step
    if stable_step < last_change:  # the decay runs at the last batch, step for step
        raise ValueError(
            f"init_from is at step {stable_step}, before the last batch_schedule change (step "
            f"{last_change}): anneal from step {last_change} or later, or use a spec without "
            "the later changes (checkpoints do not depend on the batch)"
        )
    return cfg.decay_start - stable_step


def rank_rows(sequences_per_step: int, world_size: int, rank: int) -> slice:
    """Rank r's rows of the global batch: [r·N/W, (r+1)·N/W)."""
    if sequences_per_step % world_size or not 0 <= rank < world_size:
        raise ValueError(
            f"{sequences_per_step} sequences per step cannot be split evenly over "
            f"{world_size} workers (rank {rank})"
        )
    per_rank = sequences_per_step // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def micro_batches(
    batch: tuple[torch.Tensor, ...], micro_batch_size: int, world_size: int, rank: int
) -> list[tuple[torch.Tensor, ...]]:
    """This rank's micro-batches of the global batch (tensors of N rows each, e.g. x, y)."""
    rows = rank_rows(len(batch[0]), world_size, rank)
    mine = [t[rows] for t in batch]
    if len(mine[0]) % micro_batch_size:
        raise ValueError(
            f"{len(mine[0])} rows per rank are not whole micro-batches of {micro_batch_size}"
        )
    mb, n = micro_batch_size, len(mine[0]) // micro_batch_size
    return [tuple(t[m * mb : (m + 1) * mb] for t in mine) for m in range(n)]


def throughput(tokens: int, seconds: float, flops_per_tok: float, world_size: int, peak):
    """tokens/s, achieved model FLOP/s, and MFU = FLOP/s / (W · peak) (PaLM App. B) if peak."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    out = {"tokens_per_s": tokens_per_s, "flops_per_s": flops_per_tok * tokens_per_s}
    if peak:
        out["mfu"] = out["flops_per_s"] / (world_size * peak)
    return out


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Achieved FLOP/s of a large square matmul: a measured stand-in for the datasheet peak."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernels chosen, clocks up
        a @ b
    _sync(device)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the loop ----------------------------------------------------------------------------------


def train_pretrain(
    cfg: PretrainConfig,
    store: TokenStore,
    runtime: Runtime | None = None,
    *,
    stage: str = "pretrain",
    init_from: str | Path | None = None,
    report_every: int = 10,
    mixture: Mixture | None = None,
) -> dict:
    """Run the stage to its end step; returns the last metrics. See the module docstring.

    An anneal of a spec with anneal_mixture reads `mixture` (prepared here when None)."""
    rt = runtime or Runtime()
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: allowed {', '.join(STAGES)}")
    if stage == "anneal" and init_from is None and rt.resume_from is None:
        raise ValueError("stage='anneal' needs init_from: a stable checkpoint folder")
    model_cfg = pretrain_model_config(cfg)
    sharded = rt.strategy == "fsdp" and rt.world_size > 1
    torch.manual_seed(cfg.seed)
    # fsdp: the full model and any checkpoint are loaded on the host; shard() moves 1/W of them
    model = MiniCPM(model_cfg).to(torch.device("cpu") if sharded else rt.device)
    opt = _make_optimizer(cfg, model)
    state = _start_state(cfg, stage, init_from, rt, model, opt)
    if sharded:
        from trainables import fsdp

        model, opt = fsdp.shard(model, opt, rt.device, lambda m: _make_optimizer(cfg, m))
    if state["stage"] != "anneal" or not cfg.anneal_mixture:  # a resume knows its own stage
        mixture = None
    elif mixture is None:
        mixture = prepare_mixture(cfg.anneal_mixture, cfg.data, store)
    loop = _Loop(
        cfg, model_cfg, store, rt, model, opt, state, report_every, sharded=sharded, mixture=mixture
    )
    return loop.run()


def _make_optimizer(cfg: PretrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the μP groups (trainables.model.param_groups)."""
    return build_optimizer(
        model,
        cfg.lr,
        betas=cfg.optimizer.betas,
        eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
    )


def _start_state(cfg, stage, init_from, rt: Runtime, model, opt) -> dict:
    if rt.resume_from is not None:  # a restarted or rerun worker: continue exactly
        # A damaged checkpoint is skipped, with a warning naming the file, for the newest valid
        # one of the same run before it (`<run>/step_<n>`); never a newer one.
        folder = ckpt.inner_checkpoint(ckpt.resume_point(rt.resume_from))
        state = ckpt.load_checkpoint(folder, model, opt, verify=False)  # resume_point verified it
        ckpt.set_rng_state(state.pop("rng"))
        return state
    state = {"step": 0, "offset": 0, "stage": stage, "init_from": None}
    if stage == "anneal":
        stable = ckpt.load_checkpoint(checkpoint_folder(init_from), model, opt)
        offset = anneal_offset(cfg, stable["step"])
        state |= {"step": stable["step"], "offset": offset, "init_from": str(init_from)}
    return state


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint inside a reported folder (`<dir>/state`), or `path` itself."""
    path = Path(path)
    return path / "state" if (path / "state" / ckpt.MANIFEST_FILE).exists() else path


class _Loop:
    """The step loop's state, split so each phase (step, report, checkpoint) stays short."""

    def __init__(
        self, cfg, model_cfg, store, rt, model, opt, state, report_every, *, sharded, mixture
    ):
        self.cfg, self.store, self.rt, self.opt, self.state = cfg, store, rt, opt, state
        self.model_cfg = model_cfg
        self.model = model  # unwrapped (or sharded in place): what is saved and evaluated
        self.sharded: bool = sharded  # FSDP2: every rank evaluates and gathers checkpoints
        self.mixture: Mixture | None = mixture
        self.ddp = model if self.sharded else rt.wrap(model)  # no_sync and gradient hooks
        # what the step calls: compiled around DDP (its optimizer splits graphs at buckets)
        self.forward_model = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.amp = autocast_dtype(cfg.precision, rt.device)
        self.schedule = schedule_config(cfg)
        self.end = stage_end(cfg, state["stage"], state["offset"])
        self.flops_per_token = flops_per_token(model_cfg, cfg.seq_len)
        self.report_every = report_every
        self.eval_cfg = TrainConfig(
            batch_size=cfg.micro_batch_size,
            seq_len=cfg.seq_len,
            tokens=cfg.global_batch_tokens,
            eval_tokens=cfg.eval_tokens,
        )
        if self.mixture is not None:
            zeros = dict.fromkeys(self.mixture.names, 0)
            self.state["mixture_tokens"] = self.state.get("mixture_tokens", zeros)
        self.reset_window()
        self.last: dict = {}

    def reset_window(self) -> None:
        self.window_loss, self.window_steps, self.window_tokens = 0.0, 0, 0
        n = len(self.mixture.names) if self.mixture is not None else 0
        self.source_loss = torch.zeros(n, dtype=torch.float64)  # this rank's row-loss sums
        self.source_rows = torch.zeros(n, dtype=torch.float64)
        self.t0 = time.perf_counter()

    def run(self) -> dict:
        while self.state["step"] < self.end:
            self.step()
            step = self.state["step"]
            done = step == self.end
            ckpt_due = done or step % self.cfg.checkpoint_every == 0
            if done or ckpt_due or step % self.report_every == 0:
                self.emit(checkpoint=ckpt_due, val=done or step % self.cfg.eval_every == 0)
        return self.last

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """x, y (and each row's source index under a mixture): a function of (seed, step)."""
        n, seq_len, seed = self.cfg.sequences_at(step), self.cfg.seq_len, self.cfg.seed
        if self.mixture is None:
            return sample_batch(self.store.train, n, seq_len, seed, step)
        x, y, source = self.mixture.batch(n, seq_len, seed, step)
        tokens = self.state["mixture_tokens"]
        for name, count in zip(
            self.mixture.names, torch.bincount(source, minlength=len(tokens)), strict=True
        ):
            tokens[name] += int(count) * seq_len
        return x, y, source

    def step(self) -> None:
        step = self.state["step"]
        lr = lr_of_step(self.cfg, self.schedule, step + self.state["offset"])
        set_lr(self.opt, lr)
        loss = torch.zeros((), device=self.rt.device)
        parts = micro_batches(
            self.batch(step), self.cfg.micro_batch_size, self.rt.world_size, self.rt.rank
        )
        for m, part in enumerate(parts):
            # gradients are reduced once per step, on the last micro-batch only
            last = m == len(parts) - 1
            with contextlib.nullcontext() if last else _no_sync(self.ddp):
                with torch.autocast(
                    self.rt.device.type,
                    dtype=self.amp or torch.float32,
                    enabled=self.amp is not None,
                ):
                    micro_loss = self.forward(part)
                micro_loss = micro_loss / len(parts)  # the step's loss is the mean of its parts
                micro_loss.backward()
            loss += micro_loss.detach()
        if self.cfg.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state["step"], self.state["lr"] = step + 1, lr
        self.window_loss += loss.item()  # this rank's mean; averaged over ranks in emit
        self.window_steps += 1
        self.window_tokens += self.cfg.batch_tokens_at(step)

    def forward(self, part: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The micro-batch's mean loss; under a mixture also each source's row losses."""
        x, y = (t.to(self.rt.device) for t in part[:2])
        if self.mixture is None:
            return self.forward_model(x, y)
        rows = row_losses(self.forward_model(x), y)  # (mb,)
        source, n = part[2], len(self.mixture.names)
        self.source_loss += per_source(rows.detach(), source, n).cpu()
        self.source_rows += per_source(torch.ones_like(rows), source, n).cpu()
        return rows.mean()

    def emit(self, checkpoint: bool, val: bool) -> None:
        metrics = self.metrics(time.perf_counter() - self.t0)
        if val and (self.rt.rank == 0 or self.sharded):  # fsdp: every rank joins each forward
            metrics |= self.validate()
        if self.rt.log is not None:
            self.rt.log(metrics)
        self.last = metrics
        if checkpoint:
            self.report_checkpoint(metrics)
        elif self.rt.report is not None:
            self.rt.report(metrics, None)
        self.reset_window()

    def validate(self) -> dict:
        """val_loss and val_bpb of the pretraining data and of each other mixture source."""
        args = (self.eval_cfg, self.amp, self.rt.device)
        loss, bpb = evaluate(self.model, self.store, *args)
        out = {"val_loss": loss, "val_bpb": bpb}
        if self.mixture is not None:
            for name, store in zip(self.mixture.names, self.mixture.stores, strict=True):
                if store is not self.store:
                    loss, bpb = evaluate(self.model, store, *args)
                    out |= {f"val_loss_{name}": loss, f"val_bpb_{name}": bpb}
        return out

    def report_checkpoint(self, metrics: dict) -> None:
        """Rank 0 writes the checkpoint; every rank reports, as Ray Train requires."""
        if self.rt.report is None:
            return
        full = None
        if self.sharded:  # a collective: every rank sends its shards to rank 0
            from trainables import fsdp

            full = fsdp.gather_full_state(self.model, self.opt)
        if self.rt.rank != 0:
            self.rt.report(metrics, None)
            return
        d = Path(tempfile.mkdtemp(prefix="pretrain-ckpt-"))
        try:
            state = {**self.state, "rng": ckpt.rng_state()}
            self.save(d / "state", state, full)
            self.rt.report(metrics, d)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def save(self, folder: Path, state: dict, full: tuple[dict, dict] | None) -> None:
        if full is None:
            ckpt.save_checkpoint(folder, self.model, self.opt, state)
            return
        from trainables import fsdp

        make_opt = functools.partial(_make_optimizer, self.cfg)
        fsdp.save_full_checkpoint(folder, full, lambda: MiniCPM(self.model_cfg), make_opt, state)

    def metrics(self, seconds: float) -> dict:
        step = self.state["step"]
        loss = _mean_over_ranks(self.window_loss / max(self.window_steps, 1), self.rt.device)
        tokens = self.cfg.tokens_at(step)
        out = {
            "step": step,
            "stage": self.state["stage"],
            "train_loss": loss,
            "lr": self.state.get("lr", 0.0),
            "tokens": tokens,
            "global_batch_tokens": self.cfg.batch_tokens_at(max(step - 1, 0)),
            "flops": self.flops_per_token * tokens,
            **throughput(
                self.window_tokens,
                seconds,
                self.flops_per_token,
                self.rt.world_size,
                self.rt.peak_flops,
            ),
            "progress": step / self.end,
            "completed": step >= self.end,
        }
        return out | self.source_metrics()

    def source_metrics(self) -> dict:
        """train_loss_<name> over the window's rows of each source, tokens_<name> in the stage."""
        if self.mixture is None:
            return {}
        sums = _sum_over_ranks(torch.stack([self.source_loss, self.source_rows]), self.rt.device)
        out = {}
        for i, name in enumerate(self.mixture.names):
            if sums[1, i] > 0:
                out[f"train_loss_{name}"] = (sums[0, i] / sums[1, i]).item()
            out[f"tokens_{name}"] = self.state["mixture_tokens"][name]
        return out


def _no_sync(model: nn.Module):
    """Accumulate without communicating: DDP's no_sync, FSDP2's gradient sync switched off."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: skip the reduce-scatter
        return _fsdp_no_sync(model)
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _sum_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


# --- the Ray Train entry -----------------------------------------------------------------------


def pretrain_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker`: config = {cfg, store_root, mixture_roots, stage,
    init_from, ...}."""
    import ray.train
    import ray.train.torch

    cfg: PretrainConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    peak = config.get("peak_flops")
    if peak is None and device.type == "cuda":
        peak = measure_peak_flops(device)
    tracker = _tracker(config, rank)
    resume = ckpt.local_copy(ray.train.get_checkpoint(), "pretrain-resume-")

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        _maybe_fail(config.get("fail_once"), metrics["step"], rank)
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        name = f"step_{metrics['step']:08d}" if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    rt = Runtime(
        world_size=ctx.get_world_size(),
        rank=rank,
        device=device,
        wrap=ray.train.torch.prepare_model,
        strategy=cfg.scaling.strategy,
        report=report,
        resume_from=resume,
        peak_flops=peak,
        log=tracker.log if tracker is not None else None,
    )
    store = _token_store(cfg, config.get("store_root"))
    mixture = None
    if config["stage"] == "anneal" and cfg.anneal_mixture:
        mixture = prepare_mixture(cfg.anneal_mixture, cfg.data, store, config.get("mixture_roots"))
    try:
        train_pretrain(
            cfg,
            store,
            rt,
            stage=config["stage"],
            init_from=config.get("init_from"),
            report_every=config.get("report_every", 10),
            mixture=mixture,
        )
    finally:
        if tracker is not None:
            tracker.finish()
        if resume is not None:
            shutil.rmtree(resume, ignore_errors=True)


def _token_store(cfg: PretrainConfig, root: str | None) -> TokenStore:
    """The driver's store when this node can read it, else built here (same content hash)."""
    if root and (Path(root) / "meta.json").exists():
        return TokenStore.open(root)
    from trainables.data import prepare

    return prepare(cfg.data)


def _tracker(config: dict, rank: int):
    from trainables.tracking import TrialTracker, WandbConfig

    mode = config.get("wandb_mode", "offline")
    if rank != 0 or mode == "disabled":
        return None
    cfg: PretrainConfig = config["cfg"]
    return TrialTracker(
        WandbConfig(**config.get("wandb", {})),
        mode=mode,
        group=cfg.name,
        name=config["run_name"],
        config={"stage": config["stage"], "init_from": config.get("init_from")},
        directory=config.get("wandb_dir"),
    )


def _maybe_fail(fail_once: dict | None, step: int, rank: int) -> None:
    """Fault drill: raise once on rank 0 when `step` is reported; a marker file keeps it once."""
    if not fail_once or rank != 0 or step != fail_once["step"]:
        return
    marker = Path(fail_once["marker"])
    if marker.exists():
        return
    marker.write_text(str(step))
    raise RuntimeError(f"injected failure at step {step} (fault drill, marker {marker})")
