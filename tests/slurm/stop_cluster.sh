#!/usr/bin/env bash
# Stop the test cluster's daemons by the PIDs in their pid files.
set -u
state=${SLURM_TEST_STATE:-/tmp/lora-study-slurm}
for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid" /run/munge/munged.pid; do
    if [[ -s "$pidfile" ]]; then
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$pidfile"
    fi
done
