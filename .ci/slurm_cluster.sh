#!/usr/bin/env bash
# bash .ci/slurm_cluster.sh start   # install Slurm + munge (apt), start a 2-node localhost cluster, wait until idle
# bash .ci/slurm_cluster.sh stop    # stop the daemons started by `start`, by their process ids
#
# A real Slurm for CI on one machine (root, Debian): slurmctld plus two slurmd daemons, each
# emulating a node (`slurmd -N nodeX`) on 127.0.0.1 with its own port and spool directory.
# The node names are added to /etc/hosts because the training script takes MASTER_ADDR from
# `scontrol show hostnames`, and torchrun must resolve it like on a real cluster.
set -euo pipefail

STATE=${SLURM_CI_STATE:-/var/tmp/slurm-ci}   # spool, state, logs and pid files of this cluster
CONF=/etc/slurm/slurm.conf                    # the default path: every Slurm command finds it
NODES=(node1 node2)
FIRST_SLURMD_PORT=17001

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
}

write_config() {
  local host cpus i
  host=$(hostname -s)
  cpus=$(nproc)
  mkdir -p "$STATE/ctld" /etc/slurm
  {
    echo "# written by .ci/slurm_cluster.sh: a 2-node emulated cluster on 127.0.0.1 for CI"
    echo "ClusterName=ci"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    # A requeued job waits out the credential lifetime (120 s by default) before it may start
    # again; a starting job's step launch on localhost needs a fraction of this.
    echo "AuthInfo=cred_expire=${SLURM_CI_CRED_EXPIRE:-20}"
    echo "StateSaveLocation=$STATE/ctld"
    echo "SlurmdSpoolDir=$STATE/spool-%n"   # %n: one spool directory per emulated node
    echo "SlurmctldPidFile=$STATE/slurmctld.pid"
    echo "SlurmdPidFile=$STATE/slurmd-%n.pid"
    echo "SlurmctldLogFile=$STATE/slurmctld.log"
    echo "SlurmdLogFile=$STATE/slurmd-%n.log"
    echo "SlurmctldPort=6817"
    # linuxproc tracks a step's processes through /proc (no cgroups needed in a container);
    # task/none: no CPU binding, both emulated nodes share the same cores.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "MpiDefault=none"
    echo "SchedulerType=sched/backfill"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    # The real core count is shared by both emulated nodes: let the configured one win.
    echo "SlurmdParameters=config_overrides"
    echo "InactiveLimit=0"
    echo "KillWait=30"
    echo "MinJobAge=600"            # keep finished jobs visible to scontrol for the tests
    for i in "${!NODES[@]}"; do
      echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 NodeHostname=$host Port=$((FIRST_SLURMD_PORT + i)) CPUs=$cpus RealMemory=1000 State=UNKNOWN"
    done
    echo "PartitionName=ci Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
  if ! grep -q "${NODES[0]}" /etc/hosts; then
    echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
  fi
}

start_munge() {
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- munged   # daemonizes; munged refuses to run as root
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null
    pgrep -n -x munged >"$STATE/munged.pid"
  fi
}

start() {
  if [ -f "$STATE/slurmctld.run.pid" ] && kill -0 "$(cat "$STATE/slurmctld.run.pid")" 2>/dev/null; then
    echo "slurm cluster already running ($STATE)"
    return
  fi
  install_packages
  mkdir -p "$STATE"
  write_config
  start_munge
  # -i: ignore state saved by an earlier cluster in $STATE (CI starts from scratch).
  slurmctld -D -i >"$STATE/slurmctld.stdout" 2>&1 &
  echo $! >"$STATE/slurmctld.run.pid"
  local node
  for node in "${NODES[@]}"; do
    mkdir -p "$STATE/spool-$node"
    slurmd -D -N "$node" >"$STATE/slurmd-$node.stdout" 2>&1 &
    echo $! >"$STATE/slurmd-$node.run.pid"
  done
  # Both nodes idle means both slurmd registered and the partition can run a 2-node job.
  for _ in $(seq 120); do
    if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" -eq "${#NODES[@]}" ]; then
      sinfo -N
      return
    fi
    sleep 1
  done
  echo "slurm cluster did not come up; logs in $STATE" >&2
  sinfo -N >&2 || true
  tail -n 20 "$STATE"/*.log "$STATE"/*.stdout >&2 || true
  stop
  exit 1
}

stop() {
  local pidfile pid
  for pidfile in "$STATE"/slurmd-*.run.pid "$STATE/slurmctld.run.pid" "$STATE/munged.pid"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      # Wait for the daemon to go, so a following `start` can bind the same ports.
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
