"""Evaluate every stage's model the MiniCPM way, as Ray tasks spread over the cluster.

    run_eval(["runs/x/anneal/model", "runs/x/sft/model"], ["embedded:stdlib-mc"], "runs/x/eval")
    print(format_table(results))

The work is cut into units, one per (model, task) and per (model, held-out set), each one Ray
task (num_cpus=1). Tasks and held-out sets are read once on the driver and shipped to the
workers, so every model sees the very same items. A unit writes its result atomically as
`<results>/task-<name>.k<shots>.json` or `<results>/heldout-<name>.json`, where <results> is
`<out>/<model key>/`, or `<model_dir>.eval/` beside the model when out is None. A result whose
fingerprint (model weights, task content, shots, limit) still matches is not recomputed, so a
rerun after a failure does only what is missing, and a retrained model is evaluated anew.

Multiple choice is scored by option likelihood (sum and per byte) and by generation, and the
table reports the best of the three per model and task with the mode that gave it (MiniCPM,
arXiv 2404.06395 §4); held-out sets report bits per byte, averaged over sets.

Models are model folders (`trainables.artifact`) or GPTQ folders, loaded through
`trainables.quantized.load_quantized` when `trainables.quantized.is_quantized(path)`; both give
an object with `.model` (MiniCPM's forward) and `.tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox_service import storage
from sandbox_service.study import init_ray
from trainables import eval_data
from trainables.heldout import HeldoutSet, heldout_loss, load_heldout
from trainables.scoring import score_task
from trainables.tasks import Task, load_task

RESULT_VERSION = 1
MODE_TAGS = {"loglik": "ll", "loglik_norm": "norm", "generate": "gen"}


class EvalError(RuntimeError):
    """Evaluation cannot run or finish as asked; the message says what and how to go on."""


@dataclass(frozen=True)
class Unit:
    """One Ray task: a model scored on one task or one held-out set."""

    model_dir: str
    kind: str  # "task" | "heldout"
    name: str
    path: str  # the result file
    fingerprint: str
    model_fingerprint: str  # the weights the fingerprint was planned for


# --- models ---------------------------------------------------------------------------------


def load_model(model_dir: str, device: str = "cpu"):
    """A model folder or a GPTQ folder; either way an object with .model and .tokenizer."""
    from trainables import quantized
    from trainables.artifact import load_model_dir

    if quantized.is_quantized(model_dir):
        return quantized.load_quantized(model_dir, device=device)

    return load_model_dir(model_dir, device=device)


def model_fingerprint(model_dir: str) -> str:
    """The sealed manifest's hash; a folder without one is described by its files' sizes."""
    folder = Path(model_dir)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    if not folder.is_dir():
        raise EvalError(f"{model_dir}: no such model folder")
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def model_stage(model_dir: str) -> str:
    try:
        return str(json.loads((Path(model_dir) / "state.json").read_text()).get("stage", "?"))
    except (OSError, ValueError):
        return "?"


def results_dir(model_dir: str, out: str | None) -> str:
    """`<out>/<last two path parts>-<hash of the path>`, or `<model_dir>.eval` beside it."""
    if out is None:
        return model_dir.rstrip("/") + ".eval"
    parts = Path(model_dir).parts[-2:]
    digest = hashlib.sha256(model_dir.encode()).hexdigest()[:8]
    return storage.join(out, _slug("-".join(parts)) + f"-{digest}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "x"


# --- units ----------------------------------------------------------------------------------


def heldout_sha256(heldout: HeldoutSet) -> str:
    digest = hashlib.sha256(heldout.name.encode())
    for doc in heldout.documents:
        digest.update(len(doc).to_bytes(8, "little") + doc.encode("utf-8"))
    return digest.hexdigest()


def plan_units(
    model_dirs: list[str],
    tasks: list[Task],
    sets: list[HeldoutSet],
    out: str | None,
    shots: int,
    limit: int | None,
) -> list[tuple[Unit, Task | HeldoutSet]]:
    """Every (model, task) and (model, held-out set) with its result file and fingerprint."""
    task_fps = [t.sha256() for t in tasks]
    set_fps = [heldout_sha256(s) for s in sets]
    units = []
    for model_dir in model_dirs:
        base, model_fp = results_dir(model_dir, out), model_fingerprint(model_dir)
        for task, fp in zip(tasks, task_fps, strict=True):
            path = storage.join(base, f"task-{_slug(task.name)}.k{shots}.json")
            key = [RESULT_VERSION, model_fp, fp, shots, limit]
            unit = Unit(model_dir, "task", task.name, path, _hash(key), model_fp)
            units.append((unit, task))
        for heldout, fp in zip(sets, set_fps, strict=True):
            path = storage.join(base, f"heldout-{_slug(heldout.name)}.json")
            key = [RESULT_VERSION, model_fp, fp]
            unit = Unit(model_dir, "heldout", heldout.name, path, _hash(key), model_fp)
            units.append((unit, heldout))
    return units


def _hash(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def finished(unit: Unit) -> dict | None:
    """The stored result of a unit if it is complete and its fingerprint still matches."""
    if not storage.exists(unit.path):
        return None
    try:
        record = json.loads(storage.read_text(unit.path))
    except ValueError:
        return None  # unreadable: computed again
    return record if record.get("fingerprint") == unit.fingerprint else None


def evaluate_unit(
    unit: Unit,
    payload: Task | HeldoutSet,
    *,
    shots: int,
    limit: int | None,
    batch_size: int,
    threads: int | None = None,
    device: str = "cpu",
) -> dict:
    """Score one unit and write its result file; runs in a Ray task or in-process alike."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    loaded = load_model(unit.model_dir, device)
    if model_fingerprint(unit.model_dir) != unit.model_fingerprint:  # replaced since planning
        raise EvalError(
            f"{unit.model_dir} changed while being evaluated (new weights were saved there); "
            "rerun to evaluate the new weights"
        )
    if unit.kind == "task":
        result = score_task(
            loaded.model, loaded.tokenizer, payload, shots=shots, batch_size=batch_size, limit=limit
        )
    else:
        result = heldout_loss(loaded.model, loaded.tokenizer, payload, batch_size=batch_size)
    record = {
        "model": unit.model_dir,
        "kind": unit.kind,
        "name": unit.name,
        "fingerprint": unit.fingerprint,
        "shots": shots if unit.kind == "task" else None,
        "limit": limit if unit.kind == "task" else None,
        "result": result,
        "wall_s": round(time.perf_counter() - started, 3),
    }
    storage.write_text(unit.path, json.dumps(record, indent=2) + "\n")
    return record


