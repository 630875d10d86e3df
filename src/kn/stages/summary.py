"""Stage: the run's summary: paper vs this run (SPEC §12), the model card, the study's tables, the config.

Every input is optional (a stage the run did not include gives "not run"):
``--in data_stats=`` data/stats.json, ``--in kn_stats=`` analysis/kn_stats.json,
``--in evaluate=`` evaluate/summary.csv, ``--in update=`` edit/update_summary.csv,
``--in erase=`` edit/erase.csv, ``--in distant=`` distant/activation_overall.csv,
``--in model_card=`` model_card.md, ``--in benchmarks=`` the attribute jobs' benchmark
folder, and ``--in table:<name>=<csv>`` for each table shown in the HTML page.
Outputs: ``markdown`` (summary.md), ``table`` (summary.csv: the paper-vs-run table) and
``html`` (summary.html: the same plus every table, for the Snakemake report).
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from kn.io import atomic_path, provenance, write_text
from kn.markdown import markdown_table, provenance_footer
from kn.stages.cli import StageArgs, run_stage
from kn.summary import COLUMNS, RunResults, paper_vs_run

log = logging.getLogger("kn.summary")

TITLES = {  # column titles of the paper-vs-run table
    "experiment": "experiment", "paper": "paper (ours)", "paper_baseline": "paper (baseline / random)",
    "status": "status", "this_run": "this run (IG)", "this_run_baseline": "this run (baseline / random)",
    "source": "this run's source",
}  # fmt: skip
TABLE_TITLES = {  # the study tables the HTML page shows, in order; rows filtered to the headline ones
    "probe": "Probe accuracy (per relation)",
    "kn_stats": "Knowledge-neuron statistics (SPEC §4)",
    "evaluate": "Suppressing and amplifying (SPEC §5), mean over relations",
    "distant_overall": "Activating prompts (SPEC §6), overall",
    "distant_usability": "Activating prompts: usable sentences for this model",
    "update": "Updating facts (SPEC §7), over all relations",
    "erase": "Erasing relations (SPEC §8)",
}
HEADLINE_ROWS = {"evaluate": ("relation", "mean"), "update": ("scope", "all"), "distant_usability": ("relation", "all")}


def _optional(args: StageArgs, name: str) -> Path | None:
    path = args.inputs.get(name)
    if path is None or not path.exists():
        log.info("%s: not given or not produced; reported as not run", name)
        return None
    return path


def _json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); rerun the stage that writes it") from None


def _csv(path: Path | None) -> pd.DataFrame | None:
    if path is None:
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable CSV ({exc}); rerun the stage that writes it") from None


def benchmark_seconds(folder: Path | None) -> list[float]:
    """Wall seconds (column ``s``) of every Snakemake benchmark file under ``folder``."""
    if folder is None:
        return []
    seconds = []
    for path in sorted(folder.rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        if "s" not in table.columns or table.empty:
            raise ValueError(f"{path}: no column 's'; expected a Snakemake benchmark file")
        seconds.append(float(table["s"].iloc[-1]))
    return seconds


def load_run(args: StageArgs) -> RunResults:
    return RunResults(
        data_stats=_json(_optional(args, "data_stats")),
        kn_stats=_json(_optional(args, "kn_stats")),
        evaluate=_csv(_optional(args, "evaluate")),
        update=_csv(_optional(args, "update")),
        erase=_csv(_optional(args, "erase")),
        distant=_csv(_optional(args, "distant")),
        attribution_seconds=benchmark_seconds(_optional(args, "benchmarks")),
    )


def study_tables(args: StageArgs) -> dict[str, pd.DataFrame]:
    """The ``--in table:<name>=csv`` tables that exist, headline rows only where a table has many."""
    tables = {}
    for name in TABLE_TITLES:
        frame = _csv(_optional(args, f"table:{name}"))
        if frame is None:
            continue
        if name in HEADLINE_ROWS:
            column, value = HEADLINE_ROWS[name]
            frame = frame[frame[column].astype(str) == value] if column in frame.columns else frame
        tables[name] = frame
    return tables


def _demote_headings(text: str) -> str:
    """Nest a markdown document under a level-2 section (its '#' headings become '###')."""
    return "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())


def summary_markdown(cfg: Any, comparison: pd.DataFrame, model_card: str | None) -> str:
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    return "\n".join(
        [
            f"# Knowledge neurons: run summary for `{cfg.model.name}`",
            "",
            "Reproduction of Dai et al. (ACL 2022), *Knowledge Neurons in Pretrained Transformers*. The paper's numbers "
            "and their status markers come from SPEC §12 (`src/kn/paper_numbers.py`): [DATA] checked on the data, "
            "[2nd] agreed on by secondary summaries, [mem] unverified recollection. This run's numbers are read from "
            "its result files (column *this run's source*, under the model's results folder). The paper studies "
            "bert-base-cased on every fact; a different model or a subset of facts gives numbers that are not "
            "expected to match, only to be read side by side.",
            "",
            "## Paper vs this run",
            "",
            markdown_table(comparison, TITLES),
            "## Model card",
            "",
            _demote_headings(model_card) if model_card else f"No model card: the model is `{cfg.model.path}` (not trained by the pipeline).",
            "",
            "## Configuration of this run",
            "",
            "```yaml",
            config_yaml.rstrip(),
            "```",
        ]
    )


CSS = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1300px}table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:left}th{background:#f0f0f0}"
    "pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:12px}"
)


def summary_html(cfg: Any, comparison: pd.DataFrame, model_card: str | None, tables: dict[str, pd.DataFrame]) -> str:
    """A self-contained page (no scripts, no external files) the Snakemake report shows inline."""

    def table(frame: pd.DataFrame) -> str:
        return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="n/a", border=0)

    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kn summary: {html.escape(cfg.model.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Knowledge neurons: run summary for <code>{html.escape(cfg.model.name)}</code></h1>",
        "<p>Paper numbers and status markers from SPEC §12 (<code>src/kn/paper_numbers.py</code>); this run's numbers "
        "read from its result files. Numbers of a different model or a subset of facts are read side by side, not "
        "expected to match.</p>",
        "<h2>Paper vs this run</h2>",
        table(comparison.rename(columns=TITLES)),
        "<h2>Tables of the study</h2>",
    ]
    for name, frame in tables.items():
        parts += [f"<h3>{html.escape(TABLE_TITLES[name])}</h3>", table(frame)]
    if not tables:
        parts.append("<p>No study table was produced.</p>")
    parts += [
        "<h2>Model card</h2>",
        f"<pre>{html.escape(model_card)}</pre>" if model_card else f"<p>No model card: the model is <code>{html.escape(str(cfg.model.path))}</code>.</p>",
        "<h2>Configuration of this run</h2>",
        f"<pre>{html.escape(OmegaConf.to_yaml(cfg, resolve=True))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def main(args: StageArgs) -> None:
    cfg = args.cfg
    comparison = paper_vs_run(load_run(args))
    card_path = _optional(args, "model_card")
    model_card = card_path.read_text(encoding="utf-8") if card_path else None
    record = provenance(cfg, "summary")
    with atomic_path(args.output("table")) as tmp:
        comparison[COLUMNS].to_csv(tmp, index=False)
    write_text(args.output("markdown"), summary_markdown(cfg, comparison, model_card) + provenance_footer(record))
    write_text(args.output("html"), summary_html(cfg, comparison, model_card, study_tables(args)))
    for row in comparison.itertuples(index=False):
        log.info("%s: paper %s | this run %s", row.experiment, row.paper, row.this_run)


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
