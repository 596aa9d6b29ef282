"""Launch the pretrain or an anneal of a PretrainConfig on Ray Train (TorchTrainer, DDP or FSDP2).

    sandbox pretrain SPEC                 ->  run_pretrain(SPEC, storage)
    sandbox anneal SPEC --from CKPT       ->  run_pretrain(SPEC, storage, stage="anneal",
                                                           init_from=CKPT)

Runs land in `<storage>/<name>` (pretrain) and `<storage>/<name>-anneal-<tag>` (each anneal its
own folder, tag defaulting to the stable checkpoint's name), with one checkpoint folder per
`checkpoint_every` steps named `step_<8 digits>`. Rerunning the same command resumes from the last
checkpoint (Ray Train resumes a run with the same storage path and name); a worker failure
restarts the workers from it, up to `max_failures` times. The worker loop is
trainables.pretrain; this module only builds the Ray objects and prepares the token stores (the
spec's data and, for an anneal, each `anneal_mixture` source) once, before the workers start.
`scaling.strategy: fsdp` shards the model over the workers (trainables.fsdp); its checkpoints are
the same files as ddp's, so a run may switch strategy between stages or on resume.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

from sandbox_service import storage as storage_urls
from sandbox_service import yaml_safe
from sandbox_service.spec import absolute_sources
from sandbox_service.study import init_ray
from trainables import checkpoint as ckpt
from trainables.data import prepare
from trainables.dictconfig import from_dict
from trainables.mixture import prepare_mixture
from trainables.pretrain import (
    STAGES,
    anneal_offset,
    checkpoint_folder,
    pretrain_model_config,
    pretrain_worker,
)
from trainables.pretrain_config import PretrainConfig

CHECKPOINT_RE = re.compile(r"step_(\d{8})")


def load_spec(path: str | Path) -> PretrainConfig:
    """A PretrainConfig from a YAML file; errors name the file and the key. Local data paths
    become absolute here: Ray Train workers run in their own working directories."""
    cfg = from_dict(PretrainConfig, yaml_safe.load(path), str(path))
    mixture = tuple(replace(m, sources=absolute_sources(m.sources)) for m in cfg.anneal_mixture)
    data = replace(cfg.data, sources=absolute_sources(cfg.data.sources))
    return replace(cfg, data=data, anneal_mixture=mixture)


def run_name(cfg: PretrainConfig, stage: str, init_from: str | Path | None, tag: str | None) -> str:
    """`<name>` for the pretrain, `<name>-anneal-<tag>` for an anneal (tag: the checkpoint's)."""
    if stage == "pretrain":
        return cfg.name
    return f"{cfg.name}-anneal-{tag or Path(init_from).name}"


def run_pretrain(
    cfg: PretrainConfig | str | Path,
    storage: str,
    *,
    stage: str = "pretrain",
    init_from: str | Path | None = None,
    address: str | None = None,
    tag: str | None = None,
    num_workers: int | None = None,
    report_every: int = 10,
    max_failures: int = 2,
    wandb_mode: str = "offline",
    peak_flops: float | None = None,
    fail_once: dict | None = None,
):
    """Run (or resume) one stage; returns Ray's `Result` (metrics, checkpoint, path).

    Raises Ray Train's error once the workers fail more than max_failures times; rerunning the
    same call then resumes from the last checkpoint. Rank 0 logs to W&B (offline by default,
    under `<storage>/<name>/wandb` for a later `wandb sync`; "disabled" turns it off).

    num_workers overrides cfg.scaling.num_workers; peak_flops (per device) enables MFU on CPUs
    (on GPUs it is measured when not given); fail_once={"step": k, "marker": path} raises once on
    rank 0 when step k is reported (make k a reported step), a drill of the restart path.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = cfg if isinstance(cfg, PretrainConfig) else load_spec(cfg)
    if init_from is not None and "://" not in str(init_from):
        init_from = str(Path(init_from).resolve())  # workers do not share our working directory
    _check_stage(cfg, stage, init_from)
    workers = num_workers or cfg.scaling.num_workers
    cfg.check_split(workers)  # refuse an uneven split of any batch before any worker starts
    pretrain_model_config(cfg)
    name = run_name(cfg, stage, init_from, tag)
    root = _storage_path(storage)
    store = prepare(cfg.data)
    mixture_roots = None
    if stage == "anneal" and cfg.anneal_mixture:
        mixture = prepare_mixture(cfg.anneal_mixture, cfg.data, store)
        mixture_roots = {n: s.root for n, s in zip(mixture.names, mixture.stores, strict=True)}
    init_ray(address, None)
    config = {
        "cfg": cfg,
        "store_root": store.root,
        "mixture_roots": mixture_roots,
        "stage": stage,
        "init_from": str(checkpoint_folder(init_from)) if init_from else None,
        "report_every": report_every,
        "run_name": name,
        "wandb_mode": wandb_mode,
        "wandb_dir": os.path.join(root, name, "wandb") if storage_urls.is_local(root) else None,
        "peak_flops": peak_flops,
        "fail_once": fail_once,
    }
    trainer = TorchTrainer(
        pretrain_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.scaling.use_gpu),
        run_config=ray.train.RunConfig(
            storage_path=root,
            name=name,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # every stable checkpoint is kept: each is a point an anneal may branch from
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        ),
    )
    return trainer.fit()


def _check_stage(cfg: PretrainConfig, stage: str, init_from) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: allowed {', '.join(STAGES)}")
    if (stage == "anneal") != (init_from is not None):
        raise ValueError("init_from (--from CKPT) is required for an anneal and only for one")
    if init_from is not None:
        folder = checkpoint_folder(init_from)
        ckpt.verify_checkpoint(folder)
        stable_step = json.loads((folder / ckpt.STATE_FILE).read_text())["step"]
        anneal_offset(cfg, stable_step)  # a step this spec cannot anneal from is refused here


def _storage_path(url: str) -> str:
    return str(storage_urls.local_path(url)) if storage_urls.is_local(url) else url


def checkpoints(storage: str, name: str) -> list[tuple[int, Path]]:
    """The (step, folder) of each checkpoint of a local run, oldest first: the `--from` choices."""
    run = storage_urls.local_path(storage) / name
    found = [
        (int(m.group(1)), p) for p in run.glob("step_*") if (m := CHECKPOINT_RE.fullmatch(p.name))
    ]
    return sorted(found)