# --- the run --------------------------------------------------------------------------------


def run_eval(
    model_dirs: list[str],
    tasks: list[str] | None = None,
    out: str | None = None,
    *,
    heldout: list[str] | None = None,
    shots: int = 0,
    limit: int | None = None,
    address: str | None = None,
    batch_size: int = 8,
    num_cpus: int | None = None,
    num_gpus: float = 0.0,
    wandb_mode: str = "disabled",
) -> dict:
    """Evaluate each model on each task and held-out set; returns `table(...)` of the results.

    tasks None means `eval_data.default_tasks()`, heldout None `eval_data.default_heldout()`;
    pass [] for none. Ray joins `address` (or RAY_ADDRESS) or starts a private local instance,
    unless the caller has initialised Ray already.
    """
    if not model_dirs:
        raise EvalError("no model folders given")
    _check_counts(shots=shots, limit=limit, batch_size=batch_size)
    dirs = [os.path.abspath(d) if storage.is_local(d) else d for d in model_dirs]
    task_objs, sets = _read_inputs(tasks, heldout)
    for task in task_objs:
        task.split(shots)  # too many shots for a task fails here, before any work starts
    units = plan_units(dirs, task_objs, sets, out, shots, limit)
    records = {u: finished(u) for u, _ in units}
    pending = [(u, p) for u, p in units if records[u] is None]
    print(f"eval: {len(units)} units ({len(units) - len(pending)} already done)")
    if pending:
        init_ray(address, num_cpus)
        records |= _run_remote(pending, shots, limit, batch_size, num_gpus)
    results = table(dirs, [records[u] for u, _ in units])
    if out is not None:
        storage.write_text(storage.join(out, "results.json"), json.dumps(results, indent=2) + "\n")
        storage.write_text(storage.join(out, "results.md"), format_table(results))
    if wandb_mode != "disabled":
        log_wandb(results, wandb_mode, out)
    return results


def _check_counts(*, shots: int, limit: int | None, batch_size: int) -> None:
    for name, value, least in (
        ("shots", shots, 0),
        ("limit", limit, 1),
        ("batch_size", batch_size, 1),
    ):
        if name == "limit" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r}: must be an integer >= {least}")


def _read_inputs(tasks, heldout) -> tuple[list[Task], list[HeldoutSet]]:
    tasks = eval_data.default_tasks() if tasks is None else list(tasks)
    heldout = eval_data.default_heldout() if heldout is None else list(heldout)
    if not tasks and not heldout:
        raise EvalError("nothing to evaluate: no tasks and no held-out sets")
    task_specs, heldout_specs = eval_data.resolve(tasks, heldout)
    task_objs = [load_task(s) for s in task_specs]
    sets = [load_heldout(s) for s in heldout_specs]
    for kind, names in (
        ("task", [t.name for t in task_objs]),
        ("held-out", [s.name for s in sets]),
    ):
        if len(set(names)) != len(names):
            raise EvalError(f"{kind} names must be unique, got {names}; rename with #name=")
    return task_objs, sets


