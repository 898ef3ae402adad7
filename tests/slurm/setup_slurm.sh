#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for testing the pipeline's SLURM profile
# (tests/test_slurm.py). Run as root on Debian 12 with only the package registry reachable:
#
#   tests/slurm/setup_slurm.sh          # install (first time), configure, start, wait until idle
#   tests/slurm/teardown_slurm.sh       # stop the daemons again
#
# What it builds (Debian's packages: slurm-wlm 22.05, slurmdbd, munge, mariadb-server):
#   munged (as user munge) -> MariaDB -> slurmdbd -> slurmctld -> slurmd, all on 127.0.0.1.
#   One node (this machine's hostname) with its real CPU count (from `slurmd -C`) and at least
#   SLURM_MIN_MEMORY_MB (default 32000) of memory,
#   two partitions on it, `cpu` (the default) and `gpu`, like a site with separate GPU nodes, and
#   SLURM_FAKE_GPUS (default 2) fake "a100" GPUs as GRES, so that --gpus=a100:2 requests are
#   scheduled and allocated for real (one task, CUDA_VISIBLE_DEVICES=0,1) although the machine has
#   no GPU: nothing runs on them. Accounting goes to slurmdbd, so `sacct` works; that is the status
#   command snakemake-executor-plugin-slurm uses by default (without accounting it never notices
#   that a job finished).
#
# Idempotent: when the cluster is already up (node idle/mixed/allocated, sacct answering) it
# prints the state and exits; daemons that are not running are (re)started; the config files are
# rewritten only when their content changes (a changed slurm.conf restarts slurmctld and slurmd).
# Environment: SLURM_FAKE_GPUS (0 = no GRES), SLURM_MIN_MEMORY_MB, SLURM_SETUP_TIMEOUT (seconds to
# wait, default 120).
set -euo pipefail

FAKE_GPUS=${SLURM_FAKE_GPUS:-2}
TIMEOUT=${SLURM_SETUP_TIMEOUT:-120}
MIN_MEM_MB=${SLURM_MIN_MEMORY_MB:-32000}
CLUSTER=localcluster
NODE=$(hostname -s)
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
FAKE_GPU_DIR=/var/lib/slurm-fake-gpus
DB_PASS=slurm-local-test   # a throwaway MariaDB user reachable only on this machine

log() { echo "[setup_slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# Exit 2: this machine cannot host the test cluster (tests/test_slurm.py skips then); 1: it failed.
unsupported() { log "UNSUPPORTED: $*"; exit 2; }

[ "$(id -u)" = 0 ] || unsupported "run as root (it installs packages and starts daemons)"
HEADER="# Written by tests/slurm/setup_slurm.sh"
if [ -f "$CONF_DIR/slurm.conf" ] && [ "$(head -c ${#HEADER} "$CONF_DIR/slurm.conf")" != "$HEADER" ]; then
    unsupported "$CONF_DIR/slurm.conf belongs to another SLURM installation; not touching it"
fi
start_time=$(date +%s)

# An already running cluster: nothing to do.
# Compact state (idle, mix, alloc; a suffix such as idle* means not responding).
node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1; }
cluster_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    case "$(node_state)" in idle | mix | alloc | comp) ;; *) return 1 ;; esac
    sacct -n -X -S now-1minutes >/dev/null 2>&1
}

