"""The summary stage on hand-built result files: optional inputs, markdown, CSV, HTML."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import pytest

from kn.paper_numbers import PAPER_NUMBERS
from kn.stages import summary
from kn.stages.cli import run_stage


def _write_results(root: Path) -> dict[str, Path]:
    paths = {
        "data_stats": root / "data_stats.json",
        "kn_stats": root / "kn_stats.json",
        "distant": root / "activation_overall.csv",
        "model_card": root / "model_card.md",
        "job:attribute/P1/000": root / "benchmarks" / "P1" / "000.tsv",
    }
    paths["data_stats"].write_text(json.dumps({"totals": {"relations": 1, "facts": 4, "prompts": 20}}))
    paths["kn_stats"].write_text(json.dumps({"methods": {m: {"avg_kn_per_fact": 2.5, "intra_shared": 1.0, "inter_shared": None, "n_facts": 4} for m in ("ig", "base")}, "layer_share": {"ig": [0.25, 0.75]}}))
    distant = {"subset": "all", "method": "ig", "n_relations": 1, "n_facts": 4, "T1": 0.75, "T2": 0.5, "T3": 0.25,
               "T1_minus_T2": 0.25, "T1_minus_T3": 0.5}
    for name in ("T1", "T2", "T3", "T1_minus_T2", "T1_minus_T3"):
        distant[f"{name}_ci_low"], distant[f"{name}_ci_high"] = distant[name] - 0.125, distant[name] + 0.125
    pd.DataFrame([distant]).to_csv(paths["distant"], index=False)
    paths["model_card"].write_text("# Model card: tiny\n\nA tiny model.\n")
    paths["job:attribute/P1/000"].parent.mkdir(parents=True)
    paths["job:attribute/P1/000"].write_text("s\th:m:s\tmax_rss\tcpu_time\n6.0\t0:00:06\t812.4\t5.5\n")
    return paths


def _run(paths: dict[str, Path], out: Path) -> None:
    run_stage(summary.main, [
        *[f"--in={name}={path}" for name, path in paths.items()],
        f"--in=table:distant_overall={paths['distant']}", f"--in=evaluate={out}/never-written.csv",
        f"--out=markdown={out}/summary.md", f"--out=table={out}/summary.csv", f"--out=html={out}/summary.html",
        "model.name=tiny", "study.facts_per_relation=4",
    ])  # fmt: skip


def test_summary_writes_table_markdown_and_html(tmp_path: Path) -> None:
    paths = _write_results(tmp_path)
    _run(paths, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("experiment")
    assert len(table) == len(PAPER_NUMBERS)
    assert table.loc["BingRel mean KN activation, T1 / T2 / T3", "this_run"] == (
        "0.750 [0.625, 0.875] / 0.500 [0.375, 0.625] / 0.250 [0.125, 0.375]")
    assert table.loc["Time to identify one fact's KNs", "this_run"].startswith("1.50 s")  # 6 s / 4 studied facts
    assert table.loc["Suppress (×0): Δ correct probability", "this_run"] == "not run"  # file given but never written
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "## Paper vs this run" in markdown and "### Model card: tiny" in markdown
    opening = markdown.split("\n\n")[1].splitlines()  # the verdict, right under the title
    assert len(opening) == 5 and opening[2].startswith("- Knowledge neurons: integrated gradients select 2.5 per fact")
    assert opening[4] == "- Verdict: No verdict: the stages it needs did not run."
    assert "study:\n  facts_per_relation: 4" in markdown  # the run's config, as composed
    page = (tmp_path / "out" / "summary.html").read_text()
    assert "Activating prompts (SPEC §6), overall" in page and "<pre># Model card: tiny" in page
    assert page.count("<table") == 3  # the comparison, the one study table given and the job records
    assert "<li>Model: <code>tiny</code> (trained by this pipeline); what it knows was not measured" in page
    assert "| attribute | 1 | 6 | 6 | 5.5 | 812 |" in markdown  # the job records, per rule
    assert html.escape(summary.TABLE_TITLES["jobs"]) in page


def test_summary_names_a_malformed_input(tmp_path: Path) -> None:
    paths = _write_results(tmp_path)
    paths["kn_stats"].write_text("{ not json")
    with pytest.raises(SystemExit, match=r"kn_stats.json:1: malformed JSON"):
        _run(paths, tmp_path / "out")
