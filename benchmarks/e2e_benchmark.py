"""End-to-end benchmark: run the whole DAG from a clean results folder, report time per stage.

    python benchmarks/e2e_benchmark.py                       # default DAG, --cores 2, into benchmarks/out/e2e
    python benchmarks/e2e_benchmark.py --override data.relations=[P101] --target data/stats.json

Snakemake runs from the repository root with ``results_dir`` pointed at a separate folder,
so ``results/`` is never touched. Per-stage numbers come from the ``benchmark:`` file of
every job (``<results_dir>/benchmarks/**.tsv``), attributed to its rule through the job
listing Snakemake prints, and summed per rule (the positive control's nested study keeps its jobs' records
under ``<model>/controls/benchmarks/``: one row); the total is the wall time of the whole
``snakemake`` call (which includes Snakefile parsing and scheduling). Those files hold each job's own
CPU seconds and peak RSS, whether it ran through the stage worker or cold (kn.jobrecord), so they are
the records ``snakemake --report`` users read too. Parallel efficiency is the summed job CPU /
(wall x cores); the CPU of everything the call started gives the same ratio with the scheduler
counted: ``RUSAGE_CHILDREN`` (Snakemake, the job clients, cold jobs) plus what ran outside that process
tree, the worker's jobs and its start-up imports (its ``KN_WORKER_USAGE`` records). The 1-minute load average
is sampled every 15 s: the machine may be shared, so read it before the numbers. ``--runs N``
repeats the run from a clean folder and reports medians; ``--rerun-check P101`` then lists the
jobs ``snakemake -n`` would run after a one-relation override. Writes ``report.md``,
``report.json`` and ``snakemake.log`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from kn.jobrecord import RuleUsage, per_rule, read_benchmark

REPO = Path(__file__).resolve().parents[1]
JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
BENCHMARK_LINE = re.compile(r"^\s+benchmark: (.+)$")
DRY_RUN_ROW = re.compile(r"^(\w+)\s+(\d+)$")


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


def read_usage(path: Path) -> list[dict]:
    """The worker's usage records: its jobs and its start-up imports (one JSON object per line; none if
    the file does not exist)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON usage record ({exc})") from exc
    return records


# The positive control's nested study (rule planted_study) is this workflow run into <model>/controls/: its jobs
# keep their own records there, which the outer log does not list; they count as one row.
NESTED_BENCHMARKS = "*/controls/benchmarks"
NESTED_RULE = "planted_study: its nested jobs"


def summarise(results_dir: Path, log_text: str) -> list[RuleUsage]:
    """Per-rule sums over every ``<results_dir>/benchmarks/**.tsv`` and, as one row, the nested planted
    study's job records (``<results_dir>/<model>/controls/benchmarks/**.tsv``), slowest rule first."""
    rules = benchmark_rules(log_text)
    records = [(rules.get(str(path.resolve()), "unattributed"), read_benchmark(path))
               for path in sorted((results_dir / "benchmarks").rglob("*.tsv"))]
    for nested in sorted(results_dir.glob(NESTED_BENCHMARKS)):
        records += [(NESTED_RULE, read_benchmark(path)) for path in sorted(nested.rglob("*.tsv"))]
    return per_rule(records)


