"""profiles/slurm on a live SLURM cluster: a single node started on this machine by scripts/slurm_cluster.sh
(slurmctld, slurmd, munge), jobs submitted by Snakemake's slurm executor plugin with sbatch.

A shrunk study (the organism trained as a SLURM job with a 1-layer, 32-wide recipe; P19 through refine and
evaluate with m=4 and two shards; P101 ingested) runs through ``snakemake --profile profiles/slurm`` while a
local run of the same config runs beside it; one attribution job is scancelled while it runs. Then two
faults on the scheduler: a job over its memory limit, and a node drained mid-run.

Needs root and apt (the script installs slurmctld, slurmd, slurm-client and munge when missing), so it runs
only with KN_SLURM_LIVE=1, as .ci/run does; there a cluster that cannot start fails the test:
    KN_SLURM_LIVE=1 python -m pytest -m slurm tests/test_slurm_live.py
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import pytest
import yaml

from kn.io import read_parquet

from .snakemake_runs import REPO, run_snakemake, start_snakemake

pytestmark = pytest.mark.slurm

LIVE = os.environ.get("KN_SLURM_LIVE") == "1"
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
PROFILE = REPO / "profiles" / "slurm"
NODE, PARTITION = "localhost", "debug"  # as scripts/slurm_cluster.sh names them

OVERRIDES = [
    f"data.resources_dir={REPO / 'resources' / 'pararel'}", "data.relations=[P19,P101]", "data.max_facts_per_relation=4",
    "study.facts_per_relation=4", "ig.m=4", "ig.facts_per_shard=2", "evaluate.bootstrap=50",
    "model.train.num_layers=1", "model.train.hidden_size=32", "model.train.intermediate_size=64", "model.train.num_heads=2",
    "model.train.max_steps=20", "model.train.eval_every=10", "model.train.eval_sample=64", "model.train.threads=1",
]
TARGETS = ["results/kn-tiny/evaluate/P19.parquet", "results/kn-tiny/neurons/P19.parquet"]  # relative to a run's workdir
# The attribution job scancelled mid-run, by the comment the plugin gives a job (its rule and wildcards);
# the study's jobs are those of the local run of the same config (its "Job stats").
CANCELLED = "rule_attribute_wildcards_P19_000"
NODE_MEM_MB = 3000  # the profile's requests are for GPU nodes; two jobs of at most this fit any CI machine
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


def cluster_options(**changes: dict[str, Any]) -> list[str]:
    """The profile's per-rule resources and threads on the command line, fitted to this 2-CPU node (one thread
    per job, at most NODE_MEM_MB), with ``changes`` ({rule: {resource: value}}) on top, and the settings this
    cluster needs: no accounting database (sacct answers "accounting storage is disabled"), so the plugin
    polls squeue, and jobs of seconds, so its first status check comes after 2 s instead of 40."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    resources: dict[str, dict[str, Any]] = {rule: dict(values) for rule, values in profile["set-resources"].items()}
    for values in resources.values():
        values["mem_mb"] = min(values.get("mem_mb", NODE_MEM_MB), NODE_MEM_MB)
    resources["attribute"]["slurm_partition"] = PARTITION  # the profile's SITE partition setting, for real
    for rule, values in changes.items():
        resources.setdefault(rule, {}).update(values)
    return [
        "--profile", str(PROFILE),
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
        "--set-threads", *(f"{rule}=1" for rule in profile.get("set-threads", {})),
        "--set-resources", *(f"{rule}:{key}={value}" for rule, values in resources.items() for key, value in values.items()),
    ]


def slurm(*command: str) -> str:
    """Run a SLURM client command (squeue, scontrol, scancel); its output."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    return result.stdout


def queue() -> list[dict[str, str]]:
    """Every job slurmctld still knows (finished ones for MinJobAge, an hour): id, comment, state, reason."""
    rows = slurm("squeue", "-h", "--states=all", "-o", "%i|%k|%T|%r").splitlines()
    return [dict(zip(("id", "comment", "state", "reason"), row.split("|", 3))) for row in rows]


def job_record(job_id: str) -> dict[str, str]:
    """slurmctld's record of one job (``scontrol show job -o``: Key=Value fields)."""
    fields = slurm("scontrol", "show", "job", "-o", job_id).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def job_stats(log: str) -> Counter[str]:
    """Jobs per rule, from the "Job stats" table Snakemake prints before running."""
    table = log.split("Job stats:\n", 1)[1].split("\ntotal", 1)[0]
    return Counter({rule: int(count) for rule, count in (line.split() for line in table.splitlines()[2:])})


