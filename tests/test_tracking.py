"""W&B per trial: a process keeps one W&B service for all its runs, every run's history reaches
its file, and the process exits quietly even when its service dies first (as Ray kills an
actor's child processes while the actor exits)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainables import wandb_file

SCRIPT = r"""
import json, os, signal, sys
from pathlib import Path

import pytest
from trainables.tracking import TrialTracker, WandbConfig

out, services = sys.argv[1], []
for i in range(3):
    tracker = TrialTracker(WandbConfig(), mode="offline", group="g", name=f"trial-{i}",
                           config={"i": i}, directory=out)
    services.append(os.environ.get("WANDB_SERVICE"))
    for step in (1, 2, 3):
        tracker.log({"step": step, "train_loss": i + 1 / step, "note": "not a number"})
    tracker.finish()
print("SERVICES " + json.dumps(services), flush=True)
# The actor's exit under Ray: its child processes, the W&B service among them, die first.
for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        continue
    if int(fields[1]) == os.getpid():
        os.kill(int(stat.parent.name), signal.SIGKILL)
"""


def test_runs_share_one_service_keep_their_history_and_exit_quietly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SERVICES "))
    services = json.loads(line.removeprefix("SERVICES "))
    assert services[0] and len(set(services)) == 1, f"one service for all runs: {services}"
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 3
    assert all(wandb_file.has_exit(f) for f in files), "every run complete in its file"
    by_trial = {}
    for f in files:
        rows = wandb_file.history(f)
        by_trial[round(rows[0]["train_loss"] - 1)] = rows
    assert sorted(by_trial) == [0, 1, 2]
    for i, rows in by_trial.items():
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert [r["train_loss"] for r in rows] == [i + 1, i + 0.5, i + 1 / 3]
        assert all("note" not in r for r in rows)  # only numbers are logged


def _write_log(path: Path, records: list) -> None:
    """A W&B run file in LevelDB's log format, records split across 32 KiB blocks."""
    out = bytearray(b":W&B\xe1\xbe\x00")
    for record in records:
        payload, first = record.SerializeToString(), True
        while True:
            left = 32768 - len(out) % 32768
            if left < 7:
                out += b"\x00" * left
                continue
            n = min(len(payload), left - 7)
            last = n == len(payload)
            kind = (1 if last else 2) if first else (4 if last else 3)
            out += (0).to_bytes(4, "little") + n.to_bytes(2, "little") + bytes([kind])
            out += payload[:n]
            payload, first = payload[n:], False
            if last:
                break
    path.write_bytes(bytes(out))


def _history_record(step: int, note: str):
    from wandb.proto import wandb_internal_pb2 as pb

    record = pb.Record()
    record.history.item.add(key="step", value_json=json.dumps(step))
    record.history.item.add(key="note", value_json=json.dumps(note))
    return record


def test_run_file_reader_follows_records_across_blocks_and_stops_at_a_torn_one(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb

    big = "x" * 50_000  # one record over two blocks: first + last chunks
    exit_record = pb.Record()
    exit_record.exit.exit_code = 0
    rows = [_history_record(s, big if s == 2 else "n") for s in range(1, 80)]
    path = tmp_path / "run-abc.wandb"
    _write_log(path, [*rows, exit_record])
    history = wandb_file.history(path)
    assert [r["step"] for r in history] == list(range(1, 80))
    assert history[1]["note"] == big and wandb_file.has_exit(path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # the exit record cut short: still being written
    assert not wandb_file.has_exit(path) and len(wandb_file.history(path)) == 79
    path.write_bytes(whole[:40_000])  # inside the big record's second chunk
    assert [r["step"] for r in wandb_file.history(path)] == [1]
    path.write_bytes(b"PK\x03\x04not a run")
    assert not wandb_file.has_exit(path)
    with pytest.raises(ValueError, match="not a W&B run file"):
        wandb_file.history(path)
    assert not wandb_file.has_exit(tmp_path / "missing.wandb")
