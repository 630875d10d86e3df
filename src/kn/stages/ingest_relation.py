"""Stage: ParaRel ingestion of one relation -> its prompts parquet (SPEC §2).

The ParaRel files come from data.resources_dir (the rule declares the relation's files).
Output: ``--out prompts=<rel>.parquet``.
"""

from __future__ import annotations

import logging

from kn.data.pararel import build_bags
from kn.io import provenance
from kn.stages.cli import StageArgs, run_stage
from kn.tables import RELATION_PROMPTS

log = logging.getLogger("kn.ingest")


def main(args: StageArgs) -> None:
    cfg, relation = args.cfg, args.require_relation()
    prompts, facts = build_bags(cfg.data.resources_dir, [relation], cfg.data.max_facts_per_relation)
    RELATION_PROMPTS.write(args.output("prompts"), prompts, provenance(cfg, "ingest_relation", relation=relation))
    log.info("%s: %d facts, %d prompts", relation, len(facts), len(prompts))


if __name__ == "__main__":
    run_stage(main)
