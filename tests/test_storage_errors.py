"""A full disk or unwritable storage fails with a clear message and no complete-looking output.

Two ways to make storage refuse a write, because the tests may run as root, where `chmod` stops
nothing:
- in this process, a write that raises the kernel's error (os.fsync / a split writer patched to
  raise ENOSPC), and a storage root below a regular file (ENOTDIR, even for root);
- in a subprocess with its own user and mount namespace (`unshare -Urm`, no privileges needed
  where unprivileged user namespaces are allowed), a 256 KiB tmpfs that really fills up and a
  read-only tmpfs that refuses even root. Skipped, with the reason, where unshare is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sandbox_service import cli, results, storage, study
from sandbox_service.spec import parse_spec
from trainables import checkpoint as ckpt
from trainables import tokens
from trainables.storage_errors import StorageError, check_writable
from trainables.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SPEC = {
    "name": "disk-full",
    "question": "Does a full disk leave a summary?",
    "model": {"preset": "micro-32"},
    "data": {"vocab_size": 512, "max_chars": 300_000},
    "train": {"tokens": 4096, "batch_size": 2, "seq_len": 16},
    "search": {"algorithm": "grid", "space": {"train.lr": {"grid": [0.01, 0.02]}}},
    "tracking": {"wandb": {"mode": "disabled"}},
}


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- in this process ----------------------------------------------------------------------------


def test_full_disk_keeps_the_previous_file_and_names_path_and_bytes(tmp_path, monkeypatch):
    target = tmp_path / "study" / "trials.csv"
    storage.write_text(str(target), "old\n")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StorageError) as info:
        storage.write_text(str(target), "x" * 5000)
    message = str(info.value)
    assert str(target) in message and "no space left on device" in message
    assert "needs about 5,000 bytes" in message and "bytes free there" in message
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n" and hidden_leftovers(target.parent) == []


def test_results_that_cannot_be_written_leave_no_summary(tmp_path, monkeypatch):
    spec = parse_spec(SPEC, "disk.yaml")
    url = str(tmp_path / spec.name)
    storage.write_text(storage.join(url, "summary.json"), '{"status": "complete"}\n')  # last run
    trials = pd.DataFrame(
        [{"trial_id": "a", "status": "completed", "val_loss": 3.0, "config/train/lr": 0.01}]
    )
    monkeypatch.setattr(results, "tables", lambda grids, spec: (trials, trials))
    real_replace = os.replace

    def history_fills_the_disk(src, dst):
        if str(dst).endswith("history.csv"):
            no_space()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", history_fills_the_disk)
    with pytest.raises(StorageError, match="history.csv: no space left"):
        results.write([], spec, url, wall_time_s=1.0)
    assert results.read_summary(url) is None, "a partial result must not look complete"
    assert hidden_leftovers(Path(url)) == []
    monkeypatch.setattr(os, "replace", real_replace)
    assert results.write([], spec, url, wall_time_s=1.0)["best"]["trial_id"] == "a"


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    dest = ckpt.save_checkpoint(tmp_path / "ck", model, opt, {"step": 1})
    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(StorageError) as info:
        ckpt.save_checkpoint(dest, model, opt, {"step": 2})
    # fp32 weights, two Adam moments, and Adam's fp32 step counter for each of the 2 tensors
    weights_and_adam = 3 * (64 * 64 + 64) * 4 + 2 * 4
    assert f"{dest}: no space left" in str(info.value)
    assert f"needs about {weights_and_adam:,} bytes" in str(info.value)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(dest, model, opt) == {"step": 1}
    assert hidden_leftovers(tmp_path) == []


def test_model_folder_on_a_full_disk_is_not_written(small_store, tmp_path, monkeypatch):
    from trainables.artifact import save_model_dir
    from trainables.model import MiniCPM
    from trainables.shapes import get_config

    model = MiniCPM(get_config("micro-32", vocab_size=small_store.meta["vocab_size"]))
    tok = Tokenizer.from_file(small_store.meta["tokenizer"])
    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(StorageError, match=r"model: no space left .* \(needs about [\d,]+ bytes"):
        save_model_dir(tmp_path / "model", model, tok, stage="pretrain")
    assert list(tmp_path.iterdir()) == []  # no folder, so no manifest.json to trust


def test_token_store_on_a_full_disk_is_not_published(small_store, tmp_path, monkeypatch):
    tok = Tokenizer.from_file(small_store.meta["tokenizer"])

    def fills_up(docs, tok, path, dtype, split):
        path.write_bytes(b"\0" * 1000)  # the part written before the disk filled
        no_space()

    monkeypatch.setattr(tokens, "_write_split", fills_up)
    root = tmp_path / "store"
    with pytest.raises(StorageError, match=r"store: no space left .*more than 1,000 bytes"):
        tokens.build_token_store(["a b c"], ["d e"], tok, root)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_root_is_refused_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for bad in (blocker, blocker / "runs"):
        with pytest.raises(StorageError, match=f"{bad}: .*not"):
            check_writable(bad)
    assert check_writable(tmp_path / "new" / "runs").is_dir()
    assert list((tmp_path / "new" / "runs").iterdir()) == []  # the probe is gone


def test_study_on_unwritable_storage_stops_before_ray(tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started although the storage root is unwritable")

    monkeypatch.setattr(study, "init_ray", no_ray)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps(SPEC))
    status = cli.main(["run", str(spec_path), "--storage", str(blocker / "runs")])
    err = capsys.readouterr().err
    assert status == 2
    assert "cannot start" in err and str(blocker / "runs") in err and "not writable" in err


# --- real kernel errors in a private mount namespace --------------------------------------------

SCENARIOS = r"""
import errno, json, sys
from pathlib import Path
import torch
from sandbox_service import storage, study
from sandbox_service.spec import parse_spec
from trainables import checkpoint as ckpt
from trainables.storage_errors import StorageError
from trainables.tokenizer import Tokenizer
from trainables.tokens import build_token_store