# 1. Packages (about 10-20 s with a fresh apt cache).
pkgs=(slurm-wlm slurmdbd munge mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || unsupported "no apt-get to install ${missing[*]} (Debian only)"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
        unsupported "apt-get could not install ${missing[*]}"
fi

# 2. Config files (rewritten only on change).
changed_conf=0
write_if_changed() { # path mode owner < content
    local path=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        return 1
    fi
    install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$path"
    rm -f "$tmp"
    return 0
}

read -r cpus mem < <(slurmd -C | awk '/^NodeName/ {for (i=1;i<=NF;i++) {split($i,a,"="); v[a[1]]=a[2]} print v["CPUs"], v["RealMemory"]}')
[ -n "$cpus" ] && [ -n "$mem" ] || die "slurmd -C did not report CPUs and RealMemory"
# The node advertises at least MIN_MEM_MB (config_overrides lets slurmd accept more than it has):
# the profile asks for study-sized memory on some CPU rules (convert_weights 16 GB), which a small
# CI runner must still schedule. Nothing enforces memory here (no cgroups); demo jobs use < 1 GB.
[ "$mem" -ge "$MIN_MEM_MB" ] || mem=$MIN_MEM_MB
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld
chown munge:munge /run/munge
chown mysql:mysql /run/mysqld

node_gres=""
if [ "$FAKE_GPUS" -gt 0 ]; then
    mkdir -p "$FAKE_GPU_DIR"
    # SLURM wants character devices; these have /dev/null's numbers, so nothing real is behind them.
    for ((i = 0; i < FAKE_GPUS; i++)); do
        f="$FAKE_GPU_DIR/nvidia$i"
        [ -c "$f" ] || { rm -f "$f"; mknod -m 666 "$f" c 1 3; }
    done
    node_gres="Gres=gpu:a100:$FAKE_GPUS"
    write_if_changed "$CONF_DIR/gres.conf" 644 root:root <<EOF && changed_conf=1 || true
# Fake GPUs for testing only: null devices stand in for /dev/nvidiaN. SLURM schedules and
# allocates them (setting CUDA_VISIBLE_DEVICES); there is no hardware behind them.
AutoDetect=off
NodeName=$NODE Name=gpu Type=a100 File=$FAKE_GPU_DIR/nvidia[0-$((FAKE_GPUS - 1))]
EOF
else
    rm -f "$CONF_DIR/gres.conf"
fi

write_if_changed "$CONF_DIR/slurm.conf" 644 root:root <<EOF && changed_conf=1 || true
$HEADER: a single-node test cluster on localhost.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Finished jobs stay visible to squeue for 5 minutes (the plugin's fallback status command).
MinJobAge=300
KillWait=10
InactiveLimit=0
Waittime=0
# Accounting: slurmdbd (MariaDB), so that sacct works.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# Keep sbatch --comment (the plugin writes rule_<rule>_wildcards_<...> there) in the database.
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $node_gres State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF

changed_dbd=0
write_if_changed "$CONF_DIR/slurmdbd.conf" 600 root:root <<EOF && changed_dbd=1 || true
# Written by tests/slurm/setup_slurm.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

write_if_changed /etc/mysql/mariadb.conf.d/90-slurm-test.cnf 644 root:root <<EOF || true
# Small footprint for the test cluster's accounting database (tests/slurm/setup_slurm.sh).
[mysqld]
bind-address = 127.0.0.1
innodb_buffer_pool_size = 64M
innodb_use_native_aio = 0
innodb_lock_wait_timeout = 900
performance_schema = OFF
EOF

# An already running cluster with unchanged configuration: nothing to do.
if [ "$changed_conf$changed_dbd" = 00 ] && cluster_up; then
    log "already up: $(sinfo -h -o '%P %a %D %t %N %G' | tr '\n' ';')"
    exit 0
fi

# 3. Daemons, each started only when it is not running.
running() { # pidfile
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}
wait_for() { # description, command...
    local what=$1 deadline=$(($(date +%s) + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${TIMEOUT}s waiting for $what"
        sleep 1
    done
}
stop_pidfile() { # pidfile
    if running "$1"; then
        kill "$(cat "$1")"
        for _ in $(seq 30); do running "$1" || break; sleep 0.5; done
    fi
    rm -f "$1"
}

if ! running /run/munge/munged.pid; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
fi
wait_for munge sh -c 'munge -n | unmunge'

if ! running /run/mysqld/mysqld.pid; then
    log "starting MariaDB"
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    # exec: no shell stays behind holding the caller's stdout (a pipe would never close).
    (cd / && exec setsid /usr/sbin/mariadbd --user=mysql) >"$LOG_DIR/mariadb.log" 2>&1 </dev/null &
fi
wait_for MariaDB mariadb -e "SELECT 1"
mariadb <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

[ "$changed_dbd" = 0 ] || stop_pidfile /run/slurmdbd.pid
if ! running /run/slurmdbd.pid; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
fi
wait_for slurmdbd sacctmgr -n list cluster
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
# (slurmdbd creates user root with account root; other users submit without an association.)

if [ "$changed_conf" = 1 ]; then
    # A new slurm.conf: restart what already runs with the old one.
    stop_pidfile /run/slurmd.pid
    stop_pidfile /run/slurmctld.pid
fi
if ! running /run/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
wait_for slurmctld scontrol ping
if ! running /run/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

deadline=$(($(date +%s) + TIMEOUT))
until cluster_up; do
    state=$(node_state || true)
    case "$state" in
    drain* | drng* | down* | fail* | inval*)
        # e.g. left down by an earlier slurmd with another config: bring it back once.
        log "node state '$state'; resuming it"
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        sinfo -R >&2 || true
        tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
        die "node $NODE not idle after ${TIMEOUT}s"
    fi
    sleep 1
done
log "up in $(($(date +%s) - start_time)) s: $(sinfo -h -o '%P %a %D %t %N %G' | tr '\n' ';')"
