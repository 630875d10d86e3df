"""Broken parquet files are found by their footer and moved aside; valid and temporary files are left alone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kn.integrity import broken_parquet_files, parquet_footer_is_valid, quarantine, quarantine_broken_parquet
from kn.io import write_parquet


def _write(path: Path) -> bytes:
    write_parquet(path, pd.DataFrame({"layer": [0, 1, 2], "score": [0.5, 0.25, 1.0]}), {"stage": "test"})
    return path.read_bytes()


def test_truncated_and_overwritten_files_are_broken(tmp_path: Path) -> None:
    good = tmp_path / "rel" / "000.parquet"
    data = _write(good)
    truncated = tmp_path / "rel" / "001.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "rel" / "002.parquet"
    garbage.write_bytes(b"x" * len(data))
    in_flight = tmp_path / "rel" / ".003.parquet"  # hidden, like kn.io temp files: may be mid-write
    in_flight.write_bytes(data[:10])
    assert parquet_footer_is_valid(good)
    assert not parquet_footer_is_valid(truncated)
    assert broken_parquet_files(tmp_path) == [truncated, garbage]


def test_quarantine_renames_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "000.parquet"
    path.write_bytes(b"PAR1 broken")
    first = quarantine(path)
    path.write_bytes(b"PAR1 broken again")
    second = quarantine(path)
    assert (first.name, second.name) == ("000.parquet.corrupt", "000.parquet.corrupt.1")
    assert not path.exists() and first.read_bytes() == b"PAR1 broken"


def test_quarantine_broken_parquet_moves_only_broken_files(tmp_path: Path) -> None:
    good = tmp_path / "a" / "000.parquet"
    data = _write(good)
    bad = tmp_path / "a" / "001.parquet"
    bad.write_bytes(data[:-8])  # footer length and magic cut off
    moved = quarantine_broken_parquet(tmp_path)
    assert moved == [(bad, tmp_path / "a" / "001.parquet.corrupt")]
    assert good.read_bytes() == data and not bad.exists()
    assert quarantine_broken_parquet(tmp_path / "missing") == []
