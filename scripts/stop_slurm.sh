#!/usr/bin/env bash
# Stop the SLURM daemons that scripts/start_slurm.sh started (by their recorded PIDs, and
# only if each PID is still that daemon); cancel remaining jobs first. --purge also removes
# the state directory and our /etc/slurm/slurm.conf (whether or not daemons were recorded).
set -uo pipefail
PREFIX=${CMCFLOW_SLURM_PREFIX:-/tmp/cmcflow-slurm}
MARK="# written by cmcflow scripts/start_slurm.sh"

purge() {
  # a slurm.conf naming a controller that is down costs every Snakemake start 9 s: the SLURM
  # executor plugin runs `scontrol show config` on import, which retries until its timeout
  grep -qs "^$MARK" /etc/slurm/slurm.conf && rm -f /etc/slurm/slurm.conf
  case "$PREFIX" in /|/tmp|/etc|/usr|/var|"") ;; *) rm -rf "$PREFIX" ;; esac
}
if [ ! -s "$PREFIX/pids" ]; then
  echo "[stop_slurm] nothing recorded in $PREFIX/pids"
  [ "${1:-}" = "--purge" ] && purge
  exit 0
fi
if command -v squeue >/dev/null; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
  [ -n "$jobs" ] && timeout 10 scancel $jobs 2>/dev/null && sleep 2
fi
# stop in reverse start order: slurmd, slurmctld, munged
for daemon in slurmd slurmctld munged; do
  pid=$(awk -v d="$daemon" '$1 == d {print $2}' "$PREFIX/pids")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$daemon" ] || continue
  kill -TERM "$pid"
  for _ in $(seq 120); do [ -d "/proc/$pid" ] || break; sleep 0.25; done
  [ -d "/proc/$pid" ] && kill -KILL "$pid"
  echo "[stop_slurm] stopped $daemon ($pid)"
done
rm -f "$PREFIX/pids"
[ "${1:-}" = "--purge" ] && purge
exit 0
