"""Stage: combine per-relation prompt tables into prompts.parquet, facts.parquet and stats JSON."""

from __future__ import annotations

import logging

import pandas as pd

from kn.data.pararel import facts_from_prompts, load_relations, select_relations, stats
from kn.io import provenance, read_parquet, write_json, write_parquet
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.ingest")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    relations = select_relations(list(load_relations(cfg.data.resources_dir)), cfg.data.relations)
    folder = args.input("relations_dir")
    prompts = pd.concat([read_parquet(folder / f"{rel}.parquet") for rel in relations], ignore_index=True)
    facts = facts_from_prompts(prompts)
    record = provenance(cfg, "ingest")
    summary = stats(prompts, facts)
    write_parquet(args.output("prompts"), prompts, record)
    write_parquet(args.output("facts"), facts, record)
    write_json(args.output("stats"), {**summary, "provenance": record})
    totals = summary["totals"]
    log.info("combined %d relations, %d facts, %d prompts", totals["relations"], totals["facts"], totals["prompts"])


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