args = json.loads(sys.argv[1])
full, ro = Path(args["full"]), Path(args["ro"])
out = {}

def attempt(name, fn):
    try:
        fn()
        out[name] = {"raised": None}
    except Exception as e:
        out[name] = {"raised": type(e).__name__, "errno": getattr(e, "errno", None),
                     "message": str(e)}

big = torch.nn.Linear(512, 512)  # 1 MiB of weights for a 256 KiB disk
attempt("checkpoint", lambda: ckpt.save_checkpoint(full / "ck", big, None, {"step": 1}))
tok = Tokenizer.from_file(args["tokenizer"])
docs = [Path(args["text"]).read_text()[:600_000]]
attempt("token_store", lambda: build_token_store(docs, docs[:1], tok, full / "store"))
attempt("summary", lambda: storage.write_text(str(full / "summary.json"), "x" * 400_000))
attempt("readonly_probe", lambda: storage.check_writable(str(ro / "runs")))
attempt("readonly_write", lambda: storage.write_text(str(ro / "summary.json"), "{}"))
study.init_ray = lambda *a, **k: sys.exit("Ray started on read-only storage")
spec = parse_spec(args["spec"], "ro.yaml")
attempt("readonly_study", lambda: study.run_study(spec, root=str(ro)))
out["left_on_full_disk"] = sorted(p.name for p in full.iterdir())
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def kernel_refusals(small_store, tmp_path_factory):
    """Run SCENARIOS on a real 256 KiB tmpfs and a read-only tmpfs; its JSON result."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        pytest.skip("needs Linux unshare(1) for a private tmpfs")
    base = tmp_path_factory.mktemp("mounts")
    (base / "full").mkdir()
    (base / "ro").mkdir()
    corpus = base / "corpus.txt"  # ~600 KB of text: more tokens than the 256 KiB disk holds
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 14_000)
    args = {
        "full": str(base / "full"),
        "ro": str(base / "ro"),
        "tokenizer": small_store.meta["tokenizer"],
        "text": str(corpus),
        "spec": SPEC,
    }
    mounts = (
        f"mount -t tmpfs -o size=256k tmpfs {base / 'full'} && "
        f"mount -t tmpfs -o ro tmpfs {base / 'ro'} && "
        f'exec "{sys.executable}" -c "$0" "$1"'
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -Urm is not permitted here: {probe.stderr.strip()}")
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", mounts, SCENARIOS, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("what", ["checkpoint", "token_store", "summary"])
def test_a_really_full_disk_is_reported_and_nothing_published(kernel_refusals, what):
    got = kernel_refusals[what]
    assert got["raised"] == "StorageError" and got["errno"] == errno.ENOSPC, got
    assert "no space left on device" in got["message"] and "bytes free there" in got["message"]
    assert kernel_refusals["left_on_full_disk"] == [], "partial output left on the full disk"


def test_a_read_only_mount_is_refused_even_for_root(kernel_refusals):
    for what in ("readonly_probe", "readonly_write"):
        got = kernel_refusals[what]
        assert got["raised"] == "StorageError" and got["errno"] == errno.EROFS, got
        assert "not writable (Read-only file system" in got["message"]
    got = kernel_refusals["readonly_study"]
    assert got["raised"] == "StudyError" and "cannot start" in got["message"], got


def test_an_unwritable_token_cache_is_named_and_the_study_stops_before_ray(
    tmp_path, monkeypatch, capsys
):
    from trainables import data

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = data.DataConfig(vocab_size=512, max_chars=20_000)
    with pytest.raises(StorageError, match=f"token cache {blocker / 'cache'}: .*not writable"):
        data.prepare(cfg, cache_dir=blocker / "cache")
    # An unreadable source is not the cache's fault, even when its error is an OSError.
    (tmp_path / "a-dir.txt").mkdir()
    source = data.DataConfig(sources=[str(tmp_path / "a-dir.txt")], vocab_size=512)
    with pytest.raises(Exception, match="is a folder") as raised:
        data.prepare(source, cache_dir=tmp_path / "cache")
    assert not isinstance(raised.value, StorageError)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started although the token cache is unwritable")

    monkeypatch.setattr(study, "init_ray", no_ray)
    monkeypatch.setenv("SANDBOX_CACHE", str(blocker / "cache"))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(json.dumps(SPEC))
    assert cli.main(["run", str(spec_path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "cannot start" in err and "token cache" in err and "SANDBOX_CACHE moves it" in err
