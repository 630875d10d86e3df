"""Each job's own usage in its Snakemake benchmark file.

Snakemake's ``benchmark:`` file samples the process tree of the job's shell command. A stage run
through :mod:`kn.worker` computes in a process forked from the worker's server, outside that tree, so
the sampled figures are the thin client's (~20 MB, ~0.1 CPU-s); a cold job longer than ~15 s is
sampled every 30 s, so its last CPU seconds go unrecorded. The process that waits for the job knows
its exact usage (``wait4``): the worker's supervisor, or the client itself when the job runs cold.

``python -m kn.worker --record <benchmark file> <stage> ...`` appends that usage as one JSON line to
``<benchmark file>.job.jsonl``. :func:`install` (called by the Snakefile, in every Snakemake process
that runs jobs, cluster nodes included) wraps Snakemake's benchmark writer: when it writes a job's
record it puts the job's CPU seconds, peak RSS, I/O and mean load in place of the sampled ones and
removes the side file. Snakemake's columns and its ``s`` (the job's
wall time as Snakemake saw it) stay; the memory figures it cannot know for the job (VMS, USS, PSS)
become ``-``. A job without a side record keeps Snakemake's own figures. :func:`read_benchmark` is
how the pipeline and its benchmarks read those files back.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

SUFFIX = ".job.jsonl"
NOT_MEASURED = ("", "-", "NA")  # how Snakemake writes a figure it has none of


def read_benchmark(path: str | os.PathLike[str]) -> dict[str, float]:
    """The last row of a Snakemake benchmark file (one row per repeat; the pipeline never repeats) as
    numbers, without ``h:m:s``; a figure that was not measured reads as 0.0."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "s" not in rows[-1]:
        raise ValueError(f"{path}: no benchmark row with a column 's'; expected a Snakemake benchmark file")
    numbers = {}
    for key, text in rows[-1].items():
        if key == "h:m:s":
            continue
        try:
            numbers[key] = 0.0 if text in NOT_MEASURED else float(text)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: column {key!r} = {text!r} is not a number") from None
    return numbers


@dataclass
class RuleUsage:
    """One rule's jobs, summed from their records (seconds, MB)."""

    rule: str
    jobs: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_mb: float = 0.0
    job_wall_s: list[float] = field(default_factory=list)


def per_rule(records: Iterable[tuple[str, dict[str, float]]]) -> list[RuleUsage]:
    """(rule, :func:`read_benchmark` row) pairs summed per rule: the longest rule (summed wall) first."""
    rules: dict[str, RuleUsage] = {}
    for rule, row in records:
        usage = rules.setdefault(rule, RuleUsage(rule))
        usage.jobs += 1
        usage.wall_s += row.get("s", 0.0)
        usage.cpu_s += row.get("cpu_time", 0.0)
        usage.max_rss_mb = max(usage.max_rss_mb, row.get("max_rss", 0.0))
        usage.job_wall_s.append(row.get("s", 0.0))
    return sorted(rules.values(), key=lambda u: (-u.wall_s, u.rule))


def side_path(benchmark: str | os.PathLike[str]) -> Path:
    """Where a job's client leaves its usage for the benchmark writer."""
    return Path(f"{os.fspath(benchmark)}{SUFFIX}")


def append_line(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """One JSON line in one O_APPEND write, so lines of concurrent writers do not interleave."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
    finally:
        os.close(fd)


def read_side_records(benchmark: str | os.PathLike[str], count: int) -> list[dict[str, Any]] | None:
    """The last ``count`` usage lines left for ``benchmark`` (one per repeat of the job, in order), or
    None when fewer were left (earlier lines come from failed runs of the same job)."""
    path = side_path(benchmark)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    if len(lines) < count:
        return None
    try:
        return [json.loads(line) for line in lines[-count:]]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a job usage line ({exc})") from exc


def apply_usage(record: Any, usage: dict[str, Any]) -> None:
    """Put a job's own usage into a ``snakemake.benchmark.BenchmarkRecord`` in Snakemake's units:
    MB, CPU seconds, and ``cpu_usage`` in CPU-percent seconds (Snakemake's mean_load = cpu_usage / s)."""
    record.cpu_time = float(usage["cpu_s"])
    record.cpu_usage = 100.0 * float(usage["cpu_s"])
    record.max_rss = float(usage["max_rss_mb"])
    record.max_vms = record.max_uss = record.max_pss = None  # the client's, not the job's: written as '-'
    record.io_in = float(usage.get("io_in_mb", 0.0))
    record.io_out = float(usage.get("io_out_mb", 0.0))
    record.data_collected = True


def merge_side_records(records: Sequence[Any], benchmark: str | os.PathLike[str]) -> bool:
    """Apply the job's side records to Snakemake's ``records`` for ``benchmark`` and remove the side
    file; False (records untouched) if the job left none."""
    usage = read_side_records(benchmark, len(records))
    if usage is None:
        return False
    for record, line in zip(records, usage):
        apply_usage(record, line)
    side_path(benchmark).unlink(missing_ok=True)
    return True


def install() -> None:
    """Wrap ``snakemake.benchmark.write_benchmark_records`` (once per process) so that it writes each
    job's own usage. Snakemake's local executor imports the writer when a job finishes, so the wrapper
    is what it calls."""
    import snakemake.benchmark as benchmark

    if getattr(benchmark.write_benchmark_records, "kn_job_records", False):
        return
    write = benchmark.write_benchmark_records

    def write_job_records(records: Sequence[Any], path: str, extended_fmt: bool) -> None:
        merge_side_records(records, path)
        write(records, path, extended_fmt)

    write_job_records.kn_job_records = True  # type: ignore[attr-defined]
    benchmark.write_benchmark_records = write_job_records
