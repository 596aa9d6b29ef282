"""`sandbox submit`: a bad spec submits nothing; a good one becomes the right Ray Job."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from sandbox_service import submit

GOOD = """\
name: submitted
question: Does a submitted study validate here first?
model: {preset: micro-32}
data: {vocab_size: 512}
train: {tokens: 4096, batch_size: 4, seq_len: 32}
search:
  algorithm: grid
  space:
    train.lr: {grid: [0.003, 0.01]}
"""


class FakeClient:
    """Stands in for JobSubmissionClient: records every call, runs a job that logs twice."""

    instances: list[FakeClient] = []

    def __init__(self, address=None):
        self.address = address
        self.calls: list[tuple] = []
        self.polls = 0
        FakeClient.instances.append(self)

    def submit_job(self, **kwargs):
        self.calls.append(("submit_job", kwargs))
        return "raysubmit_fake123"

    def get_job_status(self, job_id):
        self.polls += 1
        return "RUNNING" if self.polls < 2 else "FAILED"

    def get_job_logs(self, job_id):
        return "first line\n" if self.polls < 2 else "first line\nsecond line\n"

    def get_job_info(self, job_id):
        return SimpleNamespace(driver_exit_code=3)

    def list_jobs(self):
        job = SimpleNamespace(
            submission_id="raysubmit_a",
            status=SimpleNamespace(value="SUCCEEDED"),
            entrypoint="python -m sandbox_service.cli status",
            start_time=2_000,
            end_time=5_000,
            message=None,
        )
        return [job, SimpleNamespace(**{**vars(job), "submission_id": "b", "start_time": 1_000})]


@pytest.fixture
def fake_client(monkeypatch):
    import ray.job_submission

    FakeClient.instances = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(submit, "POLL_S", 0.0)
    return FakeClient


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sandbox")
    submit.add_parser(p.add_subparsers(dest="command_name", required=True))
    return p.parse_args(argv)


def write_spec(folder, text=GOOD):
    (folder / "search_spaces").mkdir()
    (folder / "search_spaces" / "s.yaml").write_text(text)
    return "search_spaces/s.yaml"


def test_bad_spec_submits_nothing(fake_client, tmp_path, capsys):
    rel = write_spec(tmp_path, GOOD.replace("micro-32", "micro-3"))
    args = parse(["submit", "--working-dir", str(tmp_path), "--", "run", rel])
    assert submit.cmd_submit(args) == 2
    assert fake_client.instances == [], "no client may even be made for a bad spec"
    err = capsys.readouterr().err
    assert "s.yaml" in err and "nothing submitted" in err


def test_bad_override_submits_nothing(fake_client, tmp_path, capsys):
    rel = write_spec(tmp_path)
    argv = ["submit", "--working-dir", str(tmp_path), "--", "run", rel, "--set", "train.lr=-1"]
    assert submit.cmd_submit(parse(argv)) == 2
    assert fake_client.instances == []
    assert "lr=-1" in capsys.readouterr().err


def test_missing_file_and_empty_command_submit_nothing(fake_client, tmp_path):
    missing = ["submit", "--working-dir", str(tmp_path), "--", "run", "nope.yaml"]
    assert submit.cmd_submit(parse(missing)) == 2
    assert submit.cmd_submit(parse(["submit", "--"])) == 2
    assert fake_client.instances == []


def test_good_spec_becomes_the_job_without_printing_secrets(
    fake_client, tmp_path, monkeypatch, capsys
):
    secret = "wandb-key-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    rel = write_spec(tmp_path)
    command = ["run", rel, "--storage", "s3://bucket/runs", "--set", "train.lr=0.02"]
    argv = ["submit", "--address", "http://head:8265", "--no-wait", "--env", "WANDB_API_KEY"]
    argv += ["--working-dir", str(tmp_path), "--", *command]
    assert submit.cmd_submit(parse(argv)) == 0
    (client,) = fake_client.instances
    assert client.address == "http://head:8265"
    ((name, kwargs),) = client.calls
    assert name == "submit_job"
    assert shlex.split(kwargs["entrypoint"]) == ["python", "-m", "sandbox_service.cli", *command]
    env = kwargs["runtime_env"]
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"] == {"WANDB_API_KEY": secret}
    assert ".git" in env["excludes"] and "sandbox_runs" in env["excludes"]
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    assert "WANDB_API_KEY" in out.out and "raysubmit_fake123" in out.out
    assert "runtime_env_agent.log" in out.err, "passing a key warns where Ray logs it"
    assert client.polls == 0, "--no-wait returns without following the job"


def test_no_variable_travels_unless_named_and_a_named_one_must_be_set(
    fake_client, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-0123456789abcdef")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-0123456789")
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    assert submit.cmd_submit(parse(["submit", "--no-wait", "--", "status"])) == 0
    ((_, kwargs),) = fake_client.instances[0].calls
    assert kwargs["runtime_env"]["env_vars"] == {}
    assert "warning" not in capsys.readouterr().err
    argv = ["submit", "--no-wait", "--env", "WANDB_API_KEY", "--env", "NOT_SET_HERE", "--"]
    assert submit.cmd_submit(parse([*argv, "status"])) == 2
    assert len(fake_client.instances) == 1, "nothing submitted"
    err = capsys.readouterr().err
    assert "--env NOT_SET_HERE: not set in this shell" in err and "wandb-key" not in err


def test_no_key_no_env_vars_and_other_commands_pass_unvalidated(fake_client, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    args = parse(["submit", "--no-wait", "--python", "/opt/venv/bin/python", "--", "status"])
    assert submit.cmd_submit(args) == 0
    ((_, kwargs),) = fake_client.instances[0].calls
    assert kwargs["entrypoint"] == "/opt/venv/bin/python -m sandbox_service.cli status"
    assert kwargs["runtime_env"]["env_vars"] == {}


def test_waiting_streams_logs_once_and_returns_the_jobs_exit_code(fake_client, tmp_path, capsys):
    rel = write_spec(tmp_path)
    args = parse(["submit", "--working-dir", str(tmp_path), "--", "run", rel])
    assert submit.cmd_submit(args) == 3  # the driver's exit code of the failed job
    out = capsys.readouterr().out
    assert out.count("first line") == 1 and out.count("second line") == 1
    assert "FAILED" in out


@pytest.mark.parametrize(
    "status, code, expected",
    [("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", None, 1), ("STOPPED", None, 1)],
)
def test_exit_status(status, code, expected):
    assert submit.exit_status(status, code) == expected


def test_list_jobs_rows_oldest_first(fake_client):
    rows = submit.list_jobs("http://head:8265")
    assert [r["submission_id"] for r in rows] == ["b", "raysubmit_a"]
    assert rows[1]["status"] == "SUCCEEDED" and rows[1]["start_time_s"] == 2.0
    assert rows[1]["end_time_s"] == 5.0 and rows[1]["message"] == ""
    text = submit.format_jobs(rows)
    assert "raysubmit_a" in text and "SUCCEEDED" in text
    assert submit.format_jobs([]) == "no jobs"


def test_the_entrypoint_is_a_real_sandbox_command():
    """What the job runs parses with the real `sandbox` parser (the module it names exists)."""
    from sandbox_service import cli

    entry = shlex.split(submit.build_entrypoint(["status", "--storage", "/tmp/x"], sys.executable))
    assert entry[1:3] == ["-m", "sandbox_service.cli"]
    assert cli.parser().parse_args(entry[3:]).fn is cli.cmd_status


REPO = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).parent / "ray"


@pytest.fixture(scope="module")
def jobs_cluster():
    """A private one-node Ray with the Jobs API and token auth, made by cluster/local/'s scripts
    (which end only their own processes); yields the environment its clients need."""
    pytest.importorskip("aiohttp", reason="the Jobs API needs ray[default]")
    if not RAY_BIN.exists():
        pytest.skip(f"no ray CLI at {RAY_BIN}")
    state = tempfile.mkdtemp(prefix="sbj-")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_BIN": str(RAY_BIN), "PYTHON_BIN": sys.executable}
    start = [str(REPO / "cluster/local/start_local_cluster.sh"), "--workers", "0"]
    try:
        subprocess.run([*start, "--state-dir", state], env=env, check=True, timeout=120)
        exported = subprocess.run(
            ["bash", "-c", f"source {shlex.quote(state)}/env.sh && env -0"],
            env=env,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout.decode()
        yield dict(item.split("=", 1) for item in exported.split("\0") if "=" in item)
    finally:
        stop = REPO / "cluster/local/stop_local_cluster.sh"
        subprocess.run([str(stop), state], env=env, timeout=120)


def submit_for_real(env: dict, command: list[str]) -> subprocess.CompletedProcess:
    """`sandbox submit` in a fresh interpreter, so that it reads only this cluster's token."""
    script = (
        "import argparse, sys\n"
        "from sandbox_service import submit\n"
        "p = argparse.ArgumentParser()\n"
        "submit.add_parser(p.add_subparsers())\n"
        "sys.exit(submit.cmd_submit(p.parse_args(sys.argv[1:])))\n"
    )
    argv = ["submit", "--address", env["RAY_API_SERVER_ADDRESS"], "--python", sys.executable]
    return subprocess.run(
        [sys.executable, "-c", script, *argv, "--working-dir", str(REPO), "--", *command],
        env=env | {"WANDB_API_KEY": "wandb-secret-4242"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.ray
@pytest.mark.slow
def test_real_jobs_run_stream_logs_and_return_their_exit_status(jobs_cluster, tmp_path):
    ok = submit_for_real(jobs_cluster, ["model", "micro-32"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "non_embedding_params         23,712" in ok.stdout  # the job's own output, streamed
    assert "SUCCEEDED" in ok.stdout and "wandb-secret-4242" not in ok.stdout + ok.stderr
    failed = submit_for_real(jobs_cluster, ["report", "nope", "--storage", str(tmp_path)])
    assert failed.returncode == 2, failed.stdout + failed.stderr  # `sandbox report`'s own code
    assert "no finished study there" in failed.stdout and "FAILED" in failed.stdout
    ids = [
        line.split()[1]
        for line in (ok.stdout + failed.stdout).splitlines()
        if line.startswith("job:")
    ]
    listed = subprocess.run(
        [
            sys.executable,
            "-c",
            "from sandbox_service.submit import list_jobs; import json, sys;"
            "print(json.dumps(list_jobs(sys.argv[1])))",
            jobs_cluster["RAY_API_SERVER_ADDRESS"],
        ],
        env=jobs_cluster,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {r["submission_id"]: r["status"] for r in json.loads(listed.stdout)}
    assert rows == {ids[0]: "SUCCEEDED", ids[1]: "FAILED"}
