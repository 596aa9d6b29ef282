"""The Ray Tune trial: a plain function of a config dict that trains one model and reports.

The config dict is what a study's search space resolves to:

    {"model": {"preset": "micro-64", "scale_emb": 12.0, ...},   # trainables.shapes.get_config
     "train": {"lr": 0.01, "tokens": 2_000_000, ...},            # trainables.trainer.TrainConfig
     "data": {"sources": ["embedded:python-stdlib"], ...},       # trainables.data.DataConfig
     "runtime": {"study": "smoke", "cache_dir": ..., "wandb": {...}, "wandb_mode": ..., ...}}

`parse_trial_config` turns it into typed configs (clear errors on bad values) without Ray, so the
trial runs the same in a test, a benchmark, or under Tune (`tune_trial`, the only Ray code here).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from trainables import checkpoint as ckpt
from trainables import data
from trainables.dictconfig import ConfigError, from_dict
from trainables.shapes import ModelConfig, get_config
from trainables.tokens import TokenStore
from trainables.tracking import TrialTracker, WandbConfig
from trainables.trainer import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialConfig:
    model: ModelConfig
    train: TrainConfig
    data: data.DataConfig
    runtime: dict


def model_config(section: dict, where: str = "model") -> ModelConfig:
    """`{"preset": NAME, **overrides}` → ModelConfig, with errors naming the key."""
    if not isinstance(section, dict) or "preset" not in section:
        raise ConfigError(
            f"{where}.preset: required (a preset name such as micro-64 or "
            "minicpm-2.4b; see `sandbox model --list`)"
        )
    if not isinstance(section["preset"], str):
        raise ConfigError(
            f"{where}.preset: expected a preset name such as micro-64, got {section['preset']!r}"
        )
    overrides = {k: v for k, v in section.items() if k != "preset"}
    try:
        return get_config(section["preset"], **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_trial_config(config: dict) -> TrialConfig:
    """Typed configs; the model's vocabulary defaults to the tokenizer's (data.vocab_size)."""
    data_cfg = from_dict(data.DataConfig, config.get("data", {}), "data")
    section = dict(config.get("model", {}))
    given = section.setdefault("vocab_size", data_cfg.vocab_size)
    if given != data_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {given} differs from data.vocab_size {data_cfg.vocab_size}; "
            "drop model.vocab_size (it follows the tokenizer) or make them equal"
        )
    model = model_config(section)
    train_cfg = from_dict(TrainConfig, config.get("train", {}), "train")
    if train_cfg.seq_len > model.max_seq_len:
        raise ConfigError(
            f"train.seq_len: {train_cfg.seq_len} exceeds model.max_seq_len {model.max_seq_len}"
        )
    return TrialConfig(model, train_cfg, data_cfg, dict(config.get("runtime", {})))


def tune_trial(config: dict) -> None:
    """Ray Tune function trainable: resumes from `tune.get_checkpoint()` when Tune restarts it."""
    from ray import tune

    config = resolve_variant(config)
    cfg = parse_trial_config(config)
    store = _token_store(cfg)
    context = tune.get_context()
    tracker = _tracker(cfg, config, context.get_trial_name())
    resume_dir = _resume_copy(tune.get_checkpoint())
    save_root = cfg.runtime.get("save_root")
    save_dir = Path(save_root) / context.get_trial_id() if save_root else None

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        tracker.log(metrics)
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    try:
        train(
            cfg.model,
            cfg.train,
            store,
            report=report,
            resume_from=ckpt.inner_checkpoint(resume_dir) if resume_dir else None,
            save_dir=save_dir,
        )
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)
    tracker.finish()


def _resume_copy(checkpoint) -> Path | None:
    """A local copy of the newest valid checkpoint Tune kept for this trial (damaged ones are
    skipped with a warning); None, after a warning naming each damaged file, to start over."""
    try:
        return ckpt.local_copy(checkpoint, "trial-resume-")
    except ckpt.CheckpointError as e:
        log.warning("starting the trial over from step 0: %s", e)
        return None


def _token_store(cfg: TrialConfig):
    """The store the driver prepared when this node can read it, else prepare it here (same
    content hash, so every node ends with the same tokens)."""
    root = cfg.runtime.get("token_store")
    if root and (Path(root) / "meta.json").exists():
        return TokenStore.open(root)
    return data.prepare(cfg.data, cfg.runtime.get("cache_dir"))


def resolve_variant(config: dict) -> dict:
    """A study may grid over whole trial configs (`{"variant": {...}, "runtime": ...}`), e.g.
    the branches of a WSD study: the chosen variant is the trial's config."""
    if "variant" not in config:
        return config
    return {**config["variant"], "runtime": config.get("runtime", {})}


def _tracker(cfg: TrialConfig, config: dict, trial_name: str) -> TrialTracker:
    runtime = cfg.runtime
    wandb_cfg = from_dict(WandbConfig, runtime.get("wandb", {}), "tracking.wandb")
    return TrialTracker(
        wandb_cfg,
        mode=runtime.get("wandb_mode", "disabled"),
        group=runtime.get("study", "study"),
        name=trial_name,
        config={k: v for k, v in config.items() if k != "runtime"},
        directory=runtime.get("wandb_dir"),
    )
