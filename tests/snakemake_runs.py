"""Run the project's Snakefile from tests, on small overrides, into a temporary results folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


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
        sys.executable, "-m", "snakemake", *map(str, targets), *where, *options,
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
    targets: Sequence[str | Path], overrides: Sequence[str], *options: str, log: Path, workdir: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start Snakemake in its own process group (so a test can SIGKILL the whole run)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as handle:
        return subprocess.Popen(
            snakemake_command(targets, overrides, *options, workdir=workdir),
            cwd=REPO, env=offline_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