class LoadSampler:
    """The 1-minute load average every ``every`` seconds, in a daemon thread."""

    def __init__(self, every: float = 15.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        return {"mean": round(statistics.fmean(self.samples), 2), "min": round(min(self.samples), 2),
                "max": round(max(self.samples), 2)}


def efficiency(stages: Sequence[RuleUsage], total_wall_s: float, all_cpu_s: float, cores: int) -> dict[str, float]:
    """Summed job CPU / (wall x cores), and the same with every CPU second the run used (scheduler included)."""
    job_cpu = sum(s.cpu_s for s in stages)
    return {"job_cpu_s": round(job_cpu, 1), "all_cpu_s": round(all_cpu_s, 1),
            "efficiency": round(job_cpu / (total_wall_s * cores), 3),
            "efficiency_all_cpu": round(all_cpu_s / (total_wall_s * cores), 3)}


def markdown(stages: Sequence[RuleUsage], total_wall_s: float, context: dict[str, str]) -> str:
    """The per-stage table plus the total, as docs/performance.md shows it."""
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
    if "efficiency" in context:
        lines.append(f"Parallel efficiency (summed job CPU / (wall x {context['cores']} cores)): {context['efficiency']}; "
                     f"with the scheduler's CPU: {context['efficiency_all_cpu']}. 1-minute load average during the "
                     f"run: {context['load']}.")
    return "\n".join(lines) + "\n"


def one_run(args: argparse.Namespace, results_dir: Path, out: Path) -> dict | None:
    """One snakemake call into an empty ``results_dir``; its report (also written to ``out``), or None if it failed."""
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"results_dir={results_dir}", *args.override]
    targets = [str(results_dir / t) for t in args.target]
    command = [sys.executable, "-m", "snakemake", *targets, "--cores", str(args.cores), *args.snakemake_arg,
               "--config", f"overrides={json.dumps(overrides)}"]
    log_path, usage_path = out / "snakemake.log", out / "worker_usage.jsonl"
    usage_path.unlink(missing_ok=True)
    # A fresh worker folder: the run starts its own server, whose imports are counted.
    env = {**os.environ, "KN_WORKER_USAGE": str(usage_path), "KN_WORKER_DIR": tempfile.mkdtemp(prefix="knwb")}
    host = host_speed()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with LoadSampler() as load, open(log_path, "w", encoding="utf-8") as log:
        start = time.perf_counter()
        returncode = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    check=False).returncode
        total = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if returncode != 0:
        print(f"snakemake failed (exit {returncode}); see {log_path}", file=sys.stderr)
        return None
    usage = read_usage(usage_path)
    stages = summarise(results_dir, log_path.read_text(encoding="utf-8"))
    all_cpu = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
               + sum(float(r.get("cpu_s", 0.0)) for r in usage))
    context = {
        "snakemake_args": " ".join([*args.target, "--cores", str(args.cores), *args.snakemake_arg,
                                    "--config", f"overrides={json.dumps(overrides)}"]),
        "cores": str(args.cores),
        "machine": f"{platform.node()} ({platform.machine()}, {_cpu_count()} CPUs visible, {host['cpu_model']}; "
                   f"fp32 matmul on 1 thread before the run: {host['matmul_gflops_1_thread']} GFLOP/s)",
        **host,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **efficiency(stages, total, all_cpu, args.cores),
        "load": load.summary(),
    }
    report = markdown(stages, total, context)
    (out / "report.md").write_text(report, encoding="utf-8")
    record = {"total_wall_s": total, "stages": [asdict(s) for s in stages], **context}
    (out / "report.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(report)
    return record


def rerun_check(args: argparse.Namespace, results_dir: Path, relation: str) -> dict[str, int]:
    """Jobs per rule that ``snakemake -n`` would run after a finished run, with ``data.relations=[relation]``."""
    overrides = [f"results_dir={results_dir}", *args.override, f"data.relations=[{relation}]"]
    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--cores", str(args.cores),
                           "--config", f"overrides={json.dumps(overrides)}"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    rows = (DRY_RUN_ROW.match(line.strip()) for line in (done.stdout + done.stderr).splitlines())
    return {m.group(1): int(m.group(2)) for m in rows if m and m.group(1) != "total"}


def run(args: argparse.Namespace) -> int:
    results_dir = args.results_dir.resolve()
    if results_dir == (REPO / "results").resolve():
        raise SystemExit("refusing to benchmark into results/: pass a separate --results-dir")
    if results_dir.exists() and any(results_dir.iterdir()):
        if not args.clean:
            raise SystemExit(f"{results_dir} is not empty; pass --clean to delete it first (the benchmark starts clean)")
        shutil.rmtree(results_dir)
    records = []
    for k in range(args.runs):
        if k:
            shutil.rmtree(results_dir)
        record = one_run(args, results_dir, args.out if args.runs == 1 else args.out / f"run{k + 1}")
        if record is None:
            return 1
        records.append(record)
    if args.runs > 1:
        keys = ("total_wall_s", "job_cpu_s", "all_cpu_s", "efficiency", "efficiency_all_cpu")
        median = {key: statistics.median(r[key] for r in records) for key in keys}
        lines = ["| run | wall s | job CPU s | all CPU s | efficiency | with scheduler | load 1-min mean (min-max) "
                 "| 1-thread matmul GFLOP/s |",
                 "|---|---:|---:|---:|---:|---:|---|---:|"]
        for k, r in enumerate(records, 1):
            lines.append(f"| {k} | {r['total_wall_s']:.0f} | {r['job_cpu_s']:.0f} | {r['all_cpu_s']:.0f} | "
                         f"{r['efficiency']:.0%} | {r['efficiency_all_cpu']:.0%} | {r['load']['mean']} "
                         f"({r['load']['min']}-{r['load']['max']}) | {r['matmul_gflops_1_thread']} |")
        lines.append(f"| median | {median['total_wall_s']:.0f} | {median['job_cpu_s']:.0f} | {median['all_cpu_s']:.0f} | "
                     f"{median['efficiency']:.0%} | {median['efficiency_all_cpu']:.0%} | | |")
        lines.append(f"\nCPU: {records[0]['cpu_model']}.")
        (args.out / "report.md").write_text("\n".join(lines) + "\n\nEach run's stages: run<k>/report.md.\n",
                                            encoding="utf-8")
        (args.out / "report.json").write_text(json.dumps({"median": median, "runs": records}, indent=2) + "\n",
                                              encoding="utf-8")
    if args.rerun_check:
        counts = rerun_check(args, results_dir, args.rerun_check)
        text = (f"\n`snakemake -n` after the run with `data.relations=[{args.rerun_check}]`: "
                + (", ".join(f"{rule} {n}" for rule, n in counts.items()) or "nothing to do") + "\n")
        with open(args.out / "report.md", "a", encoding="utf-8") as handle:
            handle.write(text)
        print(text)
    return 0


MATMUL_PROBE = """
import statistics, time, torch
torch.set_num_threads(1)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
a @ b
rates = []
for _ in range(9):
    start = time.perf_counter()
    a @ b
    rates.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
print(statistics.median(rates))
"""


def host_speed() -> dict[str, object]:
    """The CPU model and its one-thread fp32 matmul rate (GFLOP/s, median of 9), measured before a run.

    Hosts behind the same "2-core VM" differ by more than 2x in speed between sessions, so a
    wall time is comparable only beside the rate of the host it was measured on.
    """
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    probe = subprocess.run([sys.executable, "-c", MATMUL_PROBE], capture_output=True, text=True, check=False,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    rate = round(float(probe.stdout.strip()), 1) if probe.returncode == 0 else None
    return {"cpu_model": model, "matmul_gflops_1_thread": rate}


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
    parser.add_argument("--runs", type=int, default=1, help="repeat from a clean results folder; medians in report.md")
    parser.add_argument("--rerun-check", default="", help="after the runs, dry-run a one-relation override (e.g. P101)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
