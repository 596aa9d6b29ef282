#!/usr/bin/env bash
# Start a private multi-node Ray cluster on this machine, for tests and demos of what only a
# cluster shows (Ray Jobs, trials spread over nodes, a node lost mid-study).
#
#   cluster/local/start_local_cluster.sh [--workers N] [--head-cpus N] [--worker-cpus N]
#       [--worker-gpus N] [--object-store-mb N] [--state-dir DIR] [--timeout SECONDS]
#   source STATE_DIR/env.sh          # RAY_ADDRESS, the Jobs API address and the token, for clients
#   cluster/local/stop_local_cluster.sh STATE_DIR
#
# Each node is one `ray start --block` process: the head, then N workers that join it with
# `ray start --address`, each with its own CPUs, GPUs and a custom resource "worker_<i>" that pins
# work to it. Nothing here touches other Ray instances on the machine: every node binds to
# 127.0.0.1 on ports picked free, all Ray files live in a private temp dir under STATE_DIR, token
# authentication uses a token of this cluster alone, and the stop script ends only the processes
# recorded here (never `ray stop`, which ends every Ray instance on the machine).
# Several nodes with GPUs on one machine all see every GPU: use --worker-gpus only with one worker.
set -euo pipefail

workers=2
head_cpus=1
worker_cpus=1
worker_gpus=0
object_store_mb=256
state_dir=""
timeout_s=90

# usage: the comment block at the top of this file.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
die() { echo "start_local_cluster: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --head-cpus) head_cpus="$2"; shift 2 ;;
    --worker-cpus) worker_cpus="$2"; shift 2 ;;
    --worker-gpus) worker_gpus="$2"; shift 2 ;;
    --object-store-mb) object_store_mb="$2"; shift 2 ;;
    --state-dir) state_dir="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "start_local_cluster: unknown argument $1" >&2; usage 2 ;;
  esac
done
for value in "$workers" "$head_cpus" "$worker_cpus" "$worker_gpus" "$object_store_mb" "$timeout_s"; do
  [[ "$value" =~ ^[0-9]+$ ]] || die "expected a non-negative integer, got '$value'"
done
# Ray refuses object stores under 75 MiB.
(( object_store_mb >= 75 )) || die "--object-store-mb $object_store_mb: at least 75"

# The ray CLI and the interpreter of the same environment (the one the project is installed in).
RAY_BIN="${RAY_BIN:-$(command -v ray || true)}"
[[ -n "$RAY_BIN" && -x "$RAY_BIN" ]] || die "no ray CLI on PATH (activate the project's environment or set RAY_BIN)"
if [[ -z "${PYTHON_BIN:-}" ]]; then
  PYTHON_BIN="$(dirname "$RAY_BIN")/python"
  [[ -x "$PYTHON_BIN" ]] || PYTHON_BIN="$(dirname "$RAY_BIN")/python3"
fi
[[ -x "$PYTHON_BIN" ]] || die "no interpreter at $PYTHON_BIN (set PYTHON_BIN)"

# A short, private state dir: Ray's socket paths under it must stay below 108 characters.
if [[ -z "$state_dir" ]]; then
  state_dir="$(mktemp -d /tmp/sbxray.XXXXXX)"
else
  mkdir -p "$state_dir"
  [[ -z "$(ls -A "$state_dir")" ]] || die "--state-dir $state_dir is not empty (is a cluster using it?)"
fi
state_dir="$(cd "$state_dir" && pwd -P)"
ray_tmp="$state_dir/ray"
mkdir -p "$ray_tmp" "$state_dir/logs"
: > "$state_dir/pids"