def submissions(log: str) -> list[tuple[str, Path]]:
    """(SLURM job id, SLURM log file) of every job Snakemake submitted, from its output."""
    return [(slurm_id, Path(path)) for _, slurm_id, path in SUBMITTED.findall(log)]


def wait_for(what: str, check: Callable[[], Any], process: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> Any:
    """Poll ``check`` until it returns something truthy; fail if Snakemake exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert process.poll() is None, f"Snakemake exited before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.3)
    return found


def job_in_state(comment: str, states: set[str], exclude: set[str] = frozenset()) -> Callable[[], dict[str, str] | None]:
    return lambda: next((j for j in queue() if j["comment"] == comment and j["state"] in states and j["id"] not in exclude), None)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a Snakemake run that is still going the way a user would, with Ctrl-C (SIGINT): it scancels its
    jobs (on SIGTERM it would wait for them to finish; a SIGKILLed one leaves them queued). SIGKILL to
    its process group after a minute."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def finish(process: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> str:
    """Wait for a run to end (stopping it after ``timeout`` s); its output."""
    try:
        process.wait(timeout=timeout)
    finally:
        stop(process)
    return log.read_text()


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A running single-node cluster: started here (and stopped after) unless one was already up."""
    if not LIVE:
        pytest.skip("live SLURM test: set KN_SLURM_LIVE=1 to start a single-node cluster with "
                    "scripts/slurm_cluster.sh (root, apt-get); .ci/run does")
    already_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, timeout=60).returncode == 0
    if not already_up:
        started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
        if started.returncode != 0:
            subprocess.run(["bash", str(SCRIPT), "stop"], timeout=120, check=False)  # what did start
            pytest.fail(f"scripts/slurm_cluster.sh start failed:\n{started.stdout}{started.stderr[-6000:]}")
    try:
        yield
    finally:
        if not already_up:
            subprocess.run(["bash", str(SCRIPT), "stop"], timeout=120, check=False)


@dataclass
class Study:
    slurm: Path  # the SLURM run's working directory (results/ and .snakemake/ inside)
    local: Path  # the local run's
    log: str  # the SLURM run's Snakemake output
    local_jobs: Counter[str]  # jobs per rule of the local run
    cancelled_id: str  # the attribution job scancelled while it ran
    usage: dict[str, Path]  # per run ("local", "slurm"): where kn.worker's server logs each job it runs
    worker_dirs: dict[str, Path]  # per run: the server's sockets, locks and log


def worker_paths(root: Path, name: str) -> dict[str, str]:
    return {"KN_WORKER_USAGE": str(root / f"{name}-usage.jsonl"), "KN_WORKER_DIR": str(root / f"{name}-worker"),
            "KN_WORKER_IDLE": "5"}


