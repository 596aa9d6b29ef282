"""Fault tolerance on a real multi-node Ray cluster (every node on this machine).

Each scenario runs in its own subprocess, because the session may already hold a local Ray
(`ray_local`) and one process can join only one Ray instance. The subprocess builds a private
`ray.cluster_utils.Cluster` (a head and one or two worker nodes, one CPU each), runs the study,
shuts the cluster down in a `finally`, and prints one JSON line the test asserts on. Every
subprocess is bounded by a timeout and started in its own process group, so that on timeout only
the processes it started are ended. The driver-kill scenario needs no cluster: it kills a
subprocess that runs the study on its own local Ray, and reruns it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

# A study whose trials each run a few seconds and checkpoint at every evaluation (every 20 steps),
# so that a node lost mid-trial has a recent checkpoint to resume from.
SPEC = {
    "name": "tiny-nodes",
    "question": "Does a study survive the loss of a node?",
    "model": {"preset": "micro-32", "vocab_size": 512},
    "data": {"vocab_size": 512, "max_chars": 300_000},
    "train": {
        "tokens": 400 * 4 * 32,
        "batch_size": 4,
        "seq_len": 32,
        "eval_every": 20,
        "eval_tokens": 256,
        "checkpoint_every": 1,
        "precision": "fp32",
    },
    "search": {
        "algorithm": "grid",
        "space": {"train.lr": {"grid": [0.003, 0.006, 0.01, 0.03]}},
        "max_concurrent": 2,
    },
    "resources": {"cpu": 1},
    "tracking": {"wandb": {"mode": "disabled"}},
}

CLUSTER_PRELUDE = """
import json, sys, time, threading
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

args = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
workers = [cluster.add_node(num_cpus=1) for _ in range(args.get("workers", 1))]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
"""

# (a) Trials spread across nodes: a trainable that reports the node it ran on.
SPREAD_SCRIPT = (
    CLUSTER_PRELUDE
    + """
try:
    from ray import tune

    def where(config):
        time.sleep(1.0)
        tune.report({"node": ray.get_runtime_context().get_node_id(), "i": config["i"]})

    grid = tune.Tuner(
        tune.with_resources(where, {"cpu": 1}),
        param_space={"i": tune.grid_search(list(range(4)))},
        run_config=tune.RunConfig(storage_path=args["storage"], name="spread", verbose=0),
    ).fit()
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("RESULT " + json.dumps({
        "nodes": [r.metrics["node"] for r in grid],
        "errors": sum(r.error is not None for r in grid),
        "alive": alive,
    }))
finally:
    ray.shutdown()
    cluster.shutdown()
"""
)

# (b) Head and two workers, two trials at a time: once both running trials have checkpointed twice,
# the worker node running one of them is removed; the retry can start at once on the idle node.
NODE_LOSS_SCRIPT = (
    CLUSTER_PRELUDE
    + """
from sandbox_service.spec import parse_spec
from sandbox_service.study import run_study

exp = Path(args["storage"]) / args["spec"]["name"] / "tune"
events = {}

def line_counts():
    return {p.parent.name: p.read_text().count("\\n") for p in exp.glob("*/result.json")}

# The parent, grandparent, ... of a process, read from /proc (Linux).
def ancestors(pid):
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        yield pid

# A running trial and the worker node whose raylet is an ancestor of its process, or None.
def running_on_a_worker():
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in workers}
    for result in exp.glob("*/result.json"):
        last = json.loads(result.read_text().splitlines()[-1])
        if last["completed"]:
            continue
        for pid in ancestors(last["pid"]):
            if pid in raylets:
                return result.parent.name, raylets[pid]
    return None

def two_trials_checkpointed_twice():
    ckpts = {p.parent.name for p in exp.glob("*/checkpoint_*")}
    return len(ckpts) >= 2 and all(len(list((exp / t).glob("checkpoint_*"))) >= 2 for t in ckpts)

