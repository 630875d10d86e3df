#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (Debian/Ubuntu, root), for tests/test_slurm_live.py and .ci/run:
#   bash scripts/slurm_cluster.sh start    # install the packages if missing, configure, start, wait until the node is idle
#   bash scripts/slurm_cluster.sh stop     # cancel every job, stop the daemons this script started
#   bash scripts/slurm_cluster.sh status   # exit 0 iff the node answers (prints sinfo)
# One node ("localhost": this machine's CPUs and memory, two stand-in GPUs so that GPU requests are
# scheduled and get CUDA_VISIBLE_DEVICES; no GPU behind them), one partition ("debug"). No accounting database: Snakemake's slurm
# executor is told to poll squeue (MinJobAge keeps finished jobs visible there for an hour).
# Container-friendly: no cgroups (proctrack/linuxproc, task/none); memory limits are enforced by polling
# (jobacct_gather/linux + OverMemoryKill, every second). Daemons listen on 127.0.0.1 only, on ports 16817/16818.
# slurm.conf and gres.conf go to /etc/slurm, where every SLURM command looks (Snakemake's jobstep executor
# drops SLURM_* variables, SLURM_CONF included, before it calls srun inside a job); start refuses to replace
# a slurm.conf it did not write, and stop removes its own. State, spool, logs and pid files live in
# $KN_SLURM_DIR (default /tmp/kn-slurm). start and stop are idempotent.
set -euo pipefail

DIR="${KN_SLURM_DIR:-/tmp/kn-slurm}"
ETC=/etc/slurm
CONF="$ETC/slurm.conf"
MARK="# Written by scripts/slurm_cluster.sh: a single-node test cluster."
NODE=localhost
PARTITION=debug
WAIT_S="${KN_SLURM_WAIT_S:-90}"
unset SLURM_CONF

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

# Last lines of a daemon's log, for error messages.
log_tail() {
  local name="$1" log="$2"
  if [ -s "$log" ]; then
    echo "--- last lines of $log ($name) ---" >&2
    tail -n 25 "$log" >&2
  else
    echo "--- $log ($name): empty or missing ---" >&2
  fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  for tool in slurmctld slurmd sinfo munged; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them (Debian packages slurmctld slurmd slurm-client munge)"
  echo "[slurm] installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})" >&2
  local pkgs=(slurmctld slurmd slurm-client munge)
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$DIR/apt.log" 2>&1; then
    # a fresh machine may have no package lists yet
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$DIR/apt.log" 2>&1 || { log_tail "apt-get update" "$DIR/apt.log"; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$DIR/apt.log" 2>&1 \
      || { log_tail "apt-get install" "$DIR/apt.log"; die "apt-get install ${pkgs[*]} failed"; }
  fi
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged is already serving (ours from an earlier start, or the system's)
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge "$DIR/munge"
  runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    || { log_tail munged "$DIR/munge/munged.log"; die "munged (authentication daemon) did not start"; }
  touch "$DIR/munged.ours"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log_tail munged "$DIR/munge/munged.log"
  die "munged started but 'munge -n | unmunge' fails"
}

write_conf() {
  local cpus mem
  cpus="$(nproc)"
  # slurmd refuses a node that claims more memory than it finds: take what `slurmd -C` measures, less 5%
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
  [ -n "$mem" ] || die "'slurmd -C' did not report RealMemory"
  mem=$(( mem * 95 / 100 ))
  if [ -f "$CONF" ] && [ "$(head -n 1 "$CONF")" != "$MARK" ]; then
    die "$CONF exists and was not written by this script (a real cluster's?); not replacing it"
  fi
  mkdir -p "$ETC"
  cat >"$CONF.new" <<EOF
$MARK
ClusterName=kn-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill
MinJobAge=3600
ReturnToService=2
KillWait=5
InactiveLimit=0
SlurmdTimeout=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  # SLURM drops GPUs without device files: two stand-ins (character devices like /dev/null)
  for i in 0 1; do
    [ -c "$DIR/gpu$i" ] || mknod -m 0666 "$DIR/gpu$i" c 1 3
  done
  echo "NodeName=$NODE Name=gpu File=$DIR/gpu[0-1]" >"$ETC/gres.conf"
  mv "$CONF.new" "$CONF"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true; }

start() {
  [ "$(id -u)" -eq 0 ] || die "needs root (installs Debian packages, runs munged, slurmctld and slurmd)"
  mkdir -p "$DIR/state" "$DIR/spool"
  install_packages
  start_munge
  if ! alive "$DIR/slurmctld.pid" || ! alive "$DIR/slurmd.pid"; then
    write_conf
  fi
  if ! alive "$DIR/slurmctld.pid"; then
    # -c: a fresh controller forgets the jobs of an earlier cluster in this folder
    slurmctld -c -f "$CONF" || { log_tail slurmctld "$DIR/slurmctld.log"; die "slurmctld (controller) did not start"; }
  fi
  if ! alive "$DIR/slurmd.pid"; then
    slurmd -f "$CONF" -N "$NODE" || { log_tail slurmd "$DIR/slurmd.log"; die "slurmd (node daemon) did not start"; }
  fi
  local state="" deadline=$(( SECONDS + WAIT_S ))
  while [ $SECONDS -lt $deadline ]; do
    # the daemons write their pid files a moment after forking
    for daemon in slurmctld slurmd; do
      if [ -f "$DIR/$daemon.pid" ] && ! alive "$DIR/$daemon.pid"; then
        log_tail "$daemon" "$DIR/$daemon.log"; die "$daemon exited after starting"
      fi
    done
    state="$(node_state)"
    case "$state" in
      idle|mixed|allocated) echo "[slurm] node $NODE is $state ($CONF)" >&2; return 0 ;;
      drained|draining|drain*|down*)  # left drained or down by an earlier run: give it back
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
      inval*)
        log_tail slurmctld "$DIR/slurmctld.log"
        die "slurmctld rejected node $NODE's registration (sinfo state inval: $(sinfo -h -R -o %E 2>/dev/null)); see $CONF" ;;
    esac
    sleep 0.5
  done
  log_tail slurmctld "$DIR/slurmctld.log"
  log_tail slurmd "$DIR/slurmd.log"
  die "node $NODE not idle after ${WAIT_S} s (sinfo state: '${state:-no answer}')"
}

stop_pid() {
  local name="$1" pidfile="$2" pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 0.1
  done
  echo "[slurm] $name (pid $pid) ignored SIGTERM for 10 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

stop() {
  if alive "$DIR/slurmctld.pid"; then
    scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
    # give slurmd a moment to end the job steps before it goes
    for _ in $(seq 50); do
      [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  stop_pid slurmd "$DIR/slurmd.pid"
  stop_pid slurmctld "$DIR/slurmctld.pid"
  if [ -f "$DIR/munged.ours" ]; then
    stop_pid munged "$DIR/munge/munged.pid"
    rm -f "$DIR/munged.ours"
  fi
  if [ -f "$CONF" ] && [ "$(head -n 1 "$CONF")" = "$MARK" ]; then
    rm -f "$CONF" "$ETC/gres.conf"
  fi
  echo "[slurm] stopped (logs kept in $DIR)" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status)
    alive "$DIR/slurmctld.pid" || die "no slurmctld running from $DIR"
    sinfo -N -o '%N %T %c %m %G' ;;
  *) echo "usage: bash scripts/slurm_cluster.sh start|stop|status" >&2; exit 2 ;;
esac
