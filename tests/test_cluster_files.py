"""The cluster deployment files: image recipe, launcher config, KubeRay manifests, local scripts.

None of them can be applied here (no cloud, no Kubernetes, no spare cores for Ray), so these tests
pin what goes wrong without one: YAML that does not parse, KubeRay fields out of place, a secret
written into a file, a service or dashboard exposed by default, versions that drift apart, paths
and modules that do not exist, and local scripts that would stop more than what they started
(exercised end to end with a stand-in for `ray start`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
LOCAL = CLUSTER / "local"
DOC = ROOT / "docs" / "cluster.md"
EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
SENSITIVE_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
KEY_SHAPES = {
    "W&B API key (40 hex)": re.compile(r"\b[0-9a-f]{40}\b"),
    "Ray token (64 hex)": re.compile(r"\b[0-9a-f]{64}\b"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS secret key": re.compile(r"(?i)secret_access_key\W{1,4}[A-Za-z0-9/+]{40}\b"),
}
SPEC_REF = re.compile(r"search_spaces/[\w./-]+\.yaml")
PLACEHOLDER = re.compile(r"^REPLACE_WITH_[A-Z0-9_]+$")


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def text_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file()) + [DOC]


def ray_manifests() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in sorted(KUBERAY.glob("*.yaml"))
        for doc in load_docs(path)
        if str(doc.get("apiVersion", "")).startswith("ray.io")
    ]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_specs(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def walk(node):
    """Every dict inside a parsed manifest, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def key_shapes_in(text: str) -> list[str]:
    return [name for name, pattern in KEY_SHAPES.items() if pattern.search(text)]


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"{DOCKERFILE}: no default for ARG {name}"
    return match.group(1)


# --- every file ---------------------------------------------------------------------------------


def test_every_yaml_parses_to_mappings():
    paths = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.relative_to(CLUSTER).as_posix() for p in paths} >= {
        "launcher/aws-gpu.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-study.yaml",
        "kuberay/secrets.example.yaml",
    }
    for path in paths:
        docs = load_docs(path)
        assert docs, f"{path}: no YAML document"
        assert all(isinstance(doc, dict) for doc in docs), f"{path}: a document is not a mapping"


def test_key_detector_flags_key_shapes_and_passes_placeholders():
    assert key_shapes_in("WANDB_API_KEY=" + "3f" * 20) == ["W&B API key (40 hex)"]
    assert key_shapes_in("AKIA" + "ABCDEFGHIJKLMNOP") == ["AWS access key id"]
    assert key_shapes_in("api-key: REPLACE_WITH_YOUR_WANDB_API_KEY") == []
    assert key_shapes_in("image: rayproject/ray:2.60.0-py311-gpu") == []


@pytest.mark.parametrize("path", text_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_file_holds_something_shaped_like_a_key(path):
    assert key_shapes_in(path.read_text()) == [], f"{path} holds what looks like a credential"


def test_spec_files_named_anywhere_exist():
    named = {m.group(0) for p in text_files() for m in SPEC_REF.finditer(p.read_text())}
    assert "search_spaces/lr_transfer_micro.yaml" in named
    missing = sorted(ref for ref in named if not (ROOT / ref).is_file())
    assert missing == [], f"search-space files named in cluster files but absent: {missing}"


def test_sandbox_subcommands_named_anywhere_exist():
    cli_source = (ROOT / "sandbox_service" / "cli.py").read_text()
    defined = set(re.findall(r'add_parser\(\s*"(\w+)"', cli_source))
    used = {
        m.group(1)
        for p in text_files()
        for m in re.finditer(r"-m sandbox_service\.cli\s+(\w+)", p.read_text())
    }
    assert {"run", "report", "status"} <= used
    assert used <= defined, f"subcommands used but not defined: {sorted(used - defined)}"


# --- versions -----------------------------------------------------------------------------------


def test_ray_and_torch_versions_agree_everywhere():
    ray_version = dockerfile_arg("RAY_VERSION")
    torch_version = dockerfile_arg("TORCH_VERSION")
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert launcher["docker"]["image"] == f"rayproject/ray:{ray_version}-py311-gpu"
    setup = " ".join(launcher["setup_commands"])
    assert f"ray[tune,train,default]=={ray_version}" in setup
    assert f"torch=={torch_version}" in setup
    for path, doc in ray_manifests():
        assert cluster_spec(doc)["rayVersion"] == ray_version, path


def test_pinned_ray_satisfies_the_project_requirement():
    packaging = pytest.importorskip("packaging.requirements")
    pyproject = (ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"(ray\[[^"]+)"', pyproject).group(1)
    assert packaging.Requirement(spec).specifier.contains(dockerfile_arg("RAY_VERSION"))


# --- image --------------------------------------------------------------------------------------


