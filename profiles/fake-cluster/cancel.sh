#!/usr/bin/env bash
# Fake `scancel` for the cluster-generic executor: stops each job's process group.
set -uo pipefail

for jobdir in "$@"; do
    pid="$(cat "$jobdir/pid" 2>/dev/null)" || continue
    kill -TERM -- "-$pid" 2>/dev/null || true
done