def _run_remote(pending, shots, limit, batch_size, num_gpus) -> dict:
    """One Ray task per unit; failures are collected and raised after the others finish."""
    import ray

    remote = ray.remote(num_cpus=1, num_gpus=num_gpus)(evaluate_unit)
    device = "cuda" if num_gpus > 0 else "cpu"
    payloads = {id(p): p for _, p in pending}
    by_payload = {key: ray.put(p) for key, p in payloads.items()}  # one copy, shared by models
    futures = {
        remote.remote(
            u,
            by_payload[id(p)],
            shots=shots,
            limit=limit,
            batch_size=batch_size,
            threads=1,  # the task's one CPU
            device=device,
        ): u
        for u, p in pending
    }
    done, failed = {}, []
    waiting = list(futures)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        unit = futures[ready[0]]
        try:
            done[unit] = ray.get(ready[0])
        except Exception as err:  # reported below with the unit that failed
            failed.append(f"{unit.model_dir} x {unit.name}: {err}")
            continue
        print(f"eval [{len(done)}/{len(futures)}] {_describe(done[unit])}")
    if failed:
        raise EvalError(
            f"{len(failed)} of {len(futures)} units failed (finished ones are kept; rerun to "
            "resume):\n" + "\n".join(failed)
        )
    return done


def _describe(record: dict) -> str:
    r = record["result"]
    what = (
        f"best {r['best']:.3f} ({r['chosen_mode']})"
        if record["kind"] == "task"
        else f"{r['bits_per_byte']:.4f} bits/byte"
    )
    return f"{record['model']} x {record['name']}: {what} in {record['wall_s']:.1f}s"


# --- tables ---------------------------------------------------------------------------------


def table(model_dirs: list[str], records: list[dict]) -> dict:
    """{"tasks": {model: {task: scores}}, "heldout": {model: {"sets", "average"}}, "stages"}."""
    from trainables.heldout import average

    out: dict = {"tasks": {m: {} for m in model_dirs}, "heldout": {}, "stages": {}}
    sets: dict[str, dict] = {m: {} for m in model_dirs}
    for rec in records:
        target = out["tasks"] if rec["kind"] == "task" else sets
        target[rec["model"]][rec["name"]] = rec["result"]
    for m in model_dirs:
        out["stages"][m] = model_stage(m)
        if sets[m]:
            out["heldout"][m] = {"sets": sets[m], "average": average(sets[m])}
    return out


def format_table(results: dict) -> str:
    """Markdown: one row per model, one column per task (best accuracy, chosen mode) and set."""
    models = list(results["stages"])
    tasks = list(dict.fromkeys(t for m in models for t in results["tasks"].get(m, {})))
    sets = list(dict.fromkeys(s for h in results["heldout"].values() for s in h["sets"]))
    head = ["model", "stage", *tasks, *(f"{s} bpb" for s in sets)]
    if sets:
        head.append("mean bpb")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = short_labels(models)
    for m in models:
        row = [labels[m], results["stages"][m]]
        for t in tasks:
            r = results["tasks"][m].get(t)
            row.append(f"{r['best']:.3f} {MODE_TAGS[r['chosen_mode']]}" if r else "")
        held = results["heldout"].get(m, {"sets": {}})
        row += [
            f"{held['sets'][s]['bits_per_byte']:.4f}" if s in held["sets"] else "" for s in sets
        ]
        if sets:
            row.append(f"{held['average']['bits_per_byte']:.4f}" if held["sets"] else "")
        lines.append("| " + " | ".join(row) + " |")
    legend = ", ".join(f"{tag} = {mode}" for mode, tag in MODE_TAGS.items())
    lines.append(f"\nAccuracy of the best mode per model and task ({legend}); bpb = bits per byte.")
    return "\n".join(lines) + "\n"


def short_labels(models: list[str]) -> dict[str, str]:
    """Each model's path relative to the folder that holds them all ("sft/model")."""
    if len(models) < 2:
        return {m: Path(m).name or m for m in models}
    try:
        common = os.path.commonpath(models)
    except ValueError:  # mixed absolute and relative paths, or URLs
        return {m: m for m in models}
    return {m: os.path.relpath(m, common) for m in models}


def log_wandb(results: dict, mode: str, out: str | None) -> None:
    """One W&B run per model in group "eval", with every accuracy and bits-per-byte figure."""
    from trainables.tracking import TrialTracker, WandbConfig, resolve_mode

    directory = str(storage.local_path(out)) if out and storage.is_local(out) else None
    for m, stage in results["stages"].items():
        metrics = {}
        for task, r in results["tasks"][m].items():
            metrics |= {f"{task}/{k}": v for k, v in r.items() if isinstance(v, float)}
        for name, r in results["heldout"].get(m, {}).get("sets", {}).items():
            metrics[f"heldout/{name}/bits_per_byte"] = r["bits_per_byte"]
        tracker = TrialTracker(
            WandbConfig(mode=mode),
            mode=resolve_mode(mode),
            group="eval",
            name=f"{stage}:{Path(m).name}",
            config={"model_dir": m, "stage": stage},
            directory=directory,
        )
        tracker.log(metrics)
        tracker.finish()
