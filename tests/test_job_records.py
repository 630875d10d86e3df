"""Job records: every job's Snakemake benchmark file holds the job's own CPU time and peak RSS, whether
the job ran through the stage worker (outside Snakemake's process tree) or cold (kn.jobrecord)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from snakemake.benchmark import BenchmarkRecord, write_benchmark_records

from kn import jobrecord

from .snakemake_runs import REPO, offline_env, run_snakemake
from .standins import write_bert_standin

RELATION = "P101"


def _read(path: Path) -> dict[str, str]:
    with open(path, encoding="utf-8", newline="") as handle:
        [row] = list(csv.DictReader(handle, delimiter="\t"))
    return row


def _usage(cpu_s: float, rss: float) -> dict[str, float]:
    return {"exit": 0, "cpu_s": cpu_s, "max_rss_mb": rss, "io_in_mb": 1.5, "io_out_mb": 0.25, "wall_s": 9.0}


def test_the_writer_puts_the_jobs_last_side_record_in_snakemakes_columns(tmp_path: Path) -> None:
    jobrecord.install()
    jobrecord.install()  # once per process, however often the Snakefile is read
    import snakemake.benchmark

    path = tmp_path / "bench" / "job.tsv"
    side = jobrecord.side_path(path)
    jobrecord.append_line(side, _usage(99.0, 1.0))  # a failed earlier run of the same job
    jobrecord.append_line(side, _usage(12.5, 840.0))
    record = BenchmarkRecord(running_time=10.0, max_rss=20.0, cpu_time=0.07)
    record.data_collected = True
    snakemake.benchmark.write_benchmark_records([record], str(path), False)
    row = _read(path)
    assert (row["s"], row["cpu_time"], row["max_rss"], row["mean_load"]) == ("10.00", "12.50", "840.00", "125.00")
    assert (row["max_vms"], row["io_in"], row["io_out"]) == ("-", "1.50", "0.25")
    assert not side.exists()
    untouched = BenchmarkRecord(running_time=2.0, max_rss=20.0, cpu_time=0.5)
    untouched.data_collected = True
    snakemake.benchmark.write_benchmark_records([untouched], str(path), False)  # no side record: Snakemake's own
    assert (_read(path)["cpu_time"], _read(path)["max_rss"]) == ("0.50", "20.00")
    assert write_benchmark_records is not snakemake.benchmark.write_benchmark_records


def test_a_broken_side_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "job.tsv"
    jobrecord.side_path(path).write_text("{broken\n")
    with pytest.raises(ValueError, match=r"job\.tsv\.job\.jsonl: not a job usage line"):
        jobrecord.merge_side_records([BenchmarkRecord()], path)


@pytest.fixture(scope="module")
def heavy_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A BERT stand-in whose weights (~110 MB, mostly a padded 100k-token embedding) dwarf the client's memory."""
    model = write_bert_standin(tmp_path_factory.mktemp("heavy") / "heavy-bert", [RELATION], layers=4, hidden=256,
                               ffn=1024, heads=4, vocab_size=100_000)
    weights_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
    return model, weights_mb


@pytest.mark.slow
@pytest.mark.parametrize("through_worker", [True, False], ids=["worker", "cold"])
def test_an_attribution_jobs_record_holds_its_own_cpu_and_memory(heavy_model, tmp_path, through_worker) -> None:
    model, weights_mb = heavy_model
    folder = tempfile.mkdtemp(prefix="knjr")  # the worker's sockets: a short path
    usage = tmp_path / "usage.jsonl"
    results = tmp_path / "results"
    try:
        run = run_snakemake(
            [results / "heavy-bert" / "attributions" / RELATION / "000.parquet"],
            [f"results_dir={results}", "model=hf", f"model.path={model}", "device=cpu",
             f"data.relations=[{RELATION}]", "study.facts_per_relation=4", "ig.m=20",
             f"data.resources_dir={REPO / 'resources' / 'pararel'}"],
            "--cores", "1", workdir=tmp_path, timeout=600,
            KN_WORKER="1" if through_worker else "0", KN_WORKER_DIR=folder, KN_WORKER_USAGE=str(usage))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    attribute = _read(results / "benchmarks" / "heavy-bert" / "attributions" / RELATION / "000.tsv")
    ingest = _read(results / "benchmarks" / "data" / "relations" / f"{RELATION}.tsv")  # loads no model
    cpu, wall = float(attribute["cpu_time"]), float(attribute["s"])
    assert 1.0 < cpu <= wall * 1.05 + 0.5  # seconds of one-thread IG: the job's CPU, not the client's ~0.1 s
    assert float(attribute["max_rss"]) - float(ingest["max_rss"]) >= weights_mb  # the loaded weights are in it
    assert not list((results / "benchmarks").rglob(f"*{jobrecord.SUFFIX}"))  # every side record was merged
    records = [json.loads(line) for line in usage.read_text().splitlines()] if usage.exists() else []
    served = {r["stage"]: r for r in records}
    if through_worker:  # the server's own record of the job is the one in the benchmark file
        assert float(attribute["cpu_time"]) == pytest.approx(served["attribute"]["cpu_s"], abs=0.006)
        assert float(attribute["max_rss"]) == pytest.approx(served["attribute"]["max_rss_mb"], abs=0.06)
    else:
        assert served == {}  # nothing ran in a server


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_a_cold_job_with_a_record_reports_its_exit_and_dies_with_its_client(tmp_path, broken_patterns) -> None:
    env = offline_env(KN_WORKER="0")
    record = tmp_path / "failing.tsv"
    failing = subprocess.run(
        [sys.executable, "-m", "kn.worker", "--record", str(record), "ingest_relation", "--relation", RELATION,
         f"--out=prompts={tmp_path / 'out.parquet'}", f"data.resources_dir={broken_patterns}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert failing.returncode == 1 and "P101.jsonl:2: malformed JSON line" in failing.stderr
    [line] = [json.loads(text) for text in jobrecord.side_path(record).read_text().splitlines()]
    assert line["exit"] == 1 and line["cpu_s"] > 0 and line["max_rss_mb"] > 0

    out = tmp_path / "never"
    client = subprocess.Popen(  # training 10^6 steps: runs for hours unless stopped
        [sys.executable, "-m", "kn.worker", "--record", str(tmp_path / "train.tsv"), "train_model",
         f"--out=model={out}", f"--out=card={out}.md", f"--out=metrics={out}.json", f"--out=loss={out}.png",
         "model.train.max_steps=1000000", "model.train.target_accuracy=null"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not _children(client.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    [job] = _children(client.pid)
    try:
        time.sleep(2)
        os.kill(client.pid, signal.SIGKILL)  # as Snakemake kills a job's shell
        client.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{job}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{job}").exists() and not out.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(job, signal.SIGKILL)


def test_a_benchmark_file_reads_as_numbers_and_a_bad_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "job.tsv"
    path.write_text("s\th:m:s\tmax_rss\tmax_vms\tcpu_time\n1.0\t0:00:01\t5\t5\t0.5\n2.5\t0:00:02\t840.5\t-\tNA\n")
    assert jobrecord.read_benchmark(path) == {"s": 2.5, "max_rss": 840.5, "max_vms": 0.0, "cpu_time": 0.0}
    path.write_text("s\th:m:s\n")
    with pytest.raises(ValueError, match=r"job\.tsv: no benchmark row with a column 's'"):
        jobrecord.read_benchmark(path)
    path.write_text("s\tcpu_time\n1.0\tlots\n")
    with pytest.raises(ValueError, match=r"job\.tsv: column 'cpu_time' = 'lots' is not a number"):
        jobrecord.read_benchmark(path)