def test_image_builds_on_an_official_ray_gpu_tag():
    base = re.search(r"^FROM (\S+)$", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    base = base.replace("${RAY_VERSION}", dockerfile_arg("RAY_VERSION"))
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-(gpu|cu\d+)", base), base


def test_image_copies_only_existing_sources_that_the_ignore_file_lets_in():
    text = DOCKERFILE.read_text()
    sources = [
        src.rstrip("/")
        for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.MULTILINE)
        for src in line.split()[:-1]
    ]
    assert {"pyproject.toml", "trainables", "sandbox_service", "search_spaces"} <= set(sources)
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split("\n")
    let_in = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert src in let_in, f"COPY {src}: Dockerfile.dockerignore keeps it out of the context"


def test_image_bakes_in_no_credential():
    assigned = re.findall(r"^\s*(?:ENV|ARG)\s+(\w+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert [name for name in assigned if SENSITIVE_ENV.search(name)] == []


# --- Ray cluster launcher -----------------------------------------------------------------------


def test_launcher_has_the_required_structure():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(cfg)
    node_types = cfg["available_node_types"]
    assert cfg["head_node_type"] in node_types
    workers = {name: t for name, t in node_types.items() if name != cfg["head_node_type"]}
    assert workers, "no worker node type"
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cfg["max_workers"], name
        assert "IamInstanceProfile" in node_type["node_config"], f"{name}: no S3 access for trials"


def test_launcher_matches_the_installed_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    ray_spec = importlib.util.find_spec("ray")  # locates Ray without importing it
    if ray_spec is None or ray_spec.origin is None:
        pytest.skip("ray is not installed: its cluster-config schema ships with it")
    schema_path = Path(ray_spec.origin).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(yaml.safe_load(LAUNCHER.read_text()), schema)


def test_launcher_keeps_the_dashboard_local_and_auth_on():
    cfg = yaml.safe_load(LAUNCHER.read_text())  # comments are gone: only live commands count
    commands = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    hosts = [h for c in commands for h in re.findall(r"--dashboard-host[= ](\S+)", c)]
    assert hosts == ["127.0.0.1"], f"dashboard hosts: {hosts}"
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    token_mounts = [remote for remote in cfg["file_mounts"] if remote.endswith(".ray/auth_token")]
    assert token_mounts == ["~/.ray/auth_token"]
    assert not re.search(r"WANDB_API_KEY\s*[:=]\s*\w", LAUNCHER.read_text())


# --- KubeRay ------------------------------------------------------------------------------------


def test_kuberay_manifests_are_v1_clusters_and_jobs():
    kinds = sorted(doc["kind"] for _, doc in ray_manifests())
    assert kinds == ["RayCluster", "RayJob"]
    for path, doc in ray_manifests():
        assert doc["apiVersion"] == "ray.io/v1", path
        assert doc["metadata"]["name"], path


def test_kuberay_clusters_have_the_structure_kuberay_reads():
    for path, doc in ray_manifests():
        spec = cluster_spec(doc)
        assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict), path
        assert spec["workerGroupSpecs"], f"{path}: no worker group"
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and isinstance(group["rayStartParams"], dict), path
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], path
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{path}: worker group without a GPU"
        images = {pod["containers"][0]["image"] for pod in pod_specs(spec)}
        assert len(images) == 1 and all(images), f"{path}: head and workers differ: {images}"
        assert not next(iter(images)).endswith(":latest"), f"{path}: pin the image tag"


def test_kuberay_clusters_require_the_ray_token():
    for path, doc in ray_manifests():
        assert cluster_spec(doc)["authOptions"]["mode"] == "token", path


def test_kuberay_head_is_not_exposed_outside_kubernetes():
    for path, doc in ray_manifests():
        head = cluster_spec(doc)["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") not in EXPOSED_SERVICE_TYPES, path
        head_service_type = head.get("headService", {}).get("spec", {}).get("type", "ClusterIP")
        assert head_service_type not in EXPOSED_SERVICE_TYPES, path
        assert not head.get("enableIngress", False), path


def test_rayjob_runs_a_study_and_frees_its_cluster():
    jobs = [doc for _, doc in ray_manifests() if doc["kind"] == "RayJob"]
    for job in jobs:
        entrypoint = job["spec"]["entrypoint"]
        assert entrypoint.startswith("python -m sandbox_service.cli run "), entrypoint
        assert SPEC_REF.search(entrypoint) and "--storage " in entrypoint, entrypoint
        assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_python_modules_run_by_manifests_exist():
    commands = [doc["spec"]["entrypoint"] for _, doc in ray_manifests() if doc["kind"] == "RayJob"]
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_docs(path):
            commands += [" ".join(c.get("command", [])) for c in walk(doc) if "image" in c]
    modules = {m for c in commands for m in re.findall(r"python -m ([\w.]+)", c)}
    assert modules == {"sandbox_service.cli"}
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_secrets_reach_pods_only_through_secret_refs():
    env_vars = [
        var
        for path in sorted(KUBERAY.glob("*.yaml"))
        for doc in load_docs(path)
        for node in walk(doc)
        for var in (node.get("env") if isinstance(node.get("env"), list) else [])
    ]
    names = {var["name"] for var in env_vars}
    assert "WANDB_API_KEY" in names
    for var in env_vars:
        if SENSITIVE_ENV.search(var["name"]):
            assert "value" not in var, f"{var['name']} has a literal value"
            assert var["valueFrom"]["secretKeyRef"]["name"], var["name"]


