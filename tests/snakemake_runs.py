"""Run the project's Snakefile from tests, on small overrides, into a temporary results folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


# The default profile's 10 s timespan saves the scheduler's CPU over a long run, but Snakemake waits up to
# one timespan for its last timer before exiting: the tests' small DAGs run many times, so they take 1 s.
TEST_TIMESPAN = ("--max-jobs-per-timespan", "10000/1s")


def snakemake_command(
    targets: Sequence[str | Path], overrides: Sequence[str], *options: str, workdir: Path | None = None
) -> list[str]:
    """``snakemake`` with the Hydra overrides passed the documented way (``--config overrides=[...]``).

    With ``workdir``, Snakemake's own state (``.snakemake/``: locks, metadata, incomplete
    markers) lives there instead of in the shared checkout; relative paths in the config
    then resolve against ``workdir`` too, so pass resource folders as absolute paths.
    """
    where = ["--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)] if workdir else []
    return [
        sys.executable, "-m", "snakemake", *map(str, targets), *where, *TEST_TIMESPAN, *options,
        "--config", f"overrides={json.dumps(list(overrides))}",
    ]


def offline_env(**extra: str) -> dict[str, str]:
    """Offline, single-threaded environment for Snakemake and the stage processes it starts."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    return {**env, **extra}


def run_snakemake(
    targets: Sequence[str | Path],
    overrides: Sequence[str],
    *options: str,
    workdir: Path | None = None,
    timeout: float = 300,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run Snakemake from the repository root (where ``resources/`` and the default profile are)."""
    return subprocess.run(
        snakemake_command(targets, overrides, *options, workdir=workdir),
        cwd=REPO, env=offline_env(**env), capture_output=True, text=True, timeout=timeout, check=False,
    )


def start_snakemake(
    targets: Sequence[str | Path], overrides: Sequence[str], *options: str, log: Path, workdir: Path | None = None,
    **env: str,
) -> subprocess.Popen[bytes]:
    """Start Snakemake in its own process group (so a test can SIGKILL the whole run)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as handle:
        return subprocess.Popen(
            snakemake_command(targets, overrides, *options, workdir=workdir),
            cwd=REPO, env=offline_env(**env), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )


PATH_RELATIONS = ["P19", "P937"]  # two erased relations, one trigger relation
PATH_SHRINK = [  # a whole-DAG run of a stand-in model in a few minutes
    f"data.relations=[{','.join(PATH_RELATIONS)}]", "study.facts_per_relation=3", "ig.m=4", "edit.max_attempts=200",
    "evaluate.bootstrap=50", "analysis.inter_draws=5", "localise.bootstrap=50",
    f"data.resources_dir={REPO / 'resources' / 'pararel'}", f"distant.resources_dir={REPO / 'resources' / 'bing_distant'}",
]
STAGE_OUTPUTS = [  # one file per rule of the DAG (under results/<model>/ unless it starts with data/)
    "data/stats.json", "probe/P19.parquet", "probe/accuracy.csv", "attributions/P19/000.parquet",
    "neurons/P937.parquet", "analysis/kn_stats.json", "evaluate/P19.parquet", "evaluate/summary.csv",
    "localise/P19.parquet", "localise/ceiling.csv", "edit/update_summary.csv", "edit/erase.csv",
    "distant/P937.activations.parquet", "distant/activation_overall.csv", "distant/triggers/P937.md", "summary.md",
]