@pytest.fixture(scope="module")
def study(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("slurm-live")
    slurm_dir, local_dir = root / "slurm", root / "local"
    local = start_snakemake(TARGETS, OVERRIDES, "--cores", "1", log=root / "local.log", workdir=local_dir,
                            **worker_paths(root, "local"))
    remote = start_snakemake(TARGETS, OVERRIDES, *cluster_options(), log=root / "slurm.log", workdir=slurm_dir,
                             **worker_paths(root, "slurm"))
    try:
        running = wait_for(f"a running {CANCELLED} job", job_in_state(CANCELLED, {"RUNNING"}), remote, root / "slurm.log")
        slurm("scancel", running["id"])
        log = finish(remote, root / "slurm.log")
        assert remote.returncode == 0, log[-4000:]
        local_log = finish(local, root / "local.log")
        assert local.returncode == 0, local_log[-4000:]
    finally:
        stop(remote)
        stop(local)
    paths = {name: worker_paths(root, name) for name in ("local", "slurm")}
    return Study(slurm_dir, local_dir, log, job_stats(local_log), running["id"],
                 {name: Path(env["KN_WORKER_USAGE"]) for name, env in paths.items()},
                 {name: Path(env["KN_WORKER_DIR"]) for name, env in paths.items()})


def test_every_job_went_through_sbatch_with_the_profiles_resources(study: Study) -> None:
    jobs = submissions(study.log)
    records = {slurm_id: job_record(slurm_id) for slurm_id, _ in jobs}
    # one sbatch job per job of the local run, and a second one for the job cancelled under it
    rules = Counter(r["Comment"].removeprefix("rule_").split("_wildcards_")[0] for r in records.values())
    assert rules == study.local_jobs + Counter(["attribute"]) and study.local_jobs["train_model"] == 1
    for (slurm_id, slurm_log), record in zip(jobs, records.values()):
        rule = record["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        assert record["JobState"] == ("CANCELLED" if slurm_id == study.cancelled_id else "COMPLETED"), record
        assert slurm_log.is_file() and slurm_log.is_relative_to(study.slurm / "results" / "logs" / "slurm"), slurm_log
        assert record["NumCPUs"] == "1" and record["Partition"] == PARTITION, record
        if rule in ("attribute", "evaluate"):  # the profile's GPU rules: gpu: 1 -> sbatch --gpus=1
            assert record["TresPerJob"] == "gres:gpu:1", record
            assert record["TimeLimit"] == "04:00:00" and record["MinMemoryNode"] == f"{NODE_MEM_MB}M", record
        else:
            assert "TresPerJob" not in record or "gpu" not in record["TresPerJob"], record
    # the GPU jobs saw the card SLURM gave them; the stages ran on the CPU (no CUDA behind the stand-ins)
    attribution_log = (study.slurm / "results/logs/kn-tiny/attributions/P19/001.log").read_text()
    assert "device cpu" in attribution_log


def test_cancelled_attribution_job_is_retried_and_nothing_finished_reruns(study: Study) -> None:
    assert f"SLURM-job '{study.cancelled_id}' failed, SLURM status is: 'CANCELLED'" in study.log
    # each other job was submitted once: the retry reran the cancelled shard alone
    submitted = Counter(job_record(slurm_id)["Comment"] for slurm_id, _ in submissions(study.log))
    assert {comment: n for comment, n in submitted.items() if n > 1} == {CANCELLED: 2}
    total = sum(study.local_jobs.values())
    assert f"{total} of {total} steps (100%) done" in study.log


def _final_files(results: Path) -> list[Path]:
    skip = {"logs", "benchmarks"}
    return sorted(p.relative_to(results) for p in results.rglob("*")
                  if p.is_file() and not skip & set(p.relative_to(results).parts) and not p.name.startswith("."))


def _without_timings(metrics: dict) -> dict:
    metrics["training"].pop("wall_seconds")
    for evaluation in metrics["training"]["evaluations"]:
        evaluation.pop("seconds")
    return metrics


def test_slurm_run_equals_local_run(study: Study) -> None:
    remote, local = study.slurm / "results", study.local / "results"
    names = _final_files(local)
    assert _final_files(remote) == names
    assert {n.suffix for n in names} >= {".parquet", ".safetensors", ".json"}
    for name in names:
        if name.suffix == ".parquet":  # the tables, and their provenance (same results_dir: both are relative)
            pd.testing.assert_frame_equal(read_parquet(remote / name), read_parquet(local / name), check_exact=True)
            assert (remote / name).read_bytes() == (local / name).read_bytes(), name
        elif name.name == "metrics.json":  # the organism's training record: the same but for wall times
            ours, theirs = (json.loads((d / name).read_text()) for d in (remote, local))
            assert _without_timings(ours) == _without_timings(theirs)
        else:  # weights, tokenizer, model card, neuron sets, loss plot
            assert (remote / name).read_bytes() == (local / name).read_bytes(), name


def test_worker_stays_off_in_slurm_jobs(study: Study) -> None:
    # Locally every stage job ran in the warm worker, which logs each job's usage (it exits after KN_WORKER_IDLE
    # seconds idle, so a pause of the loaded machine can start it again); in SLURM jobs (SLURM_JOB_ID set)
    # kn.worker ran each job cold: no usage line, no server, no socket folder.
    local_stages = Counter(json.loads(line)["stage"] for line in study.usage["local"].read_text().splitlines())
    assert local_stages.pop("worker_startup") >= 1 and local_stages.total() == study.local_jobs.total()
    assert study.worker_dirs["local"].is_dir()
    assert not study.usage["slurm"].exists() and not study.worker_dirs["slurm"].exists()


def test_job_over_its_memory_limit_fails_naming_the_rule_and_the_limit(study: Study) -> None:
    # probe is not part of the study: its one job imports torch (~450 MB) under a 300 MB limit
    limit_mb = 300
    result = run_snakemake(["results/kn-tiny/probe/P19.parquet"], OVERRIDES,
                           *cluster_options(probe={"mem_mb": limit_mb}), "--retries", "0", workdir=study.slurm)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    [(slurm_id, slurm_log)] = submissions(output)
    assert "Error in rule probe:" in output and f"SLURM-job '{slurm_id}' failed, SLURM status is: 'FAILED'" in output
    assert str(slurm_log) in output  # the error points to the SLURM log, which names the limit
    assert re.search(rf"StepId={slurm_id}\.\d+ exceeded memory limit \(\d+ > {limit_mb * 2**20}\), being killed",
                     slurm_log.read_text()), slurm_log.read_text()[-3000:]
    assert job_record(slurm_id)["JobState"] == "FAILED"
    assert not (study.slurm / "results/kn-tiny/probe/P19.parquet").exists()


def test_drained_node_holds_the_run_which_resumes_keeping_finished_shards(study: Study) -> None:
    """P101's two shards one at a time (--jobs 1): drain the node while the first runs; it completes and the
    second waits in the queue; stop Snakemake with Ctrl-C (it cancels the waiting job); resume the node and
    rerun the same command: the finished shard is kept as it was, the other is computed."""
    workdir, log = study.slurm, study.slurm.parent / "drain.log"
    comments = {f"rule_attribute_wildcards_P101_00{k}": k for k in (0, 1)}
    files = {k: [workdir / f"results/kn-tiny/attributions/P101/00{k}{suffix}" for suffix in (".parquet", ".prompts.parquet")]
             for k in (0, 1)}
    target = ["results/kn-tiny/neurons/P101.parquet"]
    process = start_snakemake(target, OVERRIDES, *cluster_options(), "--jobs", "1", log=log, workdir=workdir)
    try:
        first = wait_for("a running P101 shard",
                         lambda: next((j for j in queue() if j["comment"] in comments and j["state"] == "RUNNING"), None),
                         process, log)
        slurm("scontrol", "update", f"nodename={NODE}", "state=drain", "reason=kn live test")
        held = wait_for("the other shard held by the drained node",
                        lambda: next((j for j in queue() if j["comment"] in comments and j["comment"] != first["comment"]
                                      and j["state"] == "PENDING" and "DRAINED" in j["reason"]), None),
                        process, log)
        assert job_record(first["id"])["JobState"] == "COMPLETED"  # a draining node lets running jobs finish
        time.sleep(5)
        assert process.poll() is None and job_record(held["id"])["JobState"] == "PENDING"  # Snakemake waits
        finished = files[comments[first["comment"]]]
        kept = {path: fingerprint(path) for path in finished}
        stop(process)  # the user gives up on the drained cluster
        assert job_record(held["id"])["JobState"] == "CANCELLED", log.read_text()[-3000:]  # Snakemake cancelled it
    finally:
        stop(process)
        slurm("scontrol", "update", f"nodename={NODE}", "state=resume")
    # the documented way back: the same command (the profile sets rerun-incomplete)
    rerun = run_snakemake(target, OVERRIDES, *cluster_options(), workdir=workdir, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    assert {path: fingerprint(path) for path in finished} == kept  # the finished shard, untouched
    resubmitted = Counter(job_record(i)["Comment"] for i, _ in submissions(rerun.stdout + rerun.stderr))
    assert resubmitted == Counter([held["comment"], "rule_refine_wildcards_P101"])
    assert all(path.is_file() for paths in files.values() for path in paths) and (workdir / target[0]).is_file()