# Waits for two trials with two checkpoints each and a running trial on a worker node, then removes
# that node. A result file caught mid-write or a process that just ended is only a reason to look
# again; why no node was removed (if none was) goes into the result.
def kill_worker():
    deadline = time.time() + 150
    found = None
    while time.time() < deadline and "done" not in events and not found:
        try:
            found = two_trials_checkpointed_twice() and running_on_a_worker()
        except (ValueError, IndexError, KeyError, OSError) as e:
            events["last_error"] = repr(e)
        if not found:
            time.sleep(0.1)
    if not found:
        events["why_not"] = "study ended first" if "done" in events else "150 s passed"
        return
    victim, node = found
    events["removed_at"] = time.time()
    cluster.remove_node(node)  # the idle node's CPU is left for the retry
    events["victim"] = victim
    # When each report of each trial reached its result file, in seconds after the removal.
    seen = {}
    while time.time() < deadline and "done" not in events:
        for trial, n in line_counts().items():
            seen.setdefault(trial, {}).setdefault(str(n), time.time() - events["removed_at"])
        time.sleep(0.05)
    events["report_times_s"] = seen

watcher = threading.Thread(target=kill_worker, daemon=True)
started = time.time()
try:
    watcher.start()
    summary = run_study(parse_spec(args["spec"], "nodes.yaml"), root=args["storage"],
                        address=cluster.address, verbose=0)
    events["done"] = True
    watcher.join(timeout=5)
    print("RESULT " + json.dumps({
        "status": summary["status"], "counts": summary["counts"],
        "removed": "removed_at" in events, "victim": events.get("victim"),
        "report_times_s": events.get("report_times_s", {}),
        "why_not": events.get("why_not"), "last_error": events.get("last_error"),
        "elapsed_s": time.time() - started,
    }))
finally:
    ray.shutdown()
    cluster.shutdown()
"""
)

# (c) A single-node study the test kills with SIGKILL, then runs again.
STUDY_SCRIPT = """
import json, sys
from sandbox_service.spec import parse_spec
from sandbox_service.study import run_study

args = json.loads(sys.argv[1])
summary = run_study(parse_spec(args["spec"], "driver.yaml"), root=args["storage"],
                    num_cpus=2, verbose=0)
print("RESULT " + json.dumps({"status": summary["status"], "counts": summary["counts"]}))
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("RAY_ADDRESS", None)  # the scripts name their own cluster
    env.setdefault("WANDB_SILENT", "true")
    return env


def _start(script: str, args: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(args)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: ours to end, and nobody else's
    )


