#!/usr/bin/env bash
# Stop what tests/slurm/slurm-up.sh started in DIR: cancel the jobs, stop slurmd and slurmctld,
# and munged if slurm-up.sh started it. Daemons it did not start (no pid file in DIR) are left alone.
#
# Usage: tests/slurm/slurm-down.sh [--keep-munge] [DIR]
set -uo pipefail

KEEP_MUNGE=0
if [ "${1:-}" = "--keep-munge" ]; then
    KEEP_MUNGE=1
    shift
fi
DIR=${1:-${DP_SLURM_DIR:-/tmp/dask-pervasive-slurm}}
export SLURM_CONF="$DIR/slurm.conf"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stop the process whose pid is in $1: SIGTERM, then SIGKILL after 10 s.
stop() {
    alive "$1" || {
        rm -f "$1"
        return 0
    }
    local pid
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    rm -f "$1"
}

if alive "$DIR/slurmctld.pid"; then
    # Jobs first, while slurmd can still kill their processes (no orphaned dask workers).
    jobs=$(squeue -h -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 100); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
fi
stop "$DIR/slurmd.pid"
stop "$DIR/slurmctld.pid"

if [ "$KEEP_MUNGE" -eq 0 ] && [ -f "$DIR/munged.started" ]; then
    stop /run/munge/munged.pid
    rm -f "$DIR/munged.started"
fi
echo "slurm-down: stopped the daemons started in $DIR"
