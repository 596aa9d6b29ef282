"""Credentials in the environment never reach what a study or a pretrain writes.

A subprocess runs with fake secrets in its environment (a W&B key, AWS, Google, Azure and
Hugging Face credentials), with HOME, TMPDIR and Ray's temp dir inside the test's folder so
that everything it writes lands there: a smoke study (two trials, W&B offline, its report) and
a tiny pretrain on Ray Train (W&B offline). Every file written (configs, Tune and Train state,
results, summary.json, checkpoints' state.json, W&B offline runs, Ray's logs) and the process's
own output are then searched for each secret's value.

Ray's own logs are searched too: Ray Tune would copy the AWS variables from the driver into each
trial actor's runtime env, which Ray writes verbatim to `runtime_env_agent.log`; the study runs
its Tuner with them kept out (`sandbox_service.credentials`), so they are not there either.
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

from sandbox_service import credentials
from sandbox_service.credentials import LET_TUNE_COPY, TUNE_COPIED_CREDENTIALS, kept_from_trials

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
    assert leaks == {}, f"credentials found in written files: {leaks}"
    kept = [name for name in TUNE_COPIED_CREDENTIALS if name in SECRETS]
    assert f"note: {', '.join(kept)} are not copied into trials' runtime environments" in out
    with capsys.disabled():
        print(
            f"\nsecrets: {len(SECRETS)} values searched in {n_files} written files, Ray's logs "
            "included: none found"
        )


def _runtime_env_of_a_trial_actor() -> dict:
    """The runtime env Ray Tune gives a trainable's actor class (as Tune builds it in Ray 2.60)."""
    from ray.tune.execution.class_cache import _ActorClassCache

    class Trainable:
        pass

    return _ActorClassCache().get(Trainable)._default_options["runtime_env"]


def test_tune_starts_trials_without_the_drivers_aws_credentials(monkeypatch, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(LET_TUNE_COPY, raising=False)
    assert set(TUNE_COPIED_CREDENTIALS) & set(_runtime_env_of_a_trial_actor()["env_vars"])
    with kept_from_trials() as kept:
        env_vars = _runtime_env_of_a_trial_actor()["env_vars"]
    assert kept == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
    assert not set(env_vars) & set(SECRETS), env_vars
    assert env_vars, "Tune's other variables still travel"
    # Ray's list is restored afterwards, and an error inside the block restores it too.
    assert set(TUNE_COPIED_CREDENTIALS) <= _tune_list()
    with pytest.raises(KeyError), kept_from_trials():
        raise KeyError("inside")
    assert set(TUNE_COPIED_CREDENTIALS) <= _tune_list()
    err = capsys.readouterr().err
    assert "AWS_SESSION_TOKEN" in err and not any(v in err for v in SECRETS.values())


def _tune_list() -> set:
    from ray.tune.execution import class_cache

    return set(class_cache.ENV_VARS_TO_PROPAGATE)


def test_letting_tune_copy_them_warns_by_name_and_never_prints_them(monkeypatch, capsys):
    with kept_from_trials({"HF_TOKEN": "x", "WANDB_API_KEY": "y"}) as kept:
        assert kept == []
    assert capsys.readouterr().err == ""
    with kept_from_trials(SECRETS | {LET_TUNE_COPY: "1"}) as kept:
        assert kept == [] and set(TUNE_COPIED_CREDENTIALS) <= _tune_list()
    err = capsys.readouterr().err
    names = credentials.set_credentials(SECRETS)
    assert names == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
    assert err.startswith("warning:") and all(name in err for name in names)
    assert "runtime_env_agent.log" in err and not any(v in err for v in SECRETS.values())
