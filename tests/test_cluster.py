"""The cluster path (profiles/fake-cluster: cluster-generic executor, jobs as background processes)
produces the same results as a local run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kn.io import read_parquet

from .snakemake_runs import REPO, run_snakemake

pytestmark = pytest.mark.slow

RELATIONS = ["P101", "P19"]
SUBSET = [f"data.relations=[{','.join(RELATIONS)}]", "data.max_facts_per_relation=3"]


def _stats_without_provenance(path: Path) -> dict:
    stats = json.loads(path.read_text())
    stats.pop("provenance")  # names results_dir, which differs between the two runs
    return stats


def test_fake_cluster_run_equals_local_run(tmp_path: Path) -> None:
    cluster_dir, jobs_dir, local_dir = tmp_path / "cluster", tmp_path / "jobs", tmp_path / "local"
    target = "data/stats.json"
    remote = run_snakemake(
        [cluster_dir / target], [f"results_dir={cluster_dir}", *SUBSET],
        "--profile", str(REPO / "profiles" / "fake-cluster"), KN_FAKE_CLUSTER_DIR=str(jobs_dir),
    )
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = run_snakemake([local_dir / target], [f"results_dir={local_dir}", *SUBSET], "--cores", "1")
    assert local.returncode == 0, local.stderr[-3000:]

    # Every job went through submit.sh with the resources a scheduler would be asked for.
    requests = sorted((job / "request").read_text().split() for job in jobs_dir.glob("job.*"))
    assert [r[0] for r in requests] == ["--job-name=ingest", "--job-name=ingest_relation", "--job-name=ingest_relation"]
    assert all("--mem-mb=2000" in r and "--runtime=30" in r and "--gpus=0" in r for r in requests)
    assert all((job / "rc").read_text().strip() == "0" for job in jobs_dir.glob("job.*"))

    for name in ["data/prompts.parquet", "data/facts.parquet", *(f"data/relations/{r}.parquet" for r in RELATIONS)]:
        pd.testing.assert_frame_equal(read_parquet(cluster_dir / name), read_parquet(local_dir / name), check_exact=True)
    assert _stats_without_provenance(cluster_dir / target) == _stats_without_provenance(local_dir / target)
    assert len(read_parquet(cluster_dir / "data/facts.parquet")) == 6
    # Each remote job's own Snakemake wrote the job's usage into its benchmark file (kn.jobrecord).
    records = [pd.read_csv(path, sep="\t").iloc[-1] for path in (cluster_dir / "benchmarks").rglob("*.tsv")]
    assert len(records) == 3 and all(r["max_vms"] == "-" and r["cpu_time"] > 0 for r in records)
    assert not list((cluster_dir / "benchmarks").rglob("*.jsonl"))
