#!/usr/bin/env bash
# Bring up a one-host SLURM for tests/slurm: munged, slurmctld and slurmd, 4 one-CPU slots,
# partitions `debug` (default, PriorityTier=1) and `urgent` (PriorityTier=10, preempts debug jobs).
#
# Usage: tests/slurm/slurm-up.sh [DIR]      (DIR: $DP_SLURM_DIR, default /tmp/dask-pervasive-slurm)
#
# Installs Debian's slurm-wlm and munge when missing (root only). Config, state, spool, logs and
# pid files live in DIR; nothing under /etc is written except munge's key when the package left
# none. Idempotent: with our daemons up and the same config it only checks the node is idle.
# Any (re)start wipes SLURM's state dir (stale jobs, or a ClusterName mismatch, would stop it).
# On success prints `SLURM_CONF=DIR/slurm.conf` (export it for sinfo/sbatch/scancel) and
# `SLURM_STARTED=1` (this run started slurmctld/slurmd) or `SLURM_STARTED=0` (they were up), exits 0;
# otherwise prints the reason on stderr and exits 1. tests/slurm/slurm-down.sh stops what this started.
set -euo pipefail

DIR=${1:-${DP_SLURM_DIR:-/tmp/dask-pervasive-slurm}}
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

fail() {
    echo "slurm-up: $*" >&2
    exit 1
}

# Run `tail` on a log for an error message, if it exists.
log_tail() { [ -f "$1" ] && tail -n "${2:-15}" "$1" | sed 's/^/    /' || true; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" -eq 0 ] || fail "not root (uid $(id -u)): installing slurm-wlm/munge and running slurmd needs root"

# -- packages ----------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null ||
    ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm-wlm/munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"/tmp/slurm-up-apt.log" 2>&1 || fail "apt-get update failed: $(tail -n 5 /tmp/slurm-up-apt.log)"
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 slurm-wlm munge \
        >>"/tmp/slurm-up-apt.log" 2>&1 || fail "apt-get install slurm-wlm munge failed: $(tail -n 5 /tmp/slurm-up-apt.log)"
fi

mkdir -p "$DIR"

# -- munge (the package does not start it without systemd; another runner may have) ------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start: $(log_tail /var/log/munge/munged.log 5)"
    touch "$DIR/munged.started" # ours: slurm-down.sh stops it
    for _ in $(seq 50); do
        munge_ok && break
        sleep 0.1
    done
    munge_ok || fail "munged started but 'munge -n | unmunge' fails: $(log_tail /var/log/munge/munged.log 5)"
fi

# -- slurm.conf ------------------------------------------------------------------------------------
HOST=$(hostname -s)
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
cat >"$CONF.new" <<EOF
# Written by tests/slurm/slurm-up.sh: one host, 4 one-CPU slots, partition-priority preemption.
ClusterName=dask-pervasive
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in containers: track job processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs without --mem would otherwise take the whole node.
DefMemPerCPU=512
# Preemption fires on a backfill pass: every second, not every 30 s.
SchedulerParameters=bf_interval=1
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
KillWait=5
ReturnToService=2
# 4 slots whatever the real core count (config_overrides: trust CPUs= over the hardware).
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=4 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES PriorityTier=1 MaxTime=INFINITE State=UP
PartitionName=urgent Nodes=$HOST PriorityTier=10 MaxTime=INFINITE State=UP
EOF

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1; }

wait_idle() {
    local state=""
    for _ in $(seq 150); do # 30 s
        state=$(node_state)
        case "$state" in
        idle | mixed | allocated) return 0 ;;
        esac
        sleep 0.2
    done
    fail "node $HOST not idle after 30 s (sinfo state: '${state:-no answer}')
  slurmctld.log:
$(log_tail "$DIR/log/slurmctld.log")
  slurmd.log:
$(log_tail "$DIR/log/slurmd.log")"
}

if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && cmp -s "$CONF.new" "$CONF" &&
    scontrol ping >/dev/null 2>&1; then
    rm -f "$CONF.new"
    wait_idle
    echo "SLURM_CONF=$CONF"
    echo "SLURM_STARTED=0"
    exit 0
fi

# -- (re)start -------------------------------------------------------------------------------------
"$(dirname "$0")/slurm-down.sh" --keep-munge "$DIR" >/dev/null
rm -rf "$DIR/state" "$DIR/spool"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
mv "$CONF.new" "$CONF"
slurmctld -f "$CONF" || fail "slurmctld did not start:
$(log_tail "$DIR/log/slurmctld.log")"
slurmd -f "$CONF" || fail "slurmd did not start:
$(log_tail "$DIR/log/slurmd.log")"
wait_idle
echo "SLURM_CONF=$CONF"
echo "SLURM_STARTED=1"
