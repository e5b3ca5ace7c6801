#!/usr/bin/env bash
# Start a real single-node SLURM on this machine, for cmcflow's scheduler tests (CI runs
# as root; Debian 12, slurm-wlm 22.05, munge). No systemd, no cgroups, no accounting (the
# profiles use `squeue` for job status). Installs missing packages, writes the configs,
# starts only daemons that are not running, waits for the node, records the daemons' PIDs
# in $PREFIX/pids so that stop_slurm.sh stops exactly those. Idempotent.
#
# Environment (defaults): CMCFLOW_SLURM_PREFIX (/tmp/cmcflow-slurm), CMCFLOW_SLURM_PARTITION
# (debug), ports CMCFLOW_SLURM_CTLD_PORT/SLURMD_PORT (16817/16818: the defaults 6817/6818
# may be taken on a shared machine).
# slurm.conf must be /etc/slurm/slurm.conf: the SLURM executor's job step strips every
# SLURM_* variable, SLURM_CONF included, before its nested srun.
set -euo pipefail

PREFIX=${CMCFLOW_SLURM_PREFIX:-/tmp/cmcflow-slurm}
PARTITION=${CMCFLOW_SLURM_PARTITION:-debug}
CTLD_PORT=${CMCFLOW_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${CMCFLOW_SLURM_SLURMD_PORT:-16818}
CONF=/etc/slurm/slurm.conf
MARK="# written by cmcflow scripts/start_slurm.sh"

log() { echo "[start_slurm] $*"; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their users)"
alive() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }
wait_for() { local tries=$(($1 * 4)); shift; for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done; return 1; }

packages=(munge slurmctld slurmd slurm-client slurm-wlm-torque)
missing=(); for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

S=$PREFIX/slurm; M=$PREFIX/munge
mkdir -p "$S"/{state,spool,log,run} /etc/slurm
install -d -o munge -g munge -m 0755 "$M" "$M/run"
install -d -o munge -g munge -m 0700 "$M/etc" "$M/lib" "$M/log"
SOCKET=$M/run/munge.socket.2

if [ ! -s "$M/etc/munge.key" ]; then
  dd if=/dev/urandom bs=1 count=1024 of="$M/etc/munge.key" status=none
  chown munge:munge "$M/etc/munge.key"; chmod 0400 "$M/etc/munge.key"
fi
alive "$M/run/munged.pid" munged || runuser -u munge -- munged --force --key-file="$M/etc/munge.key" \
  --socket="$SOCKET" --pid-file="$M/run/munged.pid" --log-file="$M/log/munged.log" --seed-file="$M/lib/munged.seed"
wait_for 15 munge -S "$SOCKET" -n || die "munged does not answer ($M/log/munged.log)"

if [ -s "$CONF" ] && ! grep -q "^$MARK" "$CONF"; then die "$CONF exists and is not ours; move it away first"; fi
NODE=$(hostname -s)
HARDWARE=$(slurmd -C | head -1)
REAL_MEMORY=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HARDWARE")
cat > "$CONF.new" <<CONFIG
$MARK
ClusterName=cmcflow-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
# finished jobs stay visible to squeue this long (s): the profiles' status command
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
$(sed "s/RealMemory=[0-9]*/RealMemory=$((REAL_MEMORY * 9 / 10))/" <<<"$HARDWARE") NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONFIG
changed=0; cmp -s "$CONF.new" "$CONF" || changed=1
mv "$CONF.new" "$CONF"; chmod 0644 "$CONF"
if [ "$changed" = 1 ]; then
  for daemon in slurmd slurmctld; do
    if alive "$S/run/$daemon.pid" "$daemon"; then kill "$(cat "$S/run/$daemon.pid")"; sleep 1; fi
  done
fi

alive "$S/run/slurmctld.pid" slurmctld || slurmctld
wait_for 30 bash -c 'scontrol ping | grep -q UP' || die "slurmctld not up ($S/log/slurmctld.log)"
alive "$S/run/slurmd.pid" slurmd || slurmd
node_ready() { sinfo -h -n "$NODE" -o %T | grep -Eq '^(idle|mixed|allocated)'; }
if ! wait_for 30 node_ready; then
  scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  wait_for 15 node_ready || die "node $NODE not ready: $(sinfo -h -n "$NODE" -o '%T %E')"
fi
printf 'munged %s\nslurmctld %s\nslurmd %s\n' "$(cat "$M/run/munged.pid")" \
  "$(cat "$S/run/slurmctld.pid")" "$(cat "$S/run/slurmd.pid")" > "$PREFIX/pids"
log "ready: partition $PARTITION on node $NODE ($(sinfo -h -n "$NODE" -o '%c CPUs, %m MB'))"
