"""`sandbox submit`: run a `sandbox` command on a Ray cluster as a Ray Job.

    sandbox submit [--address http://HEAD:8265] [--no-wait] [--working-dir .] \\
        -- run search_spaces/lr_micro.yaml --storage s3://bucket/runs

The command after `--` runs on the cluster as `python -m sandbox_service.cli <command>`, in a
copy of the working directory uploaded with the job. A `run` command's spec is validated here
first, with the same `--set` overrides, so a bad file fails in a second and submits nothing.
Without `--no-wait` the job's logs stream here and the exit status is the job's; with it, the
job id is printed and the command returns at once.

No variable of this shell travels with the job unless named with `--env NAME`: Ray writes a job's
runtime environment, values included, to `runtime_env_agent.log` on the node that runs it, so a
key passed that way sits in that node's logs. Give the cluster its keys as Secrets instead
(`WANDB_API_KEY` from a Kubernetes Secret in the KubeRay manifests; see docs/cluster.md).

Clusters with token authentication (the default since Ray 2.59) need `RAY_AUTH_MODE=token` in
this shell and the cluster's token in `RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`,
or `~/.ray/auth_token` (see docs/cluster.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from sandbox_service.spec import SpecError, load_spec

# Never uploaded with the working directory: local studies, caches and the repository's history.
UPLOAD_EXCLUDES = [".git", "sandbox_runs", ".venv", "venv", "__pycache__", "*.egg-info"]
POLL_S = 1.0


def add_parser(subparsers) -> None:
    """Add `submit` to the `sandbox` command's subparsers."""
    p = subparsers.add_parser(
        "submit",
        help="run a sandbox command on a Ray cluster as a Ray Job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's Jobs API, e.g. http://127.0.0.1:8265 "
        "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)",
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--working-dir", default=".", help="folder uploaded with the job (default: .)")
    p.add_argument(
        "--python",
        default="python",
        help="the interpreter on the cluster (jobs run with the head node's PATH)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this shell's variable NAME to the job (repeatable; Ray logs its value on the "
        "node that runs the job: prefer a Secret on the cluster)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then a sandbox command")
    p.set_defaults(fn=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print(
            "error: nothing to submit; give a command after --, e.g. -- run FILE", file=sys.stderr
        )
        return 2
    try:
        validate(command, args.working_dir)
        runtime_env = build_runtime_env(args.working_dir, os.environ, args.env)
    except SpecError as e:
        print(f"error: {e} (nothing submitted)", file=sys.stderr)
        return 2
    if runtime_env["env_vars"]:
        print(
            f"warning: {', '.join(sorted(runtime_env['env_vars']))} passed in the job's runtime "
            "environment: Ray writes it, values included, to runtime_env_agent.log on the node "
            "that runs the job",
            file=sys.stderr,
        )
    entrypoint = build_entrypoint(command, args.python)
    client = _client(args.address)
    print(f"submitting: {entrypoint}")
    print(f"runtime_env: {describe_runtime_env(runtime_env)}")
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"job: {job_id}")
    if args.no_wait:
        return 0
    return follow(client, job_id)


def validate(command: list[str], working_dir: str) -> None:
    """Load a `run` command's spec here (with its `--set` overrides); raises SpecError."""
    if command[0] != "run":
        return
    p = argparse.ArgumentParser(prog="sandbox run", add_help=False)
    p.add_argument("file")
    p.add_argument("--set", action="append", default=[])
    known, _ = p.parse_known_args(command[1:])
    # The job runs in the uploaded copy of the working directory, so the path is relative to it.
    path = Path(known.file)
    if not path.is_absolute():
        path = Path(working_dir) / path
    load_spec(path, known.set)


def build_entrypoint(command: list[str], python: str = "python") -> str:
    return shlex.join([python, "-m", "sandbox_service.cli", *command])


def build_runtime_env(working_dir: str, environ, names=()) -> dict:
    """The job's runtime env: the working directory, and the variables `names` from `environ`
    (SpecError for a name that is not set there, so that a typo does not run a job without it)."""
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise SpecError(f"--env {', '.join(missing)}: not set in this shell")
    env_vars = {name: environ[name] for name in names}
    return {"working_dir": working_dir, "excludes": list(UPLOAD_EXCLUDES), "env_vars": env_vars}


def describe_runtime_env(runtime_env: dict) -> str:
    """The runtime environment as printed: environment variables by name only."""
    names = ", ".join(sorted(runtime_env.get("env_vars", {}))) or "none"
    return f"working_dir={runtime_env['working_dir']}, env_vars: {names}"


def follow(client, job_id: str, poll_s: float = POLL_S) -> int:
    """Print the job's logs as they grow until it ends; its exit status (0 when it succeeded)."""
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            print(logs[shown:], end="", flush=True)
            shown = len(logs)
        if _is_terminal(status):
            break
        time.sleep(poll_s)
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {_name(status)}")
    return exit_status(_name(status), getattr(info, "driver_exit_code", None))


def exit_status(status: str, driver_exit_code: int | None) -> int:
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and driver_exit_code:
        return driver_exit_code
    return 1


def list_jobs(address: str | None) -> list[dict]:
    """Every job the cluster knows, oldest first: id, status, entrypoint, start and end (s)."""
    rows = []
    for job in _client(address).list_jobs():
        rows.append(
            {
                "submission_id": job.submission_id,
                "status": _name(job.status),
                "entrypoint": job.entrypoint,
                "start_time_s": job.start_time / 1000 if job.start_time else None,
                "end_time_s": job.end_time / 1000 if job.end_time else None,
                "message": job.message or "",
            }
        )
    return sorted(rows, key=lambda row: row["start_time_s"] or 0.0)


def format_jobs(rows: list[dict]) -> str:
    if not rows:
        return "no jobs"
    lines = [f"{'job':32s} {'status':10s} entrypoint"]
    lines += [f"{r['submission_id'] or '-':32s} {r['status']:10s} {r['entrypoint']}" for r in rows]
    return "\n".join(lines)


def _client(address: str | None):
    from ray import job_submission

    return job_submission.JobSubmissionClient(address)


def _name(status) -> str:
    return getattr(status, "value", str(status))


def _is_terminal(status) -> bool:
    return _name(status) in ("SUCCEEDED", "FAILED", "STOPPED")
