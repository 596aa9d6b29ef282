#!/usr/bin/env bash
# Stop a cluster made by start_local_cluster.sh, and only that cluster.
#
#   cluster/local/stop_local_cluster.sh STATE_DIR [--keep] [--grace SECONDS]
#
# Which processes: the `ray start --block` process of each node recorded in STATE_DIR/pids and
# all its descendants (GCS, raylet, dashboard, Ray workers, job drivers), plus any process of
# this user left over from a crashed node, known by a Ray directory flag (--temp-dir, --log_dir,
# ...) pointing into this cluster's private temp dir. Each is remembered with its start time, so
# a PID that an unrelated program reuses is never signalled.
# How: SIGTERM to the node processes (workers first, then the head), which shut their node down;
# SIGKILL to whatever of the set outlives the grace period. Never `ray stop`: that ends every Ray
# instance on the machine. --keep leaves STATE_DIR (logs, token) in place; by default it goes.
set -euo pipefail

die() { echo "stop_local_cluster: $*" >&2; exit 1; }

[[ $# -ge 1 ]] || die "usage: stop_local_cluster.sh STATE_DIR [--keep] [--grace SECONDS]"
state_dir="$(cd "$1" 2> /dev/null && pwd -P)" || die "no state dir at $1"
shift
keep=0
grace_s=15
while [[ $# -gt 0 ]]; do
  case "$1" in
    --keep) keep=1; shift ;;
    --grace) grace_s="$2"; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
[[ "$grace_s" =~ ^[0-9]+$ ]] || die "--grace $grace_s: expected whole seconds"
[[ -f "$state_dir/pids" ]] || die "$state_dir has no pids file: not made by start_local_cluster.sh"
ray_tmp="$state_dir/ray"
# Escapes regex metacharacters of the path (the single quotes hold a sed script, not a variable).
# shellcheck disable=SC2016
ray_tmp_re="$(printf '%s' "$ray_tmp" | sed 's/[][\.*^$()+?{}|]/\\&/g')"
uid="$(id -u)"

# read_proc PID: sets P_UID, P_PPID, P_STATE, P_START (clock ticks since boot) and P_CMD for the
# process, with shell builtins only (cheap over all of /proc); fails when the process is gone.
# The fields after "pid (comm) " in /proc/PID/stat are counted past comm, which may hold spaces.
read_proc() {
  local stat key value rest
  local -a fields args
  { read -r stat < "/proc/$1/stat"; } 2> /dev/null || return 1
  read -r -a fields <<< "${stat##*) }"
  P_STATE="${fields[0]}" P_PPID="${fields[1]}" P_START="${fields[19]}"
  P_UID=""
  while read -r key value rest; do
    [[ "$key" == "Uid:" ]] && { P_UID="$value"; break; }
  done 2> /dev/null < "/proc/$1/status" || return 1
  mapfile -d '' -t args 2> /dev/null < "/proc/$1/cmdline" || return 1
  P_CMD="${args[*]}"
}

# Snapshot of this user's processes: the parent of each, the start time, and the leftovers of
# crashed nodes (a Ray directory flag pointing into this cluster's temp dir).
declare -A parent_of=() started_at=() cmd_of=()
leftover=()
flag_re="--(temp|session|log|logs)[-_]dir[= ]$ray_tmp_re"
for dir in /proc/[0-9]*; do
  pid="${dir#/proc/}"
  [[ "$pid" != "$$" ]] && read_proc "$pid" && [[ "$P_UID" == "$uid" ]] || continue
  parent_of[$pid]="$P_PPID"
  started_at[$pid]="$P_START"
  cmd_of[$pid]="$P_CMD"
  [[ "$P_CMD" =~ $flag_re ]] && leftover+=("$pid")
done

# The node processes, workers first (the file lists the head first); a recorded PID counts only
# if it is still this cluster's `ray start`.
nodes=()
while read -r _name pid; do
  [[ -n "${cmd_of[$pid]:-}" && "${cmd_of[$pid]}" == *"$ray_tmp"* ]] && nodes+=("$pid")
done < <(tac "$state_dir/pids")

# The set: node processes, their descendants and the leftovers.
declare -A in_set=()
for pid in ${nodes[@]+"${nodes[@]}"} ${leftover[@]+"${leftover[@]}"}; do in_set[$pid]=1; done
grown=1
while (( grown )); do
  grown=0
  for pid in "${!parent_of[@]}"; do
    if [[ -z "${in_set[$pid]:-}" && -n "${in_set[${parent_of[$pid]}]:-}" ]]; then
      in_set[$pid]=1
      grown=1
    fi
  done
done

# same_process PID: alive (not a zombie) and still the snapshotted process, not a reused PID.
same_process() {
  read_proc "$1" && [[ "$P_START" == "${started_at[$1]}" && "$P_STATE" != "Z" ]]
}

alive() {
  local pid
  for pid in "${!in_set[@]}"; do same_process "$pid" && echo "$pid"; done
  return 0
}

# SIGTERM lets each `ray start --block` shut its node down; crashed-node leftovers get it too.
for pid in ${nodes[@]+"${nodes[@]}"} ${leftover[@]+"${leftover[@]}"}; do
  same_process "$pid" && kill -TERM "$pid" 2> /dev/null || true
done

deadline=$((SECONDS + grace_s))
while [[ -n "$(alive)" ]] && (( SECONDS < deadline )); do
  sleep 0.5
done

mapfile -t stragglers < <(alive)
for pid in ${stragglers[@]+"${stragglers[@]}"}; do
  same_process "$pid" && kill -KILL "$pid" 2> /dev/null || true
done
if (( ${#stragglers[@]} > 0 )); then
  echo "stop_local_cluster: killed ${#stragglers[@]} process(es) still alive after ${grace_s}s"
fi

if (( keep )); then
  echo "stopped the local cluster (${#in_set[@]} processes); logs kept in $state_dir/logs"
else
  rm -rf -- "$state_dir"
  echo "stopped the local cluster (${#in_set[@]} processes) and removed $state_dir"
fi
