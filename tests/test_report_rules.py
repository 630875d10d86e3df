"""The Snakemake report: every figure and summary table a rule writes is flagged with report(),
and every caption a rule names exists (workflow/report/)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = sorted((REPO / "workflow" / "rules").glob("*.smk"))
OUTPUT_LINE = re.compile(r'^\s+(\w+)=(report\()?f?"([^"]+)"', re.MULTILINE)


def _outputs(text: str) -> list[tuple[str, bool, str]]:
    """(name, flagged, path) of every named output inside the rules' ``output:`` blocks."""
    found = []
    for block in re.findall(r"output:\n((?:\s{8,}.*\n)+)", text):
        found += [(name, bool(flag), path) for name, flag, path in OUTPUT_LINE.findall(block)]
    return found


def test_every_png_and_summary_table_is_in_the_report() -> None:
    unflagged = [
        f"{smk.name}: {name}={path}"
        for smk in RULES
        for name, flagged, path in _outputs(smk.read_text())
        if not flagged and (path.endswith(".png") or re.search(r"(summary|overall|accuracy|erase|kn_stats)\.csv$", path))
    ]
    assert not unflagged, f"outputs missing report(): {unflagged}"


def test_every_caption_exists() -> None:
    captions = {(smk.name, c) for smk in RULES for c in re.findall(r'caption="([^"]+)"', smk.read_text())}
    assert captions  # the report is wired up
    missing = [f"{name}: {c}" for name, c in captions if not (REPO / "workflow" / "rules" / c).resolve().is_file()]
    assert not missing, f"caption files not found: {missing}"
    assert (REPO / "workflow" / "report" / "workflow.rst").is_file()
