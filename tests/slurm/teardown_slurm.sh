#!/usr/bin/env bash
# Stop the test cluster that tests/slurm/setup_slurm.sh started: jobs first (scancel, then wait
# until slurmd has ended them), then slurmd, slurmctld, slurmdbd, MariaDB and munged, each by the
# pid in its pid file. Packages, configs and the accounting database stay, so the next
# setup_slurm.sh only starts the daemons again (a few seconds). Exit 1 if a daemon outlives it.
set -uo pipefail
log() { echo "[teardown_slurm] $*" >&2; }
[ "$(id -u)" = 0 ] || { log "run as root"; exit 1; }

if command -v scancel >/dev/null 2>&1 && scontrol ping >/dev/null 2>&1; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel --full --quiet 2>/dev/null || true
    # slurmd ends the job steps (KillWait=10 s); stopping it earlier would orphan slurmstepd.
    for _ in $(seq 60); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi

left=()
stop() { # name pidfile
    local name=$1 pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill "$pid"
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop; killing it"
            kill -9 "$pid"
            sleep 0.5
            kill -0 "$pid" 2>/dev/null && left+=("$name ($pid)")
        fi
    fi
    rm -f "$pidfile"
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop slurmdbd /run/slurmdbd.pid
stop MariaDB /run/mysqld/mysqld.pid
stop munged /run/munge/munged.pid
if [ ${#left[@]} -gt 0 ]; then
    log "still running: ${left[*]}"
    exit 1
fi
exit 0
