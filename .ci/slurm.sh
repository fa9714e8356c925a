#!/usr/bin/env bash
# A single-node SLURM cluster with accounting for ctxlab's `slurm` tests and for trying
# `launcher=slurm` on one machine: munge, MariaDB, slurmdbd, slurmctld, slurmd.
#
#   bash .ci/slurm.sh start    # installs the Debian packages when missing, starts what is not running,
#                              # then prints `export SLURM_CONF=...` (eval "$(bash .ci/slurm.sh start)")
#   bash .ci/slurm.sh status   # every daemon with its PID; exit 1 when one is down
#   bash .ci/slurm.sh stop     # stops every daemon this script started, by the PID it wrote
#
# State, configs, logs and PID files live in $CTXLAB_SLURM_DIR (default /tmp/ctxlab-slurm).
# Needs root (the daemons run as root/munge/mysql; no systemd here). Accounting matters:
# without slurmdbd, sacct knows nothing and submitit waits for ever on a cancelled job.
# Progress goes to stderr; stdout carries only the export line, so `eval` is safe.
set -euo pipefail

DIR=${CTXLAB_SLURM_DIR:-/tmp/ctxlab-slurm}
CONF=$DIR/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)

say() { echo "[slurm.sh] $*" >&2; }
die() { say "error: $*"; exit 1; }

pid_file() {
  case $1 in
    munged) echo "$DIR/munge/munged.pid" ;;
    mariadb) echo "$DIR/mysqlrun/mysql.pid" ;;
    *) echo "$DIR/$1.pid" ;;
  esac
}

pid_of() {  # the live PID of a daemon this script started, or nothing
  local f pid
  f=$(pid_file "$1")
  [[ -s $f ]] || return 0
  pid=$(tr -dc 0-9 < "$f")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
  return 0
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2
  shift 2
  for _ in $(seq "$((secs * 2))"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "$what did not come up within ${secs}s (logs in $DIR)"
}

install_packages() {
  local missing=()
  local status
  for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]}"
  apt-get update -q >&2
  # postinst scripts create /etc/munge/munge.key; policy-rc.d keeps them from starting services.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

write_configs() {
  local host ncpu mem_mb
  host=$(hostname -s)
  ncpu=$(nproc)
  # Leave 1 GiB to the system; jobs asking for more than this are rejected at submission.
  mem_mb=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
  mkdir -p "$DIR"/{state,spool,mysql,mysqlrun,munge}
  chown mysql:mysql "$DIR/mysql" "$DIR/mysqlrun"
  chown munge:munge "$DIR/munge"
  cat > "$CONF" <<CONF
ClusterName=ctxlab
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# For slurmdbd connections the munge socket is given here, not by AuthInfo.
AccountingStoragePass=$DIR/munge/munge.socket
JobCompType=jobcomp/none
JobRequeue=1
# A requeued job may start again at once (the default holds it back for minutes).
MinJobAge=300
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  cat > "$DIR/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$DIR/slurmdbd.log
PidFile=$DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$DIR/slurmdbd.conf"
}

start_munge() {
  [[ -n $(pid_of munged) ]] && return 0
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [[ -f /etc/munge/munge.key ]] || die "no /etc/munge/munge.key (reinstall the munge package)"
  # Our own socket and PID file, so that a munged started by someone else is left alone.
  runuser -u munge -- /usr/sbin/munged --socket="$DIR/munge/munge.socket" \
    --pid-file="$(pid_file munged)" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/seed" --force
  wait_for 10 munged test -S "$DIR/munge/munge.socket"
}

start_mariadb() {
  [[ -n $(pid_of mariadb) ]] && return 0
  [[ -d $DIR/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir="$DIR/mysql" >/dev/null
  setsid mariadbd --user=mysql --datadir="$DIR/mysql" --socket="$DIR/mysqlrun/mysql.sock" \
    --bind-address=127.0.0.1 --port=3306 --pid-file="$(pid_file mariadb)" \
    --log-error="$DIR/mysqlrun/mysql.err" </dev/null >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb -S "$DIR/mysqlrun/mysql.sock" -e "SELECT 1"
  mariadb -S "$DIR/mysqlrun/mysql.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY
    'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurm() {
  export SLURM_CONF=$CONF  # slurmdbd finds slurmdbd.conf next to it
  if [[ -z $(pid_of slurmdbd) ]]; then
    /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  [[ -n $(pid_of slurmctld) ]] || /usr/sbin/slurmctld
  wait_for 30 slurmctld scontrol ping
  [[ -n $(pid_of slurmd) ]] || /usr/sbin/slurmd
  wait_for 30 "the node" bash -c "sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

cmd_start() {
  [[ $(id -u) == 0 ]] || die "needs root (daemons run as root, munge and mysql)"
  install_packages
  [[ -f $CONF ]] || write_configs
  export MUNGE_SOCKET=$DIR/munge/munge.socket
  start_munge
  start_mariadb
  start_slurm
  say "cluster up: $(sinfo -h -o '%P %D %T %c CPUs')"
  echo "export SLURM_CONF=$CONF"
}

cmd_status() {
  local down=0 pid
  for d in "${DAEMONS[@]}"; do
    pid=$(pid_of "$d")
    if [[ -n $pid ]]; then say "$d running (pid $pid)"; else say "$d stopped"; down=1; fi
  done
  if ((down == 0)); then
    SLURM_CONF=$CONF sinfo >&2
    echo "export SLURM_CONF=$CONF"
  fi
  return $down
}

cmd_stop() {
  local pid
  for d in "${DAEMONS[@]}"; do
    pid=$(pid_of "$d")
    [[ -z $pid ]] && continue
    say "stopping $d (pid $pid)"
    kill "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then say "$d (pid $pid) ignored SIGTERM: SIGKILL"; kill -9 "$pid"; fi
  done
  return 0
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