def test_example_secrets_hold_placeholders_only():
    docs = load_docs(KUBERAY / "secrets.example.yaml")
    assert docs and all(doc["kind"] == "Secret" for doc in docs)
    for doc in docs:
        values = {**doc.get("stringData", {}), **doc.get("data", {})}
        assert values, doc["metadata"]["name"]
        for key, value in values.items():
            assert PLACEHOLDER.match(str(value)), f"{doc['metadata']['name']}.{key}: {value!r}"


# --- local multi-node scripts -------------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(LOCAL.glob("*.sh")), ids=lambda p: p.name)
def test_local_scripts_parse_and_never_stop_other_ray_instances(script):
    bash = shutil.which("bash") or pytest.skip("bash is not installed")
    subprocess.run([bash, "-n", str(script)], check=True, capture_output=True)
    assert os.access(script, os.X_OK), f"{script} is not executable"
    code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    for line in code:
        assert not re.search(r"\bray\b[\"']?\s+stop\b|\bpkill\b|\bkillall\b", line), line


FAKE_RAY = """#!/usr/bin/env bash
# Stands in for `ray start --block`: logs its arguments and auth env, records the GCS address
# as Ray does, holds a child process, and shuts both down on SIGTERM.
echo "args: $*"
echo "auth: ${RAY_AUTH_MODE:-} ${RAY_AUTH_TOKEN_PATH:-} token-env=${RAY_AUTH_TOKEN:-}"
temp=""; head=0
while [[ $# -gt 0 ]]; do
  case "$1" in --temp-dir) temp="$2"; shift 2 ;; --head) head=1; shift ;; *) shift ;; esac
done
sleep 300 &
child=$!
trap 'kill "$child"; exit 0' TERM
echo "Ray runtime started."
if (( head )); then printf '127.0.0.1:6390' > "$temp/ray_current_cluster"; fi
wait
"""


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the scripts read Linux /proc")
def test_local_cluster_starts_nodes_and_stops_exactly_them(tmp_path):
    fake_ray = tmp_path / "bin" / "ray"
    fake_ray.parent.mkdir()
    fake_ray.write_text(FAKE_RAY)
    fake_ray.chmod(0o755)
    state = tmp_path / "state"
    env = {**os.environ, "RAY_BIN": str(fake_ray), "PYTHON_BIN": sys.executable}
    env["RAY_AUTH_TOKEN"] = "from-the-user-shell"  # must not reach the nodes
    decoy = subprocess.Popen(["tail", "-f", "--retry", str(state / "ray" / "a.log")])
    leftover = None
    node_pids: list[int] = []
    try:
        start = [str(LOCAL / "start_local_cluster.sh"), "--workers", "2", "--state-dir", str(state)]
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=60)
        node_pids = [int(line.split()[1]) for line in (state / "pids").read_text().splitlines()]
        assert len(node_pids) == 3 and all(running(pid) for pid in node_pids)

        token = (state / "auth_token").read_text()
        assert re.fullmatch(r"[0-9a-f]{64}", token)
        assert (state / "auth_token").stat().st_mode & 0o077 == 0
        head_log = (state / "logs" / "head.log").read_text()
        assert f"--temp-dir {state}/ray" in head_log and "--port 0" in head_log
        assert "--dashboard-host 127.0.0.1" in head_log
        assert f"auth: token {state}/auth_token token-env=\n" in head_log
        worker_log = (state / "logs" / "worker-2.log").read_text()
        assert "--address 127.0.0.1:6390" in worker_log and '{"worker_2": 1}' in worker_log
        env_sh = (state / "env.sh").read_text()
        assert "export RAY_ADDRESS=127.0.0.1:6390" in env_sh
        assert "export RAY_AUTH_MODE=token" in env_sh

        # What a crashed node leaves behind: a process pointing a Ray dir flag into the cluster.
        leftover = subprocess.Popen(
            ["bash", "-c", "sleep 300; :", "raylet", f"--log_dir={state}/ray/session_1/logs"],
            start_new_session=True,
        )
        stop = [str(LOCAL / "stop_local_cluster.sh"), str(state), "--grace", "1"]
        subprocess.run(stop, check=True, capture_output=True, timeout=60)

        deadline = time.monotonic() + 5
        while any(running(pid) for pid in node_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(running(pid) for pid in node_pids)
        assert leftover.wait(timeout=5) < 0, "a crashed node's leftover outlived the stop"
        assert running(decoy.pid), "the stop script ended a process it did not start"
        assert not state.exists()
    finally:
        for pid in node_pids:  # each node leads its own process group (setsid)
            if running(pid):
                os.killpg(pid, signal.SIGKILL)
        for proc in (decoy, leftover):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
