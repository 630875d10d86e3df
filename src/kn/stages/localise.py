"""Stage: where the model keeps one relation's studied facts (kn.localise), per prompt.

Inputs: the relation's prompt table ``--in data=<rel>.parquet`` and the trained organism as
``--in model=...`` (pretrained models come from ``model.path``). Output: ``--out results=...parquet``,
one row per studied prompt and ablation with the plain and the ablated gold probability.
"""

from __future__ import annotations

import logging

from kn.io import provenance
from kn.localise import localise_relation
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import LOCALISATION, RELATION_PROMPTS, studied_rows

log = logging.getLogger("kn.localise")


def main(args: StageArgs) -> None:
    cfg, relation = args.cfg, args.require_relation()
    prompts = studied_rows(RELATION_PROMPTS.read(args.input("data"), relation), cfg.study.facts_per_relation)
    loaded = load_model(args)
    per_prompt = localise_relation(loaded.model, loaded.codec, prompts, batch_size=int(cfg.localise.batch_size))
    LOCALISATION.write(args.output("results"), per_prompt,
                       provenance(cfg, "localise", relation=relation, **loaded.record()))
    for name in ("ffn_mask_all", "attn_mask_all"):
        rows = per_prompt[per_prompt["ablation"] == name]
        log.info("%s %s: %+.3f (ratio of averages over %d prompts)", relation, name,
                 (rows.p_ablated - rows.p0).mean() / rows.p0.mean(), len(rows))


if __name__ == "__main__":
    run_stage(main)
