"""Stage: probe one relation's prompts (gold probability, gold rank, top-1, correctness; SPEC §1)."""

from __future__ import annotations

import logging

from kn.io import provenance, read_parquet, write_parquet
from kn.models.load import load_masked_lm, model_location, resolve_device
from kn.models.training import read_heldout_templates
from kn.probe import probe_relation
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.probe")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    if args.relation is None:
        raise SystemExit("probe needs --relation")
    prompts = read_parquet(args.input("data"))
    found = set(prompts["relation"].astype(str))
    if found != {args.relation}:
        raise ValueError(f"{args.input('data')}: expected prompts of relation {args.relation}, found {sorted(found)}")
    spec = str(args.inputs.get("model", model_location(cfg.model, cfg.results_dir)))
    model, tokenizer = load_masked_lm(spec, resolve_device(cfg.ig.device), cfg.model.layer_norm_eps)
    heldout = read_heldout_templates(spec).get(args.relation, [])
    table = probe_relation(model, tokenizer, prompts, heldout)
    write_parquet(args.output("probe"), table, provenance(cfg, "probe", relation=args.relation, model=spec))
    scored = table[~table["skipped"]]
    log.info(
        "%s: %d prompts, accuracy %.3f, %d skipped (object not one token)",
        args.relation, len(table), scored["correct"].mean() if len(scored) else float("nan"), int(table["skipped"].sum()),
    )


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
