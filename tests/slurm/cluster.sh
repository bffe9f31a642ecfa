#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the `slurm` tests (pytest -m slurm).
#   tests/slurm/cluster.sh start    install slurm-wlm + munge if missing (apt-get, needs root), write the
#                                   config, start munged, slurmctld and slurmd, wait until the node is idle
#   tests/slurm/cluster.sh stop     stop the daemons this script started (by their pid files), nothing else
#   tests/slurm/cluster.sh status   sinfo, or exit 1 when no cluster answers
# Idempotent: start on a running cluster and stop on a stopped one do nothing. Everything it writes
# (config, state, pid files, logs) lives under tests/slurm/logs/ (gitignored); munge keeps its key
# in /etc/munge, where munged looks for it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RUN="$HERE/logs"
CONF="$RUN/slurm.conf"
export SLURM_CONF="$CONF"
DAEMONS=(slurmd slurmctld munged)  # stop order

log() { echo "cluster.sh: $*" >&2; }

answers() { timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -q -E '^(idle|mixed|allocated)'; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || { log "slurm-wlm and munge are not installed and this is not root; install them first"; exit 1; }
  log "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq >"$RUN/apt.log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$RUN/apt.log" 2>&1 \
    || { log "apt-get install failed; see $RUN/apt.log"; exit 1; }
}

write_config() {
  local cpus mem_mb host user
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # leave 1 GiB to the OS
  host=$(hostname -s)
  user=$(id -un)
  mkdir -p "$RUN/state" "$RUN/spool"
  cat >"$CONF" <<CONF
# written by tests/slurm/cluster.sh: one node, no cgroups (containers rarely delegate them)
ClusterName=kdstudy
SlurmctldHost=$host
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$RUN/slurmctld.log
SlurmdLogFile=$RUN/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
# the runner's jobs may be requeued (preemption, node failure)
JobRequeue=1
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start_munge() {
  pid_alive munged && return
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "a munged not started by this script already answers; using it"
    return
  fi
  local as=()
  mkdir -p "$RUN/munge"
  if id munge >/dev/null 2>&1; then as=(runuser -u munge --); chown munge:munge "$RUN/munge"; fi
  "${as[@]}" munged --pid-file="$RUN/munge/munged.pid" --log-file="$RUN/munge/munged.log" --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  log "munged did not answer; see $RUN/munge/munged.log"; exit 1
}

start() {
  mkdir -p "$RUN"
  if pid_alive slurmctld && answers; then log "cluster already up"; sinfo; return; fi
  local t0=$SECONDS
  install_packages
  write_config
  start_munge
  pid_alive slurmctld || slurmctld -f "$CONF"
  pid_alive slurmd || slurmd -f "$CONF"
  for _ in $(seq 120); do
    if answers; then log "cluster up in $((SECONDS - t0)) s ($(sinfo -V))"; sinfo; return; fi
    # a node left DOWN by an earlier unclean stop comes back here
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  log "the node did not become idle within 120 s; see $RUN/slurmctld.log and $RUN/slurmd.log"; sinfo || true; exit 1
}

pid_file() { if [ "$1" = munged ]; then echo "$RUN/munge/munged.pid"; else echo "$RUN/$1.pid"; fi; }
pid_alive() { [ -f "$(pid_file "$1")" ] && kill -0 "$(cat "$(pid_file "$1")")" 2>/dev/null; }

stop() {
  local name pid
  for name in "${DAEMONS[@]}"; do
    pid_alive "$name" || { rm -f "$(pid_file "$name")"; continue; }
    pid=$(cat "$(pid_file "$name")")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$(pid_file "$name")"
    log "stopped $name ($pid)"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) answers && sinfo || { log "no cluster answers"; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
