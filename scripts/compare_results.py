"""Compare two results folders file by file, ignoring provenance (which names configs, paths, versions).

    python scripts/compare_results.py results-a results-b [--ignore-missing]

Parquet tables are compared as tables (columns, dtypes, values: exact); JSON without its
``provenance`` keys; CSV as text, and on a difference as numbers (the largest absolute and
relative difference is printed); markdown and HTML as text with provenance lines removed;
figures and model weights as bytes. Logs, benchmarks and run-config records are skipped.
Prints one line per differing file and a count; exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SKIP = {"logs", "benchmarks", "run_configs", ".snakemake"}
PROVENANCE_LINES = re.compile(r"^(<!-- provenance: .*-->|_Written by stage .*_|---)$")


def files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")
            if p.is_file() and not SKIP & set(p.relative_to(root).parts) and not p.name.startswith(".")}


def strip_provenance(obj):
    if isinstance(obj, dict):
        return {k: strip_provenance(v) for k, v in obj.items() if k != "provenance"}
    if isinstance(obj, list):
        return [strip_provenance(v) for v in obj]
    return obj


def text_without_provenance(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"## Provenance\n.*", "", text, flags=re.S)  # the editing reports end with their provenance
    return "\n".join(line for line in text.splitlines() if not PROVENANCE_LINES.match(line.strip()))


def numeric_gap(a: pd.DataFrame, b: pd.DataFrame) -> str:
    """The largest absolute and relative difference over the numeric columns both tables share."""
    if a.shape != b.shape or list(a.columns) != list(b.columns):
        return f"shapes {a.shape} vs {b.shape}"
    worst, rel, where = 0.0, 0.0, ""
    for column in a.columns:
        x, y = a[column], b[column]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            diff = np.abs(x.to_numpy(float) - y.to_numpy(float))
            diff = np.where(np.isnan(x.to_numpy(float)) & np.isnan(y.to_numpy(float)), 0.0, diff)
            if np.nanmax(diff, initial=0.0) > worst:
                worst = float(np.nanmax(diff))
                scale = np.abs(y.to_numpy(float))
                rel = float(np.nanmax(np.where(scale > 0, diff / np.where(scale > 0, scale, 1), 0)))
                where = column
        elif not x.astype(str).equals(y.astype(str)):
            return f"column {column} differs in non-numeric values"
    return f"max |diff| {worst:.3g} (relative {rel:.3g}) in column {where}" if where else "equal as numbers"


def compare(a: Path, b: Path) -> str | None:
    """None when equal (up to provenance), else a short description."""
    suffix = a.suffix
    if suffix == ".parquet":
        x, y = pd.read_parquet(a), pd.read_parquet(b)
        try:
            pd.testing.assert_frame_equal(x, y, check_exact=True)
            return None
        except AssertionError:
            return numeric_gap(x, y)
    if suffix == ".json":
        x, y = (strip_provenance(json.loads(p.read_text())) for p in (a, b))
        return None if x == y else "JSON differs (provenance ignored)"
    if suffix == ".csv":
        if a.read_bytes() == b.read_bytes():
            return None
        return "text differs; " + numeric_gap(pd.read_csv(a), pd.read_csv(b))
    if suffix in (".md", ".html", ".txt", ".yaml"):
        return None if text_without_provenance(a) == text_without_provenance(b) else "text differs (provenance ignored)"
    return None if a.read_bytes() == b.read_bytes() else "bytes differ"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--ignore-missing", action="store_true", help="compare only the files both folders hold")
    args = parser.parse_args()
    left, right = files(args.a), files(args.b)
    problems = 0
    if not args.ignore_missing:
        for name in sorted(left ^ right):
            print(f"only in {'A' if name in left else 'B'}: {name}")
            problems += 1
    for name in sorted(left & right):
        outcome = compare(args.a / name, args.b / name)
        if outcome:
            print(f"{name}: {outcome}")
            problems += 1
    print(f"{len(left & right)} files compared, {problems} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
