"""Stage: the run's summary: paper vs this run (SPEC §12), the model card, the study's tables, the config.

Every input is optional (a stage the run did not include gives "not run"):
``--in data_stats=`` data/stats.json, ``--in kn_stats=`` analysis/kn_stats.json,
``--in evaluate=`` evaluate/summary.csv, ``--in update=`` edit/update_summary.csv,
``--in erase=`` edit/erase.csv, ``--in distant=`` distant/activation_overall.csv,
``--in probe=`` probe/accuracy.csv, ``--in ceiling=`` localise/ceiling.csv, ``--in model_card=`` model_card.md,
``--in controls=`` controls/summary.json (the positive control),
``--in job:<rule>/<job>=`` each earlier job's benchmark file (its job record; the attribute jobs' give the
attribution time),
``--in table:<name>=<csv>`` for each table shown in the HTML page, and ``--in compare:<alias>=``
the summary.csv of each other study shown beside this one (config key ``compare``), with
``--in compare_probe:<alias>=`` its probe/accuracy.csv (its tokenizer's vocabulary coverage).
Outputs: ``markdown`` (summary.md), ``table`` (summary.csv: the paper-vs-run table) and
``html`` (summary.html: the same plus every table, for the Snakemake report).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kn.io import provenance, write_text
from kn.jobrecord import per_rule, read_benchmark
from kn.markdown import provenance_footer
from kn.stages.cli import StageArgs, run_stage
from kn.summary import (
    COLUMNS,
    HEADLINE_ROWS,
    job_table,
    TABLE_TITLES,
    RunResults,
    control_lines,
    paper_vs_run,
    summary_html,
    summary_markdown,
    verdict_lines,
    vocabulary_coverage,
)
from kn.tables import CEILING, DISTANT_OVERALL, EFFECT_SUMMARY, ERASE, PROBE_ACCURACY, UPDATE_SUMMARY, CsvTable

log = logging.getLogger("kn.summary")


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


def _csv(path: Path | None, table: CsvTable | None = None) -> pd.DataFrame | None:
    if path is None:
        return None
    if table is not None:
        return table.read(path)
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable CSV ({exc}); rerun the stage that writes it") from None


def job_records(paths: dict[str, Path]) -> list[tuple[str, dict[str, float]]]:
    """(rule, record) of each ``--in job:<rule>/<job>=<benchmark file>``."""
    return [(key.split("/", 1)[0], read_benchmark(path)) for key, path in paths.items()]


def main(args: StageArgs) -> None:
    cfg = args.cfg
    run = RunResults(
        data_stats=_json(_optional(args, "data_stats")),
        kn_stats=_json(_optional(args, "kn_stats")),
        evaluate=_csv(_optional(args, "evaluate"), EFFECT_SUMMARY),
        update=_csv(_optional(args, "update"), UPDATE_SUMMARY),
        erase=_csv(_optional(args, "erase"), ERASE),
        distant=_csv(_optional(args, "distant"), DISTANT_OVERALL),
        probe=_csv(_optional(args, "probe"), PROBE_ACCURACY),
        ceiling=_csv(_optional(args, "ceiling"), CEILING),
        controls=_json(_optional(args, "controls")),
        jobs=per_rule(job_records(args.keyed_inputs("job", required=False))),
    )
    comparison = paper_vs_run(run)
    others = {name: _csv(path) for name, path in args.keyed_inputs("compare", required=False).items()}
    coverage = {name: vocabulary_coverage(RunResults(probe=_csv(path, PROBE_ACCURACY)))
                for name, path in args.keyed_inputs("compare_probe", required=False).items()}
    for name, frame in others.items():
        missing = [c for c in ("experiment", "this_run", "this_run_baseline") if c not in frame.columns]
        if missing:
            raise ValueError(f"{args.inputs[f'compare:{name}']}: missing columns {missing} of a run summary; rerun its rule summary")
    card_path = _optional(args, "model_card")
    model_card = card_path.read_text(encoding="utf-8") if card_path else None
    tables = {}
    for name in TABLE_TITLES:  # the tables that exist, headline rows only where a table has many
        frame = _csv(_optional(args, f"table:{name}"))
        if frame is not None and name in HEADLINE_ROWS and HEADLINE_ROWS[name][0] in frame.columns:
            column, value = HEADLINE_ROWS[name]
            frame = frame[frame[column].astype(str) == value]
        if frame is not None:
            tables[name] = frame
    if run.jobs:
        tables["jobs"] = job_table(run)
    record = provenance(cfg, "summary")
    write_text(args.output("table"), comparison[COLUMNS].to_csv(index=False))
    write_text(args.output("markdown"), summary_markdown(cfg, comparison, model_card, run, others, coverage) + provenance_footer(record))
    write_text(args.output("html"), summary_html(cfg, comparison, model_card, tables, others, verdict_lines(cfg, run)))
    for row in comparison.itertuples(index=False):
        log.info("%s: paper %s | this run %s", row.experiment, row.paper, row.this_run)


if __name__ == "__main__":
    run_stage(main)
