"""Stage: probe one relation's prompts (gold probability, gold rank, top-1, correctness; SPEC §1; a causal
LM's table adds template use, exact match of the greedy continuation and log P(object), docs/causal.md).

Inputs: ``--in data=<relation prompts parquet>`` and, for the trained organism, ``--in
model=<dir>`` (its held-out templates are read from there). Output: ``--out probe=...parquet``.
"""

from __future__ import annotations

import logging

from kn.io import provenance
from kn.models.training import read_heldout_templates
from kn.probe import probe_relation
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import PROBE, PROBE_CAUSAL, RELATION_PROMPTS

log = logging.getLogger("kn.probe")


def main(args: StageArgs) -> None:
    relation = args.require_relation()
    prompts = RELATION_PROMPTS.read(args.input("data"), relation)
    loaded = load_model(args)
    heldout = read_heldout_templates(loaded.spec).get(relation, [])
    table = probe_relation(loaded.model, loaded.tokenizer, prompts, heldout, codec=loaded.codec)
    (PROBE_CAUSAL if loaded.codec.causal else PROBE).write(
        args.output("probe"), table, provenance(args.cfg, "probe", relation=relation, **loaded.record()))
    scored = table[~table["skipped"]]
    log.info(
        "%s: %d prompts, accuracy %.3f, %d skipped (object not one token)",
        relation, len(table), scored["correct"].mean() if len(scored) else float("nan"), int(table["skipped"].sum()),
    )


if __name__ == "__main__":
    run_stage(main)