def _end(proc: subprocess.Popen) -> None:
    """End the subprocess and everything it started (its process group), if still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _run(script: str, args: dict, timeout_s: float) -> dict:
    proc = _start(script, args)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _end(proc)
        out = proc.stdout.read() if proc.stdout else ""
        pytest.fail(f"scenario did not finish in {timeout_s} s:\n{out[-4000:]}")
    finally:
        _end(proc)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"scenario failed ({proc.returncode}):\n{out[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _reports(result_json: Path) -> list[dict]:
    return [json.loads(line) for line in result_json.read_text().splitlines() if line.strip()]


def _restarts(reports: list[dict]) -> list[int]:
    """Indices of the reports that begin a restarted run of the trial."""
    since = [r["iterations_since_restore"] for r in reports]
    return [i for i in range(1, len(since)) if since[i] <= since[i - 1]]


def test_trials_spread_over_both_nodes(tmp_path):
    got = _run(SPREAD_SCRIPT, {"storage": str(tmp_path)}, timeout_s=120)
    assert got["errors"] == 0 and len(got["nodes"]) == 4
    assert len(set(got["nodes"])) == 2, f"all trials ran on one node: {got['nodes']}"
    assert set(got["nodes"]) <= set(got["alive"])
    # Storage is one local folder that every node sees: all four trials wrote there.
    assert len(list((tmp_path / "spread").glob("*/result.json"))) == 4


@pytest.mark.skipif(sys.platform != "linux", reason="finds a trial's node through /proc")
def test_study_survives_losing_a_worker_node(tmp_path, capsys):
    spec = copy.deepcopy(SPEC)
    args = {"storage": str(tmp_path), "spec": spec, "workers": 2}
    got = _run(NODE_LOSS_SCRIPT, args, timeout_s=200)
    assert got["removed"], (
        f"no node was removed ({got['why_not']}; last error {got['last_error']}); "
        f"the study took {got['elapsed_s']:.0f} s and ended {got['counts']}"
    )
    assert got["status"] == "complete" and got["counts"] == {"completed": 4}
    folder = tmp_path / spec["name"]
    import pandas as pd

    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 4 and set(trials["status"]) == {"completed"}
    assert sorted(trials["config/train/lr"]) == [0.003, 0.006, 0.01, 0.03]
    restarted = {}
    for result in (folder / "tune").glob("*/result.json"):
        reports = _reports(result)
        assert reports[-1]["step"] == 400 and reports[-1]["completed"]
        if _restarts(reports):
            restarted[result.parent.name] = reports
    assert set(restarted) == {got["victim"]}, f"only the lost node's trial restarts: {restarted}"
    ((trial, reports),) = restarted.items()
    (i,) = _restarts(reports)
    steps = [r["step"] for r in reports]
    # Resumed from a checkpoint, not from scratch: Tune keeps two, so the run goes back at most
    # to the one before the last report (20 steps each).
    resumed_from = steps[i] - 20
    assert resumed_from in (steps[i - 1], steps[i - 2]), f"{trial} steps {steps}"
    repeated = steps[i - 1] - resumed_from
    # Seconds from the removal to the restarted run's first report (report i is line i + 1).
    times = got["report_times_s"][trial]
    recovery = min(t for n, t in times.items() if int(n) >= i + 1)
    assert recovery > 0
    with capsys.disabled():
        print(
            f"\nnode loss: trial {trial} resumed at step {resumed_from} after its report at "
            f"step {steps[i - 1]} ({repeated} steps repeated); next report {recovery:.1f} s "
            "after the node was removed; 0 trials lost"
        )


def test_killed_driver_rerun_resumes_without_retraining(tmp_path, capsys):
    spec = copy.deepcopy(SPEC) | {"name": "tiny-driver"}
    spec["train"] = spec["train"] | {"tokens": 60 * 4 * 32, "eval_every": 20}
    spec["search"] = spec["search"] | {"max_concurrent": 1}
    args = {"storage": str(tmp_path), "spec": spec}
    exp = tmp_path / spec["name"] / "tune"
    proc = _start(STUDY_SCRIPT, args)
    done: dict[str, str] = {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not done and proc.poll() is None:
            done = {
                p.parent.name: p.read_text()
                for p in exp.glob("*/result.json")
                if '"completed": true' in p.read_text()
            }
            time.sleep(0.1)
    finally:
        _end(proc)  # SIGKILL: the driver and the local Ray it started get no chance to clean up
    out = proc.stdout.read() if proc.stdout else ""
    assert done and proc.returncode == -signal.SIGKILL, f"no trial finished in time:\n{out[-4000:]}"
    t0 = time.time()
    got = _run(STUDY_SCRIPT, args, timeout_s=150)
    assert got["status"] == "complete" and got["counts"] == {"completed": 4}
    for trial, before in done.items():
        after = (exp / trial / "result.json").read_text()
        assert after.startswith(before)
        repeated = [json.loads(line)["step"] for line in after[len(before) :].splitlines()]
        assert all(step == 60 for step in repeated), f"{trial} retrained steps {repeated}"
    with capsys.disabled():
        print(
            f"\ndriver kill: {len(done)} finished trial(s) kept with no step retrained; "
            f"the rerun completed the study in {time.time() - t0:.1f} s"
        )
