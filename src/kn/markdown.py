"""Plain markdown tables for the human-readable copies of result tables (no extra dependency)."""

from __future__ import annotations

import math
from typing import Mapping

import pandas as pd


def format_cell(value: object, digits: int = 4) -> str:
    """Floats to ``digits`` significant digits, missing values as "n/a", pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, titles: Mapping[str, str] | None = None, digits: int = 4) -> str:
    """``frame`` as a GitHub markdown table; ``titles`` renames (and selects) columns."""
    columns = list(titles) if titles else list(frame.columns)
    header = [titles[c] if titles else c for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    for record in frame[columns].to_dict("records"):
        lines.append("| " + " | ".join(format_cell(record[c], digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def provenance_footer(record: Mapping[str, object]) -> str:
    """A closing line naming the stage, model, seed and package versions behind a markdown file."""
    config = record.get("config") if isinstance(record.get("config"), Mapping) else {}
    model = config.get("model", {}).get("name") if isinstance(config.get("model"), Mapping) else None  # type: ignore[union-attr]
    versions = record.get("versions") if isinstance(record.get("versions"), Mapping) else {}
    shown = ", ".join(f"{name} {versions[name]}" for name in ("kn", "torch", "transformers") if name in versions)  # type: ignore[index,operator]
    return f"\n---\n_Written by stage `{record.get('stage')}`; model `{model}`; seed {record.get('seed')}; {shown}._\n"
