"""One runner per pipeline stage kind: what it reads, what it writes, what it returns.

Every runner takes the stage, a `Context` (the pipeline folder, the stage's own folder, the
recorded outputs of its inputs) and returns `(outputs, metrics)`: outputs are the paths the next
stages read (`model` for a model folder, `checkpoint`, `spec`, `study`), metrics a flat summary.

- study: `sandbox run` of the search-space file, under the pipeline's folder (Ray Tune).
- transfer: `sandbox transfer` from the input studies to `<stage>/pretrain.yaml`.
- pretrain / anneal: Ray Train (`sandbox pretrain` / `sandbox anneal`); the anneal's last
  checkpoint becomes a model folder `<stage>/model`.
- sft / dpo / gptq: a Ray actor with the stage's resources runs trainables.sft / dpo / gptq.
- eval: trainables' held-out losses and tasks on every input model, as Ray tasks.
- export: the Hugging Face Llama folder of the input model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sandbox_service import storage
from trainables.dictconfig import ConfigError, from_dict


@dataclass(frozen=True)
class Context:
    root: str  # the pipeline's folder
    folder: str  # this stage's folder
    inputs: dict[str, dict]  # input stage name -> its recorded outputs
    address: str | None = None
    wandb_mode: str = "offline"

    def one_input(self) -> dict:
        (outputs,) = self.inputs.values()
        return outputs


# --- options: validated when the pipeline file is loaded ------------------------------------


@dataclass(frozen=True)
class StudyOptions:
    set: tuple[str, ...] = ()  # `sandbox run --set` overrides


@dataclass(frozen=True)
class RunOptions:
    """pretrain / anneal: overrides of the transferred spec, and the launcher's settings."""

    overrides: dict | None = None  # merged into the pretrain spec (e.g. {checkpoint_every: 50})
    num_workers: int | None = None
    max_failures: int = 2
    tag: str | None = None  # anneal: names its folder (default: the stable checkpoint's name)

    def __post_init__(self):
        if self.num_workers is not None and not 1 <= self.num_workers <= 100_000:
            raise ValueError(f"num_workers={self.num_workers}: must be in 1..100000")
        if not 0 <= self.max_failures <= 1000:
            raise ValueError(f"max_failures={self.max_failures}: must be in 0..1000")


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: allowed float32, bfloat16, float16")


def _transfer_options_cls():
    from sandbox_service.transfer import TransferOptions

    return TransferOptions


def _option_classes() -> dict[str, Any]:
    """kind -> callable that validates its options (imports stay lazy: Ray workers need few)."""
    return {
        "study": lambda o: from_dict(StudyOptions, o),
        "transfer": lambda o: _transfer_opts(o),
        "pretrain": lambda o: _run_opts(o, anneal=False),
        "anneal": lambda o: _run_opts(o, anneal=True),
        "sft": lambda o: from_dict(_cls("trainables.sft", "SFTConfig"), o),
        "dpo": lambda o: from_dict(_cls("trainables.dpo", "DPOConfig"), o),
        "gptq": lambda o: _gptq_opts(o),
        "eval": lambda o: from_dict(EvalOptions, o),
        "export": lambda o: from_dict(ExportOptions, o),
    }


def validate_options(kind: str, options: dict) -> Any:
    """The stage's typed options; raises ConfigError/ValueError naming the key."""
    if not isinstance(options, dict):
        raise ConfigError(f"expected a mapping, got {type(options).__name__}")
    return _option_classes()[kind](options)


