#!/usr/bin/env bash
# Stop the test cluster that tests/slurm/setup_slurm.sh started: slurmd, slurmctld, slurmdbd,
# MariaDB, munged, each by the pid in its pid file. Packages, configs and the accounting database
# stay, so the next setup_slurm.sh only starts the daemons again (a few seconds).
# Running jobs are cancelled first.
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "[teardown_slurm] run as root" >&2; exit 1; }

if command -v scancel >/dev/null 2>&1 && scontrol ping >/dev/null 2>&1; then
    scancel --full --quiet --user=root 2>/dev/null || true
fi

stop() { # name pidfile
    local name=$1 pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        echo "[teardown_slurm] stopping $name (pid $pid)" >&2
        kill "$pid"
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { echo "[teardown_slurm] $name did not stop; killing it" >&2; kill -9 "$pid"; }
    fi
    rm -f "$pidfile"
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop slurmdbd /run/slurmdbd.pid
stop MariaDB /run/mysqld/mysqld.pid
stop munged /run/munge/munged.pid
exit 0
