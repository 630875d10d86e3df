"""Stage: combine the per-relation prompt tables into prompts.parquet, facts.parquet and stats JSON.

Inputs: ``--in relation:<rel>=<rel>.parquet`` for every selected relation. Outputs:
``prompts``, ``facts`` (parquet) and ``stats`` (JSON).
"""

from __future__ import annotations

import logging

from kn.data.pararel import facts_from_prompts, stats
from kn.io import provenance, write_json
from kn.stages.cli import StageArgs, run_stage
from kn.tables import FACTS, PROMPTS, RELATION_PROMPTS, concat

log = logging.getLogger("kn.ingest")


def main(args: StageArgs) -> None:
    prompts = concat(RELATION_PROMPTS.read(path, rel) for rel, path in args.keyed_inputs("relation").items())
    facts = facts_from_prompts(prompts)
    record = provenance(args.cfg, "ingest")
    summary = stats(prompts, facts)
    PROMPTS.write(args.output("prompts"), prompts, record)
    FACTS.write(args.output("facts"), facts, record)
    write_json(args.output("stats"), {**summary, "provenance": record})
    totals = summary["totals"]
    log.info("combined %d relations, %d facts, %d prompts", totals["relations"], totals["facts"], totals["prompts"])


if __name__ == "__main__":
    run_stage(main)
