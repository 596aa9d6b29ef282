"""`sandbox sft|dpo|quantize|export|generate|eval`: one downstream stage at a time, by hand.

The pipeline runs the same functions as Ray actors; here they run in this process, with the
options a pipeline stage takes, from a YAML file and/or `--set key=value`:

    sandbox sft runs/anneal/model runs/sft --set steps=200 --set lr_start=1e-3
    sandbox dpo runs/sft runs/dpo --config dpo.yaml
    sandbox quantize runs/dpo runs/int4 --set group_size=32 --set desc_act=true
    sandbox export runs/dpo runs/dpo-hf --dtype bfloat16
    sandbox generate runs/int4 "def read_config(" --max-new-tokens 40
    sandbox eval runs/sft runs/dpo runs/int4 --out runs/eval
"""

from __future__ import annotations

import argparse
import json

from sandbox_service import yaml_safe

KIND_OF_COMMAND = {"sft": "sft", "dpo": "dpo", "quantize": "gptq"}


def stage_options(config: str | None, sets: list[str]) -> dict:
    """Options from a YAML mapping, then `key=value` overrides (values parsed as YAML)."""
    options = yaml_safe.load(config) if config else {}
    if not isinstance(options, dict):
        raise ValueError(f"{config}: expected a mapping of options")
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value")
        options[key.strip()] = yaml_safe.loads(value, f"--set {key}")
    return options


def cmd_train_stage(args: argparse.Namespace) -> int:
    from sandbox_service.stages import StageWorker, validate_options

    kind = KIND_OF_COMMAND[args.command]
    options = stage_options(args.config, args.set)
    validate_options(kind, options)  # errors name the key before anything loads
    metrics = StageWorker().run(
        kind, options, args.init, args.out, f"{args.command}/{args.command}", args.wandb_mode
    )
    print(json.dumps(metrics, indent=1, default=str))
    print(f"model: {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainables.export_hf import export_llama

    print(f"wrote {export_llama(args.model, args.out, dtype=args.dtype)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from trainables import generate

    generate.main(args.rest)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sandbox_service.evaluate import format_table, run_eval

    results = run_eval(
        args.models,
        args.tasks,
        args.out,
        heldout=args.heldout,
        shots=args.shots,
        limit=args.limit,
        address=args.address,
        batch_size=args.batch_size,
        wandb_mode=args.wandb_mode,
    )
    print(format_table(results))
    return 0


def add_parsers(sub) -> None:
    for name, text in (
        ("sft", "supervised fine-tuning of a model folder (responses only, packed, WSD)"),
        ("dpo", "DPO of a model folder against its frozen copy"),
        ("quantize", "GPTQ int4 of a model folder, compared with round-to-nearest"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("init", help="the model folder to start from")
        p.add_argument("out", help="the model folder to write (a rerun resumes or skips it)")
        p.add_argument("--config", help="a YAML mapping of the stage's options")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default="offline")
        p.set_defaults(fn=cmd_train_stage)
    e = sub.add_parser("export", help="a Hugging Face LlamaForCausalLM folder of a model folder")
    e.add_argument("model")
    e.add_argument("out")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    e.set_defaults(fn=cmd_export)
    g = sub.add_parser(
        "generate",
        help="sample from any stage's model folder, int4 included (see --help)",
        add_help=False,
    )
    g.add_argument("rest", nargs=argparse.REMAINDER)
    g.set_defaults(fn=cmd_generate)
    v = sub.add_parser("eval", help="held-out bits/byte and tasks (both scoring modes)")
    v.add_argument("models", nargs="+", help="model folders (any stage, int4 included)")
    v.add_argument("--tasks", nargs="*", default=None, help="task files/URLs (default: built-in)")
    v.add_argument("--heldout", nargs="*", default=None, help="held-out sets (default: built-in)")
    v.add_argument("--out", default=None, help="folder for results.json / results.md")
    v.add_argument("--shots", type=int, default=0)
    v.add_argument("--limit", type=int, default=None, help="items per task")
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    v.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default="disabled")
    v.set_defaults(fn=cmd_eval)
