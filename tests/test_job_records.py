"""Job records: every job's Snakemake benchmark file holds the job's own CPU time and peak RSS, whether
the job ran through the stage worker (outside Snakemake's process tree) or cold (kn.jobrecord)."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from snakemake.benchmark import BenchmarkRecord, write_benchmark_records

from kn import jobrecord

from .snakemake_runs import REPO, run_snakemake
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
