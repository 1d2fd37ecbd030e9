#!/usr/bin/env bash
# Throwaway SLURM cluster on localhost for CI and tests (Debian 12, root, no systemd).
# Adapted from the workplace's shared/tools/slurm-localhost.sh; the project carries its own copy.
#   bash setup.sh [up|down|status]         (default: up; "up" is idempotent)
# Env knobs:
#   SLURM_CI_DIR=/tmp/slurm-ci   state, spool, logs, pid files, config
#   SLURM_CI_NODES=1             >1 => n1..nN, one slurmd per "node", all on 127.0.0.1, own ports
#   SLURM_CI_CPUS=$(nproc)       CPUs per node; more than nproc => SlurmdParameters=config_overrides
#   SLURM_CI_SACCT=0             1 => also MariaDB + slurmdbd so that sacct works
# Afterwards: export SLURM_CONF=$SLURM_CI_DIR/etc/slurm.conf (also symlinked to /etc/slurm/slurm.conf).
set -euo pipefail
BASE=${SLURM_CI_DIR:-/tmp/slurm-ci}
NODES=${SLURM_CI_NODES:-1}
CPUS=${SLURM_CI_CPUS:-$(nproc)}
SACCT=${SLURM_CI_SACCT:-0}
CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF
DBPORT=13306
log() { echo "[slurm-ci] $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { # wait_for SECONDS CMD...
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { log "timeout waiting for: $*"; return 1; }
    sleep 0.2
  done
}
node_names() { if [ "$NODES" -eq 1 ]; then echo localhost; else seq -f 'n%g' 1 "$NODES"; fi; }
stop_pidfile() {
  local f=$1 p
  alive "$f" || { rm -f "$f"; return 0; }
  p=$(cat "$f"); kill "$p"
  for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  rm -f "$f"
}

install_pkgs() {
  local want="slurmctld slurmd slurm-client munge" missing="" p
  [ "$SACCT" = 1 ] && want="$want slurmdbd mariadb-server"
  for p in $want; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  log "apt-get install$missing"
  apt-get update -qq
  # postinst "invoke-rc.d ... start" is refused or a no-op without systemd; we start daemons ourselves
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 700 /etc/munge
    mungekey --create --force
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  cp /run/munge/munged.pid "$BASE/run/munged.pid"   # we started it, so "down" stops it
  wait_for 10 sh -c 'munge -n | unmunge'
}

write_conf() {
  local mem_total mem n i=0
  mem_total=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
  mem=$((mem_total * 8 / 10 / NODES))
  {
    cat <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd-%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
EOF
    if [ "$SACCT" = 1 ]; then
      echo "JobAcctGatherType=jobacct_gather/linux"
      echo "AccountingStorageType=accounting_storage/slurmdbd"
      echo "AccountingStorageHost=localhost"
    else
      echo "JobAcctGatherType=jobacct_gather/none"
      echo "AccountingStorageType=accounting_storage/none"
    fi
    [ "$CPUS" -gt "$(nproc)" ] && echo "SlurmdParameters=config_overrides"
    for n in $(node_names); do
      i=$((i + 1))
      echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$CONF.new"
  mv "$CONF.new" "$CONF"
  mkdir -p /etc/slurm
  if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
    ln -sfn "$CONF" /etc/slurm/slurm.conf   # so client tools work without SLURM_CONF
  fi
  echo "export SLURM_CONF=$CONF" > "$BASE/env.sh"
}

start_db() {
  local sock=$BASE/mysqld/mysqld.sock   # mariadbd runs as mysql: socket/pid dir must be mysql-owned
  install -d -o mysql -g mysql "$BASE/mysqld"
  if ! alive "$BASE/mysqld/mysqld.pid"; then
    if [ ! -d "$BASE/mysql/mysql" ]; then
      install -d -o mysql -g mysql "$BASE/mysql"
      mariadb-install-db --user=mysql --datadir="$BASE/mysql" --auth-root-authentication-method=socket \
        --skip-test-db > "$BASE/log/mariadb-install.log" 2>&1
    fi
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$BASE/mysql" --socket="$sock" \
      --pid-file="$BASE/mysqld/mysqld.pid" --bind-address=127.0.0.1 --port=$DBPORT \
      --innodb-buffer-pool-size=128M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 \
      > "$BASE/log/mariadb.log" 2>&1 < /dev/null &
    wait_for 30 mariadb --socket="$sock" -e 'select 1'
  fi
  mariadb --socket="$sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"
  alive "$BASE/run/slurmdbd.pid" || slurmdbd        # reads slurmdbd.conf next to $SLURM_CONF
  wait_for 30 sacctmgr -n show cluster
  sacctmgr -n -P show cluster format=cluster | grep -qx ci || sacctmgr -i add cluster ci >/dev/null
}

up() {
  local n
  install_pkgs
  mkdir -p "$BASE"/{etc,state,run,log}
  for n in $(node_names); do mkdir -p "$BASE/spool/slurmd-$n"; done
  start_munge
  if alive "$BASE/run/slurmctld.pid" && sinfo -h >/dev/null 2>&1; then
    log "already running"; sinfo; return 0
  fi
  write_conf
  [ "$SACCT" = 1 ] && start_db
  rm -rf "${BASE:?}/state/"*                        # fresh controller state every bring-up
  slurmctld -c
  for n in $(node_names); do alive "$BASE/run/slurmd-$n.pid" || slurmd -N "$n"; done
  wait_for 30 sh -c '[ "$(sinfo -h -N -o %T | grep -cE "^(idle|mixed|allocated)")" -eq '"$NODES"' ]' \
    || { sinfo -N; tail -n 20 "$BASE"/log/*.log; return 1; }
  srun -N "$NODES" -t 1 true                        # smoke test: a real job step on every node
  sinfo -N
  log "up; export SLURM_CONF=$CONF  (or: source $BASE/env.sh)"
}

down() {
  local f
  for f in "$BASE"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
  stop_pidfile "$BASE/run/slurmctld.pid"
  stop_pidfile "$BASE/run/slurmdbd.pid"
  stop_pidfile "$BASE/mysqld/mysqld.pid"
  stop_pidfile "$BASE/run/munged.pid"
  log "down"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) sinfo -N; squeue ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 2 ;;
esac