# This cluster's own token, readable by this user only; the environment token would win over the
# file, so it is cleared for the nodes.
( umask 077 && "$PYTHON_BIN" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' \
    > "$state_dir/auth_token" )
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$state_dir/auth_token"
unset RAY_AUTH_TOKEN RAY_ADDRESS
# SIGTERM tears a node down at once instead of draining it for up to 30 s.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

# A script's background jobs ignore Ctrl-C, so an interrupted start stops its nodes here.
trap on_failure INT TERM

free_port() {
  "$PYTHON_BIN" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

on_failure() {
  echo "start_local_cluster: failed; stopping the nodes started so far" >&2
  "$(dirname "$0")/stop_local_cluster.sh" "$state_dir" >&2 || true
  exit 1
}

# start_node NAME ARGS...: one `ray start --block` in the background, detached from this terminal;
# its PID goes to STATE_DIR/pids for the stop script.
start_node() {
  local name="$1"; shift
  local launcher=()
  command -v setsid > /dev/null && launcher=(setsid)
  ${launcher[@]+"${launcher[@]}"} "$RAY_BIN" start --block --node-ip-address 127.0.0.1 --temp-dir "$ray_tmp" \
    --object-store-memory $((object_store_mb * 1024 * 1024)) \
    --min-worker-port 0 --max-worker-port 0 \
    --dashboard-agent-listen-port "$(free_port)" "$@" \
    > "$state_dir/logs/$name.log" 2>&1 < /dev/null &
  echo "$name $!" >> "$state_dir/pids"
}

# wait_started NAME: until the node's log says it started, or its process died, or time is up.
wait_started() {
  local name="$1" pid deadline=$((SECONDS + timeout_s))
  pid="$(awk -v n="$name" '$1 == n {print $2}' "$state_dir/pids")"
  until grep -q "Ray runtime started" "$state_dir/logs/$name.log" 2> /dev/null; do
    if ! kill -0 "$pid" 2> /dev/null; then
      tail -n 30 "$state_dir/logs/$name.log" >&2; echo "$name exited during start" >&2; on_failure
    fi
    (( SECONDS < deadline )) || { echo "$name not started after ${timeout_s}s" >&2; on_failure; }
    sleep 0.2
  done
}

dashboard_port="$(free_port)"
start_node head --head --port 0 --num-cpus "$head_cpus" --num-gpus 0 \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
  --ray-client-server-port "$(free_port)" --disable-usage-stats
wait_started head
# `ray start --head` writes the GCS address it bound (--port 0 picks a free one) to the temp dir,
# just after it logs that it started.
deadline=$((SECONDS + timeout_s))
until [[ -s "$ray_tmp/ray_current_cluster" ]]; do
  (( SECONDS < deadline )) || { echo "head wrote no address after ${timeout_s}s" >&2; on_failure; }
  sleep 0.2
done
gcs_address="$(cat "$ray_tmp/ray_current_cluster")"

for ((i = 1; i <= workers; i++)); do
  start_node "worker-$i" --address "$gcs_address" --num-cpus "$worker_cpus" \
    --num-gpus "$worker_gpus" --resources "{\"worker_$i\": 1}"
done
for ((i = 1; i <= workers; i++)); do wait_started "worker-$i"; done

{
  echo "# Clients of the local Ray cluster in this folder: source this file. RAY_ADDRESS (the GCS)"
  echo "# serves ray.init and 'sandbox run'; the Jobs CLI reads RAY_API_SERVER_ADDRESS. Job"
  echo "# entrypoints run with the head's PATH, so they name the interpreter: \$SANDBOX_PYTHON."
  printf 'export RAY_ADDRESS=%q\n' "$gcs_address"
  printf 'export RAY_API_SERVER_ADDRESS=%q\n' "http://127.0.0.1:$dashboard_port"
  printf 'export RAY_AUTH_MODE=token\n'
  printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$state_dir/auth_token"
  printf 'unset RAY_AUTH_TOKEN\n'
  printf 'export SANDBOX_PYTHON=%q\n' "$PYTHON_BIN"
} > "$state_dir/env.sh"
trap - INT TERM

echo "local Ray cluster: head + $workers workers at $gcs_address"
echo "  Jobs API and dashboard: http://127.0.0.1:$dashboard_port (token in $state_dir/auth_token)"
echo "  clients: source $state_dir/env.sh"
echo "  stop:    $(dirname "$0")/stop_local_cluster.sh $state_dir"
