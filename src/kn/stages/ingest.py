"""Stage: ParaRel ingestion of one relation -> its prompts parquet (SPEC §2)."""

from __future__ import annotations

import logging

from kn.data.pararel import build_bags
from kn.io import provenance, write_parquet
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.ingest")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    if args.relation is None:
        raise SystemExit("ingest needs --relation")
    prompts, facts = build_bags(cfg.data.resources_dir, [args.relation], cfg.data.max_facts_per_relation)
    write_parquet(args.output("prompts"), prompts, provenance(cfg, "ingest", relation=args.relation))
    log.info("%s: %d facts, %d prompts", args.relation, len(facts), len(prompts))


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
