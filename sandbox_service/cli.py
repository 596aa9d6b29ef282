"""`sandbox`: the command line of the MiniCPM model sandbox.

sandbox model minicpm-2.4b [--json]          # shape, parameter counts, FLOPs/token
sandbox model --list                         # every preset
sandbox run search_spaces/smoke.yaml         # run or resume a study on local Ray
sandbox run FILE --address ray://head:10001 --storage s3://bucket/runs
sandbox status [--storage URL]               # every study and pipeline, and its state
sandbox pipeline search_spaces/pipelines/micro.yaml   # studies -> pretrain -> SFT/DPO -> int4
"""

from __future__ import annotations

import argparse
import json
import sys

from sandbox_service import storage


def cmd_model(args: argparse.Namespace) -> int:
    from trainables.shapes import PRESETS, describe, get_config

    if args.list or not args.name:
        for name in PRESETS:
            d = describe(PRESETS[name])
            print(
                f"{name:14s} d={d['d_model']:5d} L={d['n_layers']:3d} "
                f"N={d['non_embedding_params']:>14,d}"
            )
        print("micro-<width>  the CPU family, width 32..512 (e.g. micro-128)")
        return 0
    info = describe(get_config(args.name))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        shown = f"{value:.4g}" if isinstance(value, float) else shown
        print(f"{key:<{width}}  {shown}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sandbox_service.spec import load_spec
    from sandbox_service.study import run_study

    spec = load_spec(args.file, args.set)  # validated before anything starts
    print(f"study {spec.name}: {spec.question}")
    summary = run_study(
        spec,
        root=args.storage,
        address=args.address,
        wandb_mode=args.wandb_mode,
        num_cpus=args.num_cpus,
    )
    print(
        json.dumps(
            {k: summary[k] for k in ("status", "n_trials", "counts", "best", "wall_time_s")},
            indent=2,
        )
    )
    from trainables.tracking import resolve_mode

    mode = resolve_mode(args.wandb_mode or spec.tracking.wandb.mode)
    _report_after_run(storage.join(args.storage, spec.name), mode)
    return 0 if summary["status"] == "complete" else 1


def _report_after_run(url: str, wandb_mode: str) -> None:
    """Every finished study gets its report; a report that fails leaves the study intact."""
    from sandbox_service.report import write_report

    try:
        print(f"report: {write_report(url, wandb_mode=wandb_mode)}")
    except Exception as e:  # noqa: BLE001 - the study's results are already safe on disk
        print(
            f"report failed ({type(e).__name__}: {e}); retry with `sandbox report`", file=sys.stderr
        )


def cmd_report(args: argparse.Namespace) -> int:
    from sandbox_service.report import write_report
    from sandbox_service.spec import NAME

    if not NAME.match(args.study) or ".." in args.study:
        raise ValueError(f"study {args.study!r}: expected a study name (see `sandbox status`)")
    url = storage.join(args.storage, args.study)
    if storage.exists(storage.join(url, "pipeline.yaml")):
        from sandbox_service.pipeline import rewrite_report

        print(f"wrote {rewrite_report(url)}")
        return 0
    if not storage.exists(storage.join(url, "summary.json")):
        raise ValueError(f"{url}: no finished study there (see `sandbox status`)")
    path = write_report(url, wandb_mode=args.wandb_mode)
    print(f"wrote {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sandbox_service.pipeline import pipeline_states
    from sandbox_service.status import study_states

    if args.jobs:
        from sandbox_service.submit import format_jobs, list_jobs

        print(format_jobs(list_jobs(args.address)))
        return 0
    rows, pipelines = study_states(args.storage), pipeline_states(args.storage)
    if not rows and not pipelines:
        print(f"no studies or pipelines under {args.storage}")
        return 0
    if rows:
        print(f"{'study':24s} {'state':22s} {'trials':>6s}  best")
        for row in rows:
            print(f"{row['study']:24s} {row['state']:22s} {row['trials']:>6}  {row['best']}")
    for p in pipelines:
        print(f"\npipeline {p['pipeline']}")
        for st in p["stages"]:
            print(f"  {st['stage']:14s} {st['kind'] or '?':9s} {st['state']:12s} {st['output']}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from sandbox_service.pipeline import pipeline_url, run_pipeline
    from sandbox_service.pipeline_spec import load_pipeline

    spec = load_pipeline(args.file)  # every stage validated before anything starts
    print(
        f"pipeline {spec.name}: {len(spec.stages)} stages under {pipeline_url(spec, args.storage)}"
    )
    run_pipeline(
        spec,
        args.storage,
        address=args.address,
        wandb_mode=args.wandb_mode,
        num_cpus=args.num_cpus,
        verbose=args.verbose,
    )
    return 0


def cmd_coordcheck(args: argparse.Namespace) -> int:
    from trainables import coordcheck

    coordcheck.run(args)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from sandbox_service.pretrain import run_pretrain

    stage = "anneal" if args.command == "anneal" else "pretrain"
    result = run_pretrain(
        args.spec,
        args.storage,
        stage=stage,
        address=args.address,
        init_from=getattr(args, "init_from", None),
        tag=getattr(args, "tag", None),
        wandb_mode=args.wandb_mode,
    )
    print(f"{stage} finished: {result.metrics}")
    return 0


def _pretrain_parsers(sub) -> None:
    for name, text in (
        ("pretrain", "Ray Train pretrain (warmup + stable) from a pretrain spec"),
        ("anneal", "Ray Train anneal (WSD decay) from a stable checkpoint"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec", help="a pretrain spec YAML (see `sandbox transfer`)")
        _storage_arg(p)
        p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
        p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default="offline")
        if name == "anneal":
            p.add_argument(
                "--from",
                dest="init_from",
                required=True,
                help="stable checkpoint folder, e.g. <storage>/<name>/step_00001234",
            )
            p.add_argument("--tag", default=None, help="names this anneal's output folder")
        p.set_defaults(fn=cmd_pretrain)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sandbox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="shape, parameter counts and FLOPs of a preset")
    m.add_argument("name", nargs="?")
    m.add_argument("--json", action="store_true")
    m.add_argument("--list", action="store_true")
    m.set_defaults(fn=cmd_model)
    r = sub.add_parser("run", help="run or resume a study from a search-space file")
    r.add_argument("file")
    _storage_arg(r)
    r.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    r.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=None)
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key, e.g. --set data.sources=[corpus.txt] (repeatable)",
    )
    r.set_defaults(fn=cmd_run)
    pl = sub.add_parser("pipeline", help="run or resume a pipeline of studies and stages")
    pl.add_argument("file", help="a pipeline file, e.g. search_spaces/pipelines/micro.yaml")
    _storage_arg(pl)
    pl.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    pl.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default="offline")
    pl.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    pl.add_argument("--verbose", action="store_true", help="stream Ray workers' logs")
    pl.set_defaults(fn=cmd_pipeline)
    rep = sub.add_parser(
        "report", help="a study's Markdown + PNG report and analysis.json, or a pipeline's report"
    )
    rep.add_argument("study", help="the study's or pipeline's name (its folder under --storage)")
    _storage_arg(rep)
    rep.add_argument(
        "--wandb-mode",
        choices=["online", "offline", "disabled"],
        default="offline",
        help="also log the report to the study's W&B group (default: offline)",
    )
    rep.set_defaults(fn=cmd_report)
    s = sub.add_parser("status", help="list studies and their state")
    _storage_arg(s)
    s.add_argument("--jobs", action="store_true", help="list the cluster's Ray Jobs instead")
    s.add_argument("--address", default=None, help="Ray dashboard/Jobs address for --jobs")
    s.set_defaults(fn=cmd_status)
    from sandbox_service.plan import add_plan_parser
    from sandbox_service.transfer import add_transfer_parser

    add_transfer_parser(sub)
    add_plan_parser(sub)
    _pretrain_parsers(sub)
    from sandbox_service import cli_stages, submit

    submit.add_parser(sub)
    cli_stages.add_parsers(sub)
    c = sub.add_parser("coordcheck", help="μP coordinate check: activation scale vs width")
    from trainables.coordcheck import add_arguments

    add_arguments(c)
    c.set_defaults(fn=cmd_coordcheck)
    return p


def _storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        default=storage.DEFAULT_ROOT,
        help="storage root: a folder or fsspec URL (default: ./sandbox_runs)",
    )


def main(argv: list[str] | None = None) -> int:
    from sandbox_service.pipeline_spec import PipelineError
    from sandbox_service.spec import SpecError
    from sandbox_service.study import StudyError
    from trainables.checkpoint import CheckpointError
    from trainables.storage_errors import StorageError

    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (SpecError, StudyError, PipelineError, CheckpointError, StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
