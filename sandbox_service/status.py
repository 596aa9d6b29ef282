"""What each study under a storage root is doing: complete, running or interrupted.

A study holds `spec.yaml` from its start, `running.json` (host and pid of the driver) while a
driver runs it, and `summary.json` once it has ended. A `running.json` whose driver is gone means
the study was interrupted: `sandbox run` on the same file resumes it.
"""

from __future__ import annotations

import json
import os
import socket

from sandbox_service import results, storage


def mark_running(url: str) -> None:
    info = {"host": socket.gethostname(), "pid": os.getpid()}
    storage.write_text(storage.join(url, "running.json"), json.dumps(info) + "\n")


def clear_running(url: str) -> None:
    fs, path = storage.filesystem(storage.join(url, "running.json"))
    if fs.exists(path):
        fs.rm(path)


def driver_alive(info: dict) -> bool | None:
    """True/False for a driver on this host; None when it ran elsewhere (cannot tell)."""
    if info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def study_state(url: str) -> dict:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    summary = results.read_summary(url)
    running = storage.join(url, "running.json")
    if storage.exists(running):
        alive = driver_alive(json.loads(storage.read_text(running)))
        state = {True: "running", False: "interrupted", None: "running elsewhere?"}[alive]
    elif summary is not None:
        state = summary["status"]
    else:
        state = "interrupted"
    trials = summary["n_trials"] if summary else len(storage.subfolders(storage.join(url, "tune")))
    best = summary.get("best") if summary else None
    best_text = (
        f"{summary['metric']}={best[summary['metric']]:.4f} {best['config']}" if best else "-"
    )
    return {"study": name, "state": state, "trials": trials, "best": best_text}


def study_states(root: str) -> list[dict]:
    return [
        study_state(storage.join(root, name))
        for name in storage.subfolders(root)
        if storage.exists(storage.join(root, name, "spec.yaml"))
    ]
