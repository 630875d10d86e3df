"""Atomic file output and provenance records.

Every output is written to a temporary file in the destination directory and renamed
into place, so a killed job never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PROVENANCE_KEY = b"kn.provenance"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; swap it onto ``path`` only on success.

    For multi-file outputs such as a ``save_pretrained`` model directory.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_parquet(
    path: str | os.PathLike[str],
    frame: pd.DataFrame,
    provenance: Mapping[str, Any] | None = None,
    schema: pa.Schema | None = None,
) -> None:
    """Write ``frame`` atomically, with ``provenance`` (config, versions, seed) in the file metadata."""
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    if provenance is not None:
        meta = dict(table.schema.metadata or {})
        meta[PROVENANCE_KEY] = json.dumps(provenance, default=_json_default).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a parquet file, naming the file if it is missing or corrupt."""
    try:
        return pq.read_table(path).to_pandas()
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises several types for truncation/corruption
        raise ValueError(f"{path}: unreadable parquet file ({exc}); delete it and rerun its job") from exc


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def parquet_is_valid(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a complete, readable parquet file (footer and every row group)."""
    try:
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            pf.read_row_group(i)
    except Exception:
        return False
    return True


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine results."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("kn", "torch", "transformers", "tokenizers", "pandas", "pyarrow", "numpy", "omegaconf", "hydra-core"):
        try:
            versions[name] = version(name)  # metadata lookup: no import of heavy packages
        except PackageNotFoundError:
            continue
    return versions


def run_config_record() -> dict[str, str] | None:
    """Which whole-run config the job ran under: the file the Snakefile wrote (named by its hash)."""
    from kn.config import RUN_CONFIG_ENV

    path = os.environ.get(RUN_CONFIG_ENV)
    if not path:
        return None
    return {"path": path, "sha256": Path(path).stem}


def provenance(cfg: Any, stage: str, **extra: Any) -> dict[str, Any]:
    """The record written beside every result.

    ``config`` is what the job received and read: the config sections the stage declares
    (kn.stages.sections), as passed to it. ``run_config`` names the whole resolved config of
    the Snakemake run that started the job (None when the stage was run by hand).
    """
    from kn.config import to_container

    config = to_container(cfg)
    return {
        "stage": stage,
        "seed": config.get("seed") if isinstance(config, dict) else None,
        "config": config,
        "run_config": run_config_record(),
        "versions": package_versions(),
        **extra,
    }
