"""Stage: knowledge attribution of one shard of a relation's study facts (SPEC §3).

Inputs: ``--in data=<relation prompts parquet>`` and, for the trained organism, ``--in model=<dir>``.
Outputs: ``--out scores=<shard>.parquet`` (integrated gradients and the activation baseline,
long format, only scores >= ig.storage_ratio x the prompt's max) and ``--out
prompts=<shard>.prompts.parquet`` (one row per prompt: gold / prediction / maxima). Shard k
holds the study facts [k * ig.facts_per_shard, min((k + 1) * ig.facts_per_shard, n_study)).
"""

from __future__ import annotations

import logging

import torch

from kn.attribution import attribute_prompts
from kn.io import provenance
from kn.models.adapters import adapter_for
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import RELATION_PROMPTS, SCORES, SHARD_PROMPTS, shard_fact_range, shard_rows, study_fact_count

log = logging.getLogger("kn.attribute")


def main(args: StageArgs) -> None:
    cfg, relation = args.cfg, args.require_relation()
    if args.shard is None:
        raise SystemExit("attribute needs --shard")
    ig = cfg.ig
    data = RELATION_PROMPTS.read(args.input("data"), relation)
    n_study = study_fact_count(int(data["fact_id"].max()) + 1 if len(data) else 0, cfg.study.facts_per_relation)
    facts = shard_fact_range(args.shard, int(ig.facts_per_shard), n_study)
    prompts = shard_rows(data, facts, args.input("data"))
    loaded = load_model(args)
    log.info("%s shard %d: facts %d..%d, %d prompts, device %s, %d threads",
             relation, args.shard, facts.start, facts.stop - 1, len(prompts), loaded.device, torch.get_num_threads())
    scores, table = attribute_prompts(
        loaded.model, loaded.tokenizer, prompts, relation, m=int(ig.m), alpha_rule=str(ig.alpha_rule),
        target=str(ig.target), batch_size=int(ig.batch_size), dtype=str(ig.dtype), storage_ratio=float(ig.storage_ratio),
        codec=loaded.codec,
    )
    adapter = adapter_for(loaded.model)
    meta = provenance(cfg, "attribute", relation=relation, shard=args.shard, fact_ids=[facts.start, facts.stop],
                      n_layers=adapter.n_layers, ffn_size=adapter.ffn_size, **loaded.record())
    SCORES.write(args.output("scores"), scores, meta)
    SHARD_PROMPTS.write(args.output("prompts"), table, meta)
    log.info("%s shard %d: wrote %d score rows", relation, args.shard, len(scores))


if __name__ == "__main__":
    run_stage(main)
