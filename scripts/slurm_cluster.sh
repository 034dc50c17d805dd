#!/usr/bin/env bash
# A real SLURM cluster of one node with two CPUs, on loopback, for the tests
# and for any developer: Debian's slurm-wlm (slurmctld, slurmd) and munge,
# started as root with a configuration and state of their own (nothing under
# /etc is changed, no system service is started).
#
#   sudo scripts/slurm_cluster.sh install   # apt-get install slurm-wlm munge (once)
#   sudo scripts/slurm_cluster.sh up        # start munged, slurmctld, slurmd; wait for the node
#   eval "$(sudo scripts/slurm_cluster.sh env)"   # SLURM_CONF for srun, sbatch, scancel
#   srun -n 2 jpr run --steps 20 --microbatches 8
#   sudo scripts/slurm_cluster.sh down      # stop the daemons it started, delete the state
#
# The folder is $JPR_SLURM_DIR (default: jpr-slurm in the temporary folder).
# Partitions: `low` (the default; its jobs are preempted by requeue, after a
# GraceTime of 60 s) and `high` (a job there preempts a `low` one). `up`
# prints the SLURM_CONF line; every command is idempotent.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

DIR="${JPR_SLURM_DIR:-${TMPDIR:-/tmp}/jpr-slurm}"
CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  local ctld_port slurmd_port
  ctld_port="$(free_port)"
  slurmd_port="$(free_port)"
  cat >"$CONF" <<EOF
ClusterName=jpr
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
KillWait=30
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=low Nodes=ALL Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=60 MaxTime=INFINITE State=UP
PartitionName=high Nodes=ALL PriorityTier=2 PreemptMode=OFF MaxTime=INFINITE State=UP
EOF
}

running() {  # a pid file whose process is alive
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

up() {
  [[ "$(id -u)" == 0 ]] || die "up needs root (the daemons run as root)"
  command -v slurmctld >/dev/null || die "slurm-wlm is not installed: run '$0 install'"
  command -v munged >/dev/null || die "munge is not installed: run '$0 install'"
  mkdir -p "$DIR/state" "$DIR/spool"
  chmod 700 "$DIR"
  [[ -f "$CONF" ]] || write_conf
  if ! running "$DIR/munged.pid"; then
    [[ -f "$DIR/munge.key" ]] || dd if=/dev/urandom of="$DIR/munge.key" bs=128 count=1 status=none
    chmod 400 "$DIR/munge.key"
    munged --force --key-file "$DIR/munge.key" --socket "$DIR/munge.socket" \
      --pid-file "$DIR/munged.pid" --log-file "$DIR/munged.log" --seed-file "$DIR/munged.seed"
  fi
  running "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
  running "$DIR/slurmd.pid" || slurmd -f "$CONF"
  export SLURM_CONF="$CONF"
  local i state=""
  for i in $(seq 1 120); do
    state="$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 || true)"
    [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] && break
    if [[ "$state" == down* || "$state" == drain* ]]; then
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.5
  done
  [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] ||
    die "node $NODE did not come up (state '${state:-none}'); see $DIR/slurmctld.log and $DIR/slurmd.log"
  echo "export SLURM_CONF=$CONF"
}

down() {
  local name pid
  if [[ -f "$CONF" ]] && running "$DIR/slurmctld.pid"; then
    SLURM_CONF="$CONF" scancel --full --signal=KILL --state=RUNNING --user=root >/dev/null 2>&1 || true
    SLURM_CONF="$CONF" scancel --user=root >/dev/null 2>&1 || true
  fi
  local pids=()
  for name in slurmd slurmctld munged; do
    running "$DIR/$name.pid" || continue
    pid="$(cat "$DIR/$name.pid")"
    kill "$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  for pid in "${pids[@]}"; do  # at most 5 s each, then SIGKILL
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$DIR"
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: $0 install|up|down|env" ;;
esac
