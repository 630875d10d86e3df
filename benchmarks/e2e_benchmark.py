"""End-to-end benchmark: run the whole DAG from a clean results folder, report time per stage.

    python benchmarks/e2e_benchmark.py                       # default DAG, --cores 2, into benchmarks/out/e2e
    python benchmarks/e2e_benchmark.py --override data.relations=[P101] --target data/stats.json

Snakemake runs from the repository root with ``results_dir`` pointed at a separate folder,
so ``results/`` is never touched. Per-stage numbers come from the ``benchmark:`` file of
every job (``<results_dir>/benchmarks/**.tsv``), attributed to its rule through the job
listing Snakemake prints, and summed per rule; the total is the wall time of the whole
``snakemake`` call (which includes Snakefile parsing and scheduling). Writes
``report.md``, ``report.json`` and ``snakemake.log`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
BENCHMARK_LINE = re.compile(r"^\s+benchmark: (.+)$")


@dataclass
class StageTime:
    """Summed benchmark figures of one rule's jobs (seconds, MB)."""

    rule: str
    jobs: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_mb: float = 0.0
    job_wall_s: list[float] = field(default_factory=list)


def benchmark_rules(log_text: str) -> dict[str, str]:
    """Map each benchmark file path printed in a Snakemake log to the rule of its job."""
    rules: dict[str, str] = {}
    current: str | None = None
    for line in log_text.splitlines():
        header = JOB_HEADER.match(line)
        if header:
            current = header.group(1)
            continue
        bench = BENCHMARK_LINE.match(line)
        if bench and current is not None:
            rules[str(Path(bench.group(1).strip()).resolve())] = current
    return rules


def read_benchmark(path: Path) -> dict[str, float]:
    """The last row of a Snakemake benchmark TSV (one row per repeat; we never repeat)."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: empty benchmark file")
    return {key: _number(value) for key, value in rows[-1].items() if key != "h:m:s"}


def _number(text: str | None) -> float:
    """Benchmark cells are numbers or '-' (not measured, e.g. jobs shorter than the sampling interval)."""
    try:
        return float(text) if text not in (None, "", "-", "NA") else 0.0
    except ValueError:
        return 0.0


def summarise(results_dir: Path, log_text: str) -> list[StageTime]:
    """Per-rule sums over every ``<results_dir>/benchmarks/**.tsv``, slowest rule first."""
    rules = benchmark_rules(log_text)
    stages: dict[str, StageTime] = {}
    for path in sorted((results_dir / "benchmarks").rglob("*.tsv")):
        rule = rules.get(str(path.resolve()), "unattributed")
        row = read_benchmark(path)
        stage = stages.setdefault(rule, StageTime(rule))
        stage.jobs += 1
        stage.wall_s += row.get("s", 0.0)
        stage.cpu_s += row.get("cpu_time", 0.0)
        stage.max_rss_mb = max(stage.max_rss_mb, row.get("max_rss", 0.0))
        stage.job_wall_s.append(row.get("s", 0.0))
    return sorted(stages.values(), key=lambda s: (-s.wall_s, s.rule))


def markdown(stages: Sequence[StageTime], total_wall_s: float, context: dict[str, str]) -> str:
    """The per-stage table plus the total, as the README shows it."""
    lines = [
        "| stage (rule) | jobs | wall s (sum over jobs) | mean s/job | max s/job | CPU s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stages:
        lines.append(
            f"| {s.rule} | {s.jobs} | {s.wall_s:.1f} | {s.wall_s / s.jobs:.1f} | {max(s.job_wall_s):.1f} "
            f"| {s.cpu_s:.1f} | {s.max_rss_mb:.0f} |"
        )
    job_sum = sum(s.wall_s for s in stages)
    lines += [
        f"| **sum of jobs** | {sum(s.jobs for s in stages)} | {job_sum:.1f} | | | {sum(s.cpu_s for s in stages):.1f} | |",
        "",
        f"Total wall time of `snakemake {context['snakemake_args']}`: **{total_wall_s:.1f} s "
        f"({total_wall_s / 60:.1f} min)**, Snakefile parsing and scheduling included; jobs run "
        f"{context['cores']} at a time, so the sum of job times can exceed it.",
        f"Machine: {context['machine']}. Measured {context['date']}.",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    results_dir = args.results_dir.resolve()
    if results_dir == (REPO / "results").resolve():
        raise SystemExit("refusing to benchmark into results/: pass a separate --results-dir")
    if results_dir.exists() and any(results_dir.iterdir()):
        if not args.clean:
            raise SystemExit(f"{results_dir} is not empty; pass --clean to delete it first (the benchmark starts clean)")
        shutil.rmtree(results_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = [f"results_dir={results_dir}", *args.override]
    targets = [str(results_dir / t) for t in args.target]
    command = [sys.executable, "-m", "snakemake", *targets, "--cores", str(args.cores), *args.snakemake_arg,
               "--config", f"overrides={json.dumps(overrides)}"]
    log_path = args.out / "snakemake.log"
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        returncode = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    total = time.perf_counter() - start
    if returncode != 0:
        print(f"snakemake failed (exit {returncode}); see {log_path}", file=sys.stderr)
        return returncode
    stages = summarise(results_dir, log_path.read_text(encoding="utf-8"))
    context = {
        "snakemake_args": " ".join([*args.target, "--cores", str(args.cores), *args.snakemake_arg,
                                    "--config", f"overrides={json.dumps(overrides)}"]),
        "cores": str(args.cores),
        "machine": f"{platform.node()} ({platform.machine()}, {_cpu_count()} CPUs visible)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    report = markdown(stages, total, context)
    (args.out / "report.md").write_text(report, encoding="utf-8")
    (args.out / "report.json").write_text(
        json.dumps({"total_wall_s": total, "stages": [asdict(s) for s in stages], **context}, indent=2) + "\n",
        encoding="utf-8",
    )
    print(report)
    return 0


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "out" / "e2e" / "results")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "e2e")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--clean", action="store_true", help="delete a non-empty --results-dir first")
    parser.add_argument("--override", action="append", default=[], help="Hydra override, e.g. data.relations=[P101]")
    parser.add_argument("--target", action="append", default=[], help="target path relative to the results dir")
    parser.add_argument("--snakemake-arg", action="append", default=[], help="extra Snakemake option (repeatable)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
