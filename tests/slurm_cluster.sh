#!/usr/bin/env bash
# Throw-away single-node SLURM cluster (munge + MariaDB + slurmdbd + slurmctld + slurmd),
# all state under $BASE. Tested on Debian 12 (slurm-wlm 22.05.8, munge 0.5.15,
# MariaDB 10.11), as root, in a gVisor container without systemd / usable cgroups.
#
#   bash tests/slurm_cluster.sh          # install (if needed) + start; prints the SLURM_CONF export
#   bash tests/slurm_cluster.sh stop     # stop the daemons it started (by their PID files)
#   ACCOUNTING=0 bash tests/slurm_cluster.sh   # no MariaDB/slurmdbd; sacct then fails, see note below
#
# Why accounting: submitit polls job state with `sacct`. Without it, a job that dies
# without writing its result pickle (scancel, time limit, os._exit, OOM) makes the
# Hydra sweep wait forever. Jobs that raise Python exceptions are fine either way.
#
# Clients (sinfo/srun/sbatch/sacct, hence submitit) need:  export SLURM_CONF=$BASE/etc/slurm.conf
set -euo pipefail

BASE=${BASE:-/tmp/slurmtest}
ACCOUNTING=${ACCOUNTING:-1}
CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF          # slurmdbd also finds slurmdbd.conf next to it via this
MUNGE_SOCK=$BASE/munge/munge.socket.2
DB_PORT=3307

stop() {   # reverse start order; each daemon wrote its own PID file
  for f in $BASE/run/slurmd.pid $BASE/run/slurmctld.pid $BASE/run/slurmdbd.pid \
           $BASE/mysql/mysqld.pid $BASE/munge/munged.pid; do
    if [ -s "$f" ]; then
      pid=$(cat "$f"); kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$f"
    fi
  done
}
wait_for() {  # wait_for <seconds> <command...>
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "timeout waiting for: $*" >&2; return 1
}
if [ "${1:-}" = stop ]; then stop; exit 0; fi

# ---- 1. packages (--no-install-recommends: 8 pkgs/13 MB, +8 pkgs/48 MB for accounting)
PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCOUNTING" = 1 ] && PKGS="$PKGS slurmdbd slurm-wlm-mysql-plugin mariadb-server-core"
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PKGS
fi

mkdir -p $BASE/etc $BASE/state $BASE/spool/slurmd $BASE/run $BASE/log $BASE/munge $BASE/mysql/data
chmod 755 $BASE $BASE/munge      # munged rejects group/world-writable dirs; socket dir needs o+x

# ---- 2. munge with its own key/socket/pid/log/seed (nothing in /etc/munge or /run/munge)
[ -s $BASE/munge/munge.key ] || mungekey --create --keyfile=$BASE/munge/munge.key
chmod 400 $BASE/munge/munge.key
munged --force --key-file=$BASE/munge/munge.key --socket=$MUNGE_SOCK \
  --pid-file=$BASE/munge/munged.pid --log-file=$BASE/munge/munged.log \
  --seed-file=$BASE/munge/munged.seed
munge -n -S $MUNGE_SOCK | unmunge -S $MUNGE_SOCK >/dev/null     # sanity check

# ---- 3. config
HOST=$(hostname -s)
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
NCPU=$(nproc)
if [ "$ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
AccountingStoragePort=6819
AccountingStoragePass=$MUNGE_SOCK"   # = munge socket for dbd connections (sacct, sacctmgr)
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi
cat > $CONF <<EOF
ClusterName=testcluster
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024                 # jobs without --mem would otherwise take the whole node's memory
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$HOST CPUs=$NCPU RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# ---- 4. accounting: MariaDB (empty datadir, --skip-grant-tables, localhost only) + slurmdbd
if [ "$ACCOUNTING" = 1 ]; then
  : > $BASE/mysql/error.log                          # so the readiness grep sees only this start
  setsid mariadbd --no-defaults --user=root --datadir=$BASE/mysql/data \
    --socket=$BASE/mysql/mysqld.sock --pid-file=$BASE/mysql/mysqld.pid \
    --bind-address=127.0.0.1 --port=$DB_PORT --skip-grant-tables \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --log-error=$BASE/mysql/error.log </dev/null >/dev/null 2>&1 &
  wait_for 60 grep -q 'ready for connections' $BASE/mysql/error.log
  cat > $BASE/etc/slurmdbd.conf <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$HOST
DbdPort=6819
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 $BASE/etc/slurmdbd.conf                  # slurmdbd insists on 600
  slurmdbd
  wait_for 30 sacctmgr -n list cluster
  sacctmgr -i add cluster testcluster >/dev/null 2>&1 || true   # already there on restart
fi

# ---- 5. slurmctld + slurmd (they daemonize and write their PID files)
slurmctld -f $CONF
slurmd -f $CONF
wait_for 60 bash -c "sinfo -h -o %T | grep -q '^idle'"
sinfo
echo "export SLURM_CONF=$CONF"
