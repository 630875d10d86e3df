#!/usr/bin/env bash
# Fake `sacct` for the cluster-generic executor: prints running, success or failed for
# the job id (the job's state folder) that submit.sh printed.
set -euo pipefail

jobdir="$1"
pid="$(cat "$jobdir/pid" 2>/dev/null || true)"
# Check liveness before reading rc: rc is written before the job exits, so a dead job
# without rc was killed. A zombie (state Z, e.g. under a non-reaping PID 1) is dead.
if [[ -n "$pid" ]] && state="$(ps -o stat= -p "$pid" 2>/dev/null)" && [[ "$state" != Z* ]]; then
    echo running
elif [[ -f "$jobdir/rc" ]] && [[ "$(cat "$jobdir/rc")" == 0 ]]; then
    echo success
else
    echo failed
fi
