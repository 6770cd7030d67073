#!/usr/bin/env bash
# Stop the local Slurm cluster started by .ci/slurm_up.sh (best effort), daemon by daemon through the
# pid files it wrote: each node's slurmd (its namespace ends with it), the one slurmd of the older
# one-node layout if it still runs, slurmctld, munged.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

stop_pidfile() {  # name pidfile
  local name=$1 f=$2 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
  echo "[slurm_down] stopping $name (pid $pid)" >&2
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$f"
}

shopt -s nullglob
for f in /run/slurmd-*.pid; do
  node=${f#/run/slurmd-}
  stop_pidfile "slurmd ${node%.pid}" "$f"
done
stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_pidfile munged /run/munge/munged.pid
exit 0
