#!/usr/bin/env bash
# Fake `sbatch` for the cluster-generic executor: runs the jobscript (the last argument)
# as a detached background process on this machine and prints a job id.
# Options before the jobscript (--job-name, --cpus, --mem-mb, --runtime, --gpus) are
# recorded in <job dir>/request so tests can check what a real scheduler would be asked.
# Job state lives in $KN_FAKE_CLUSTER_DIR (default .snakemake/fake-cluster): one folder
# per job holding pid, request, out (stdout+stderr) and rc (exit status, written last).
set -euo pipefail

jobscript="${*: -1}"
if [[ ! -f "$jobscript" ]]; then
    echo "fake-cluster submit: jobscript '$jobscript' (last argument) is not a file" >&2
    exit 2
fi
root="${KN_FAKE_CLUSTER_DIR:-.snakemake/fake-cluster}"
mkdir -p "$root"
jobdir="$(realpath "$(mktemp -d "$root/job.XXXXXXXX")")"
jobid="$(basename "$jobdir")"
printf '%s\n' "${@:1:$#-1}" > "$jobdir/request"
cp "$jobscript" "$jobdir/jobscript.sh"  # Snakemake deletes its copy when the run ends

# setsid: the job gets its own process group, so cancel.sh can stop it and its children,
# and a SIGKILL of the submitting Snakemake does not take the "cluster" job with it.
setsid bash -c 'bash "$1/jobscript.sh" > "$1/out" 2>&1; echo $? > "$1/rc.tmp"; mv "$1/rc.tmp" "$1/rc"' \
    fake-job "$jobdir" < /dev/null > /dev/null 2>&1 &
echo $! > "$jobdir/pid"
echo "$jobdir"
