"""Stage: knowledge-neuron refinement of one relation (SPEC §4), for IG and the activation baseline.

Inputs: the relation's attribution shards as ``--in scores:<k>=<shard>.parquet`` and their
prompt tables as ``--in prompts:<k>=<shard>.prompts.parquet``. Outputs: the refined neurons
(``--out neurons=...parquet``) and the adaptive-p record per method plus the studied facts
and the model's shape (``--out summary=...json``), as in docs/CONTRACTS.md.
"""

from __future__ import annotations

import logging

from kn.io import provenance, write_json
from kn.refine import refine_relation
from kn.stages.cli import StageArgs, run_stage
from kn.tables import NEURONS, read_attribution, shard_pairs

log = logging.getLogger("kn.refine")


def main(args: StageArgs) -> None:
    cfg, relation = args.cfg, args.require_relation()
    rc = cfg.refine
    attribution = read_attribution(shard_pairs(args.inputs), relation)
    n_prompts = attribution.scorable_prompts()
    dropped = attribution.unscorable_facts()
    if dropped:
        log.warning("%s: %d studied facts have no attributable prompt (object not one token): %s", relation,
                    len(dropped), dropped[:10])
    neurons, records = refine_relation(
        attribution.scores, n_prompts, {"ig": float(rc.t), "base": float(rc.t_base)},
        relation_share=float(rc.relation_share), p=float(rc.p), p_step=float(rc.p_step), max_evals=int(rc.max_evals),
        target_min=float(rc.target_min), target_max=float(rc.target_max), min_prompts=int(rc.min_prompts),
    )
    for method, record in records.items():
        if not record["in_target"]:
            log.warning("%s %s: no evaluation of p landed in [%s, %s] within %d evaluations %s; keeping the last (p=%r)",
                        relation, method, rc.target_min, rc.target_max, rc.max_evals,
                        [(e["p"], round(e["avg"], 3)) for e in record["evaluations"]], record["p"])
        log.info("%s %s: p=%r, avg #KN=%.3f over %d facts", relation, method, record["p"], record["avg_kn"],
                 record["n_facts"])
    meta = provenance(cfg, "refine", relation=relation)
    NEURONS.write(args.output("neurons"), neurons.assign(relation=relation), meta)
    write_json(args.output("summary"), {"relation": relation, **records, "facts_without_attribution": dropped,
                                        **attribution.model_shape, "provenance": meta})


if __name__ == "__main__":
    run_stage(main)
