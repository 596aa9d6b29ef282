"""Credentials in the environment never reach what a study or a pretrain writes.

A subprocess runs with fake secrets in its environment (a W&B key, AWS, Google, Azure and
Hugging Face credentials), with HOME, TMPDIR and Ray's temp dir inside the test's folder so
that everything it writes lands there: a smoke study (two trials, W&B offline, its report) and
a tiny pretrain on Ray Train (W&B offline). Every file written (configs, Tune and Train state,
results, summary.json, checkpoints' state.json, W&B offline runs, Ray's logs) and the process's
own output are then searched for each secret's value.

One exposure is Ray's, not ours, and is pinned here so that it cannot grow unnoticed: Ray Tune
copies the AWS variables (only those) from the driver into each trial actor's runtime env, and
Ray writes runtime envs verbatim to `runtime_env_agent.log` in its session logs. The driver warns
about it by name (study.warn_copied_credentials) and docs/cluster.md says what to do instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sandbox_service.study import TUNE_COPIED_CREDENTIALS, warn_copied_credentials

REPO = Path(__file__).resolve().parents[1]
SECRETS = {  # the names cloud SDKs and W&B read; each value unique and easy to find
    "WANDB_API_KEY": "f" * 8 + "c0ffee" * 5 + "ab",  # 40 characters, the shape W&B expects
    "AWS_ACCESS_KEY_ID": "AKIAFAKESECRETID0001",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-access-key-aaaaaaaaaaaaaaaa",
    "AWS_SESSION_TOKEN": "fake-aws-session-token-bbbbbbbbbbbbbbbbbbbb",
    "GOOGLE_API_KEY": "fake-google-api-key-cccccccccccccccccccc",
    "AZURE_STORAGE_KEY": "fake-azure-storage-key-dddddddddddddddddd",
    "HF_TOKEN": "hf_fakehuggingfacetokeneeeeeeeeeeeeeeee",
}

SCRIPT = r"""
import json, sys
from pathlib import Path
import ray

args = json.loads(sys.argv[1])
ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=args["ray_tmp"])
from sandbox_service.pretrain import run_pretrain
from sandbox_service.report import write_report
from sandbox_service.spec import parse_spec
from sandbox_service.study import run_study
from trainables.data import DataConfig
from trainables.pretrain_config import PretrainConfig

summary = run_study(parse_spec(args["spec"], "secrets.yaml"), root=args["storage"],
                    wandb_mode="offline", verbose=0)
print("report:", write_report(str(Path(args["storage"]) / args["spec"]["name"]),
                              wandb_mode="offline"))
cfg = PretrainConfig(name="secret-pretrain", model={"preset": "micro-32"},
                     data=DataConfig(**args["spec"]["data"]), lr=0.02, global_batch_tokens=256,
                     seq_len=32, tokens=8 * 256, warmup_steps=1, checkpoint_every=4,
                     eval_every=8, eval_tokens=256)
result = run_pretrain(cfg, args["storage"], num_workers=1, report_every=4, wandb_mode="offline")
print("RESULT " + json.dumps({"study": summary["status"], "pretrain": result.error is None}))
ray.shutdown()
"""

SPEC = {
    "name": "secrets-smoke",
    "question": "Do credentials stay out of what a study writes?",
    "model": {"preset": "micro-32"},
    "data": {"vocab_size": 512, "max_chars": 300_000},
    "train": {
        "tokens": 8 * 4 * 32,
        "batch_size": 4,
        "seq_len": 32,
        "eval_every": 4,
        "eval_tokens": 256,
        "precision": "fp32",
    },
    "search": {"algorithm": "grid", "space": {"train.lr": {"grid": [0.01, 0.02]}}},
    "resources": {"cpu": 1},
    "tracking": {"wandb": {"project": "secrets-test", "mode": "offline"}},
}


def files_holding(root: Path, secrets: dict[str, str]) -> dict[str, list[str]]:
    """secret name -> the files under `root` whose bytes contain its value."""
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            for name, value in secrets.items():
                if value.encode() in data:
                    found.setdefault(name, []).append(str(path.relative_to(root)))
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_no_credential_reaches_any_written_file(tmp_path, capsys):
    home, storage, scratch = tmp_path / "home", tmp_path / "runs", tmp_path / "tmp"
    for folder in (home, storage, scratch):
        folder.mkdir()
    # Ray's sockets live under its temp dir, whose path must stay short (AF_UNIX: 107 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="sec-", dir="/tmp"))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_MODE")},
        **SECRETS,
        "HOME": str(home),
        "TMPDIR": str(scratch),
        "SANDBOX_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "WANDB_SILENT": "true",
    }
    corpus = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    spec = json.loads(json.dumps(SPEC))
    if corpus.exists():  # else the embedded corpus
        spec["data"]["sources"] = [str(corpus)]
    args = {"storage": str(storage), "ray_tmp": str(ray_tmp), "spec": spec}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(args)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: its Ray is ours to end
    )
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    try:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, f"the run failed ({proc.returncode}):\n{out[-4000:]}"
        assert json.loads(lines[-1][len("RESULT ") :]) == {"study": "complete", "pretrain": True}
        wandb_runs = list(storage.rglob("offline-run-*"))
        assert len(wandb_runs) >= 4, "two trials, the report and the pretrain log offline"
        leaks = {}
        for root in (tmp_path, ray_tmp):
            for name, paths in files_holding(root, SECRETS).items():
                leaks.setdefault(name, []).extend(paths)
        leaks |= {f"{name} (output)": ["stdout"] for name, v in SECRETS.items() if v in out}
        n_files = sum(1 for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    ray_runtime_env_log = {
        name: paths
        for name, paths in leaks.items()
        if name in TUNE_COPIED_CREDENTIALS
        and all(Path(p).name == "runtime_env_agent.log" for p in paths)
    }
    others = {k: v for k, v in leaks.items() if k not in ray_runtime_env_log}
    assert others == {}, f"credentials found in written files: {others}"
    copied = [name for name in TUNE_COPIED_CREDENTIALS if name in SECRETS]
    assert f"warning: {', '.join(copied)} set here" in out
    with capsys.disabled():
        print(
            f"\nsecrets: {len(SECRETS)} values searched in {n_files} written files: none in "
            f"ours; Ray's runtime_env_agent.log holds {sorted(ray_runtime_env_log)}"
        )


def test_the_warning_names_credentials_and_never_prints_them(capsys):
    assert warn_copied_credentials({"HF_TOKEN": "x", "WANDB_API_KEY": "y"}) == []
    assert capsys.readouterr().err == ""
    names = warn_copied_credentials(SECRETS)
    err = capsys.readouterr().err
    assert names == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
    assert all(name in err for name in names) and "runtime_env_agent.log" in err
    assert not any(value in err for value in SECRETS.values())
