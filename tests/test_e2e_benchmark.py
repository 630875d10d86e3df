"""benchmarks/e2e_benchmark.py: per-rule sums of Snakemake benchmark files, and a real (tiny) run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .snakemake_runs import REPO, offline_env

_SPEC = importlib.util.spec_from_file_location("e2e_benchmark", REPO / "benchmarks" / "e2e_benchmark.py")
assert _SPEC is not None and _SPEC.loader is not None
e2e = importlib.util.module_from_spec(_SPEC)
sys.modules["e2e_benchmark"] = e2e  # dataclasses look their module up there
_SPEC.loader.exec_module(e2e)

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(path: Path, seconds: float, rss: float, cpu: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")
    return str(path)


def test_summarise_sums_jobs_per_rule_from_the_log(tmp_path: Path) -> None:
    a = _bench(tmp_path / "benchmarks/data/relations/P101.tsv", 2.5, 100.0, "1.5")
    b = _bench(tmp_path / "benchmarks/data/relations/P19.tsv", 3.5, 140.0, "-")
    c = _bench(tmp_path / "benchmarks/data/ingest.tsv", 1.0, 90.0, "0.5")
    log = (
        f"rule ingest_relation:\n    output: x\n    benchmark: {a}\n    wildcards: relation=P101\n\n"
        f"rule ingest_relation:\n    benchmark: {b}\n\n"
        f"localrule ingest:\n    jobid: 0\n    benchmark: {c}\n\nlocalrule all:\n    jobid: 9\n"
    )
    stages = e2e.summarise(tmp_path, log)
    assert [(s.rule, s.jobs, s.wall_s, s.cpu_s, s.max_rss_mb) for s in stages] == [
        ("ingest_relation", 2, 6.0, 1.5, 140.0),
        ("ingest", 1, 1.0, 0.5, 90.0),
    ]
    table = e2e.markdown(stages, 9.0, {"snakemake_args": "--cores 2", "cores": "2", "machine": "m", "date": "d"})
    assert "| ingest_relation | 2 | 6.0 | 3.0 | 3.5 | 1.5 | 140 |" in table
    assert "| **sum of jobs** | 3 | 7.0 |" in table and "**9.0 s (0.1 min)**" in table


def test_the_nested_planted_study_jobs_count_as_one_row(tmp_path: Path) -> None:
    outer = _bench(tmp_path / "benchmarks/kn-tiny/controls/study.tsv", 10.0, 50.0, "0.5")
    _bench(tmp_path / "kn-tiny/controls/benchmarks/kn-tiny/attributions/P101/000.tsv", 3.0, 300.0, "2.5")
    _bench(tmp_path / "kn-tiny/controls/benchmarks/data/ingest.tsv", 1.0, 100.0, "1.0")
    stages = e2e.summarise(tmp_path, f"rule planted_study:\n    benchmark: {outer}\n")
    assert [(s.rule, s.jobs, s.wall_s, s.cpu_s, s.max_rss_mb) for s in stages] == [
        ("planted_study", 1, 10.0, 0.5, 50.0),
        (e2e.NESTED_RULE, 2, 4.0, 3.5, 300.0),
    ]


def test_a_broken_usage_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_text('{"stage": "probe"}\n{broken\n')
    with pytest.raises(ValueError, match="usage.jsonl:2: not a JSON usage record"):
        e2e.read_usage(path)


def test_unlisted_benchmark_files_are_reported_not_dropped(tmp_path: Path) -> None:
    _bench(tmp_path / "benchmarks/stray.tsv", 4.0, 10.0, "1")
    [stage] = e2e.summarise(tmp_path, "")
    assert (stage.rule, stage.wall_s) == ("unattributed", 4.0)


def test_refuses_a_non_empty_results_dir_without_clean(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty; pass --clean"):
        e2e.run(e2e.parse_args(["--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "out")]))


@pytest.mark.slow
def test_benchmark_runs_snakemake_and_reports_each_rule(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "e2e_benchmark.py"), "--results-dir", str(tmp_path / "results"),
         "--out", str(out), "--cores", "1", "--override", "data.relations=[P101]",
         "--override", "data.max_facts_per_relation=2", "--target", "data/stats.json"],
        cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [(s["rule"], s["jobs"]) for s in sorted(report["stages"], key=lambda s: s["rule"])] == [
        ("ingest", 1), ("ingest_relation", 1)
    ]
    assert all(s["wall_s"] > 0 for s in report["stages"])
    assert report["total_wall_s"] >= max(s["wall_s"] for s in report["stages"])
    assert "| ingest_relation | 1 |" in (out / "report.md").read_text()
    job_cpu = sum(s["cpu_s"] for s in report["stages"])
    assert report["job_cpu_s"] == pytest.approx(job_cpu, abs=0.1)
    assert report["efficiency"] == pytest.approx(job_cpu / (report["total_wall_s"] * 1), abs=1e-3)
    assert report["all_cpu_s"] >= job_cpu  # the scheduler's own CPU comes on top
    usage = [json.loads(line) for line in (out / "worker_usage.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in usage} == {"worker_startup", "ingest", "ingest_relation"}  # the jobs ran in the worker
    for stage in report["stages"]:  # each job's benchmark file holds the worker's record of that job
        served = [r for r in usage if r["stage"] == stage["rule"]]
        assert stage["cpu_s"] == pytest.approx(sum(r["cpu_s"] for r in served), abs=0.01)
        assert stage["max_rss_mb"] == pytest.approx(max(r["max_rss_mb"] for r in served), abs=0.1)
    assert report["all_cpu_s"] >= job_cpu + sum(r["cpu_s"] for r in usage if r["stage"] == "worker_startup") - 0.1
    assert "Parallel efficiency" in (out / "report.md").read_text()
    # the host's speed is measured before the run, so walls from different hosts can be compared
    assert report["matmul_gflops_1_thread"] > 0
    assert report["cpu_model"] and report["cpu_model"] in report["machine"]