def _cls(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def _run_opts(options: dict, anneal: bool) -> RunOptions:
    opts = from_dict(RunOptions, options)
    if opts.tag is not None and not anneal:
        raise ConfigError("tag: only an anneal stage has a tag")
    return opts


def _transfer_opts(options: dict):
    """TransferOptions plus `overrides` merged into the written spec."""
    options = dict(options)
    overrides = options.pop("overrides", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError("overrides: expected a mapping of pretrain spec keys")
    return from_dict(_transfer_options_cls(), options), overrides


@dataclass(frozen=True)
class GptqOptions:
    """Calibration and evaluation data of the GPTQ stage (the QuantConfig keys sit beside these).

    Calibration windows come from `calib`'s training split and perplexities from its held-out
    split: SFT-style conversations by default (facts §4: MiniCPM calibrates on SFT-style data),
    rendered with the chat template; `calib_format: text` reads a plain corpus instead."""

    n_calib: int = 64
    seq_len: int = 128
    seed: int = 0
    calib: str = "embedded:sft"  # JSONL of conversations, or a text corpus with calib_format text
    calib_format: str = "sft"
    max_chars: int | None = 2_000_000  # of calibration text read (None: all)

    def __post_init__(self):
        if not 1 <= self.n_calib <= 1_000_000 or not 8 <= self.seq_len <= 1 << 20:
            raise ValueError("n_calib must be in 1..1e6 and seq_len in 8..2^20")
        if self.calib_format not in ("sft", "text"):
            raise ValueError(f"calib_format={self.calib_format!r}: allowed sft, text")
        if self.max_chars is not None and self.max_chars < 1:
            raise ValueError(f"max_chars={self.max_chars}: must be >= 1")


def calibration_source(opts: GptqOptions) -> str:
    """A corpus path for run_gptq: SFT conversations are rendered to {"text"} JSON Lines once."""
    if opts.calib_format == "text":
        return opts.calib
    from trainables.data import default_cache_dir
    from trainables.mixture import render_sft

    return str(render_sft([opts.calib], default_cache_dir()))


def _gptq_opts(options: dict):
    quant_cls = _cls("trainables.gptq", "QuantConfig")
    own = {f.name for f in fields(GptqOptions)}
    mine = {k: v for k, v in options.items() if k in own}
    return from_dict(GptqOptions, mine), from_dict(
        quant_cls, {k: v for k, v in options.items() if k not in own}
    )


@dataclass(frozen=True)
class EvalOptions:
    tasks: tuple[str, ...] | None = None  # None: the default offline tasks
    heldout: tuple[str, ...] | None = None  # None: the default held-out sets
    shots: int = 0
    limit: int | None = None
    batch_size: int = 16

    def __post_init__(self):
        if not 0 <= self.shots <= 64 or not 1 <= self.batch_size <= 4096:
            raise ValueError("shots must be in 0..64 and batch_size in 1..4096")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: must be >= 1")


# --- runners -------------------------------------------------------------------------------


def run_stage(stage, ctx: Context) -> tuple[dict, dict]:
    """Run one stage to completion; returns (outputs, metrics)."""
    runner = {
        "study": _study,
        "transfer": _transfer,
        "pretrain": _pretrain,
        "anneal": _anneal,
        "sft": _actor_stage,
        "dpo": _actor_stage,
        "gptq": _actor_stage,
        "eval": _eval,
        "export": _export,
    }[stage.kind]
    return runner(stage, ctx)


def _study(stage, ctx: Context) -> tuple[dict, dict]:
    from sandbox_service.spec import load_spec
    from sandbox_service.study import run_study

    spec = load_spec(stage.spec, validate_options("study", stage.options).set)
    summary = run_study(spec, root=ctx.root, address=ctx.address, wandb_mode=ctx.wandb_mode)
    url = storage.join(ctx.root, spec.name)
    if summary["status"] != "complete":
        raise RuntimeError(f"study {spec.name} ended {summary['status']}: see {url}")
    from sandbox_service.report import write_report

    write_report(url, wandb_mode="disabled")
    best = summary.get("best") or {}
    return {"study": spec.name, "folder": url}, {
        "n_trials": summary["n_trials"],
        "best": {k: best.get(k) for k in ("val_loss", "config") if k in best},
    }


def _transfer(stage, ctx: Context) -> tuple[dict, dict]:
    from sandbox_service import transfer as tr

    opts, overrides = validate_options("transfer", stage.options)
    studies = [tr.load_study(ctx.root, out["study"]) for out in ctx.inputs.values()]
    spec, derivation = tr.transfer(studies, opts)
    spec = merge_spec(spec, overrides, f"stages.{stage.name}.options.overrides")
    out = storage.join(ctx.folder, "pretrain.yaml")
    storage.write_text(
        storage.join(ctx.folder, "derivation.txt"), "\n".join(derivation.lines) + "\n"
    )
    storage.write_text(out, tr.dump_spec(spec))
    return {"spec": out}, {
        "lr": spec.lr,
        "global_batch_tokens": spec.global_batch_tokens,
        "tokens": spec.tokens,
        "warnings": len(derivation.warnings),
    }


def merge_spec(spec, overrides: dict, where: str):
    """The PretrainConfig with `overrides` merged in (nested mappings merge key by key)."""
    from trainables.dictconfig import to_dict
    from trainables.pretrain_config import PretrainConfig

    if not overrides:
        return spec
    merged = _deep_merge(to_dict(spec), overrides)
    try:
        return from_dict(PretrainConfig, merged, where)
    except ConfigError as e:
        raise ConfigError(str(e)) from None


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _pretrain(stage, ctx: Context) -> tuple[dict, dict]:
    from sandbox_service.pretrain import checkpoints, load_spec, run_name, run_pretrain

    opts = validate_options("pretrain", stage.options)
    cfg = merge_spec(load_spec(ctx.one_input()["spec"]), opts.overrides or {}, stage.name)
    result = run_pretrain(
        cfg,
        ctx.folder,
        address=ctx.address,
        num_workers=opts.num_workers,
        max_failures=opts.max_failures,
        wandb_mode=ctx.wandb_mode,
    )
    step, folder = checkpoints(ctx.folder, run_name(cfg, "pretrain", None, None))[-1]
    spec_out = storage.join(ctx.folder, "pretrain.yaml")
    from sandbox_service.transfer import dump_spec

    storage.write_text(spec_out, dump_spec(cfg))
    return {"checkpoint": str(folder), "spec": spec_out}, _final(result.metrics, step)


def _anneal(stage, ctx: Context) -> tuple[dict, dict]:
    from sandbox_service.pretrain import load_spec, run_pretrain
    from trainables.artifact import from_checkpoint
    from trainables.data import prepare
    from trainables.pretrain import checkpoint_folder, pretrain_model_config

    opts = validate_options("anneal", stage.options)
    source = ctx.one_input()
    cfg = merge_spec(load_spec(source["spec"]), opts.overrides or {}, stage.name)
    result = run_pretrain(
        cfg,
        ctx.folder,
        stage="anneal",
        init_from=source["checkpoint"],
        tag=opts.tag,
        address=ctx.address,
        num_workers=opts.num_workers,
        max_failures=opts.max_failures,
        wandb_mode=ctx.wandb_mode,
    )
    final = checkpoint_folder(result.checkpoint.path)
    model = storage.join(ctx.folder, "model")
    metrics = _final(result.metrics, None)
    from_checkpoint(
        final,
        pretrain_model_config(cfg),
        prepare(cfg.data).meta["tokenizer"],
        model,
        stage="anneal",
        lineage={"stable_checkpoint": source["checkpoint"], "spec": source["spec"]},
        metrics=metrics,
    )
    return {"model": model, "checkpoint": str(final)}, metrics


def _final(metrics: dict, step: int | None) -> dict:
    keep = ("step", "tokens", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "mfu")
    out = {k: metrics[k] for k in keep if k in metrics}
    return out | ({"checkpoint_step": step} if step is not None else {})


def _actor_stage(stage, ctx: Context) -> tuple[dict, dict]:
    """SFT, DPO and GPTQ run in a Ray actor holding the stage's CPUs/GPUs on the cluster."""
    import ray

    out = storage.join(ctx.folder, "model")
    worker = ray.remote(StageWorker).options(
        num_cpus=stage.resources.cpu, num_gpus=stage.resources.gpu
    )
    actor = worker.remote()
    run_name = f"{storage.local_path(ctx.root).name}/{stage.name}"
    call = actor.run.remote(
        stage.kind, stage.options, ctx.one_input()["model"], out, run_name, ctx.wandb_mode
    )
    try:
        metrics = ray.get(call)
    finally:
        ray.kill(actor)
    detail = storage.join(ctx.folder, "metrics.json")
    storage.write_text(detail, json.dumps(metrics, indent=1, default=str) + "\n")
    return {"model": out, "metrics": detail}, summarise(stage.kind, metrics)


def summarise(kind: str, metrics: dict) -> dict:
    """The few numbers a stage is judged by (the full metrics stay in <stage>/metrics.json)."""
    if kind == "gptq":
        fp = metrics["fp"]["ppl"]
        out = {"ppl_fp": fp}
        for method in ("gptq", "rtn"):
            ppl = metrics[method]["ppl"]
            out |= {f"ppl_{method}": ppl, f"ppl_increase_{method}_pct": 100 * (ppl / fp - 1)}
            out[f"layer_error_mean_{method}"] = metrics[method]["layer_errors"]["mean"]
        return out | {"bytes_on_disk": metrics.get("bytes_on_disk")}
    keep = ("step", "train_loss", "val_loss", "val_loss_init", "tokens", "wall_s")
    keep += tuple(k for k in metrics if k.startswith("val_reward") or k.endswith("_logps"))
    return {k: metrics[k] for k in keep if k in metrics}


class StageWorker:
    """The body of a downstream stage's Ray actor: plain trainables calls, no Ray inside.

    Metrics go to a W&B run named `<pipeline>/<stage>` (offline by default, under the stage's
    folder), grouped by pipeline."""

    def run(self, kind: str, options: dict, init: str, out: str, run_name: str, mode: str):
        import torch

        from trainables.tracking import TrialTracker, WandbConfig

        _stay_local(out)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tracker = TrialTracker(
            WandbConfig(),
            mode=mode,
            group=run_name.split("/")[0],
            name=run_name,
            config={"kind": kind, "init": init, **options},
            directory=str(Path(out).parent / "wandb") if mode != "disabled" else None,
        )
        try:
            metrics = self._run(kind, options, init, out, lambda m, *_: tracker.log(m), device)
        except BaseException:
            tracker.finish(exit_code=1)
            raise
        tracker.finish()
        return metrics

    @staticmethod
    def _run(kind, options, init, out, report, device) -> dict:
        if kind == "sft":
            from trainables.sft import run_sft

            return run_sft(validate_options(kind, options), init, out, report=report)
        if kind == "dpo":
            from trainables.dpo import run_dpo

            return run_dpo(validate_options(kind, options), init, out, report=report, device=device)
        from trainables.gptq import run_gptq

        own, qcfg = validate_options("gptq", options)
        return run_gptq(
            init,
            out,
            cfg=qcfg,
            calib=calibration_source(own),
            n_calib=own.n_calib,
            seq_len=own.seq_len,
            seed=own.seed,
            max_chars=own.max_chars,
            device=device,
        )


def _stay_local(url: str) -> None:
    if not storage.is_local(url):
        raise ValueError(
            f"{url}: model stages write model folders to a local or shared file system path; "
            "use a mounted path (e.g. /mnt/shared/runs) as --storage for pipelines"
        )


def _eval(stage, ctx: Context) -> tuple[dict, dict]:
    from sandbox_service.evaluate import format_table, run_eval

    opts = validate_options("eval", stage.options)
    models = {name: out["model"] for name, out in ctx.inputs.items()}
    results = run_eval(
        list(models.values()),
        list(opts.tasks) if opts.tasks is not None else None,
        ctx.folder,
        heldout=list(opts.heldout) if opts.heldout is not None else None,
        shots=opts.shots,
        limit=opts.limit,
        address=ctx.address,
        batch_size=opts.batch_size,
        num_gpus=stage.resources.gpu,
        wandb_mode=ctx.wandb_mode,
    )
    table = format_table(results)
    storage.write_text(storage.join(ctx.folder, "table.md"), table + "\n")
    return {"results": storage.join(ctx.folder, "results.json"), "table": table}, {}


def _export(stage, ctx: Context) -> tuple[dict, dict]:
    from trainables.export_hf import export_llama

    opts = validate_options("export", stage.options)
    out = storage.join(ctx.folder, "hf")
    _stay_local(out)
    export_llama(ctx.one_input()["model"], out, dtype=opts.dtype)
    return {"hf": out}, {}
