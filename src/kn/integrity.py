"""Find result files that are truncated or corrupt and move them aside so they are recomputed.

kn.io writes every file atomically, so a killed job never leaves a partial file under its
final name. Damage can still happen afterwards (a copy between machines cut short, a full
quota during rsync, bit rot). Snakemake only compares timestamps, so it would hand such a
file to the next stage. The Snakefile therefore calls :func:`quarantine_broken_parquet` on
the results folder before building the DAG: a broken file is renamed to ``<name>.corrupt``,
its job's output is then missing, and Snakemake recomputes exactly that job (and what
depends on it). The check reads only each file's footer, which is cheap enough to run on
every invocation and catches truncation and overwritten files; damage inside a data page is
caught when a stage reads the file (kn.io.read_parquet names the file and the fix).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

QUARANTINE_SUFFIX = ".corrupt"


def parquet_footer_is_valid(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` ends in a readable parquet footer (schema and row-group index)."""
    try:
        pq.ParquetFile(path).metadata  # noqa: B018  (parsing the footer is the check)
    except Exception:  # pyarrow raises several types for truncated or foreign files
        return False
    return True


def broken_parquet_files(root: str | os.PathLike[str]) -> list[Path]:
    """Parquet files under ``root`` whose footer cannot be read, in sorted order.

    Hidden files are skipped: they are kn.io's temporary files, possibly being written
    right now by a running job.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*.parquet")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if not parquet_footer_is_valid(path):
            found.append(path)
    return found


def quarantine(path: Path) -> Path:
    """Rename ``path`` to ``<path>.corrupt`` (``.corrupt.1``, ... if taken) and return the new name."""
    target = path.with_name(path.name + QUARANTINE_SUFFIX)
    count = 0
    while target.exists():
        count += 1
        target = path.with_name(f"{path.name}{QUARANTINE_SUFFIX}.{count}")
    os.replace(path, target)
    return target


def quarantine_broken_parquet(root: str | os.PathLike[str]) -> list[tuple[Path, Path]]:
    """Move every broken parquet file under ``root`` aside; returns (original, new name) pairs."""
    return [(path, quarantine(path)) for path in broken_parquet_files(root)]
