"""Stage: one tidy JSON record of a finished organism-sweep variant.

Inputs (the variant's own files, named by kn.layout): ``metrics`` (training metrics JSON),
``kn_stats`` (analysis JSON), ``effects`` (suppress/amplify summary CSV), ``prompts:<rel>/<shard>``
(attribution prompt tables: gold probabilities), ``ceiling`` (localisation ceilings CSV), ``record:<rel>`` (refine JSON per relation),
``neurons:<rel>`` (refined neurons: the IG sets go into the record, for the seed-stability
measure) and ``benchmark:<key>`` (every job's benchmark file). ``--variant`` names the variant.
Output: ``--out record=<variant>.json``.
"""

from __future__ import annotations

import json
import logging

from kn.io import provenance, write_json
from kn.stages.cli import StageArgs, run_stage
from kn.sweep import collect_variant, job_seconds, variant_overrides
from kn.localise import ceiling_lines
from kn.tables import CEILING, EFFECT_SUMMARY, NEURONS, SHARD_PROMPTS, concat, read_refine_record

log = logging.getLogger("kn.sweep")


def main(args: StageArgs) -> None:
    cfg, name = args.cfg, args.require_variant()
    spec = cfg.sweep.variants[name]
    gold_probs = concat(SHARD_PROMPTS.read(path) for path in args.keyed_inputs("prompts").values())["gold_prob"]
    record = collect_variant(
        json.loads(args.input("metrics").read_text(encoding="utf-8")),
        json.loads(args.input("kn_stats").read_text(encoding="utf-8")),
        EFFECT_SUMMARY.read(args.input("effects")),
        gold_probs,
        {rel: read_refine_record(path) for rel, path in args.keyed_inputs("record").items()},
        job_seconds(list(args.keyed_inputs("benchmark").values())),
        ceiling_lines(CEILING.read(args.input("ceiling"))),
    )
    neurons = concat(NEURONS.read(path, rel) for rel, path in args.keyed_inputs("neurons").items())
    record["ig_neurons"] = neurons.loc[neurons["method"] == "ig", ["relation", "fact_id", "layer", "neuron"]].values.tolist()
    write_json(args.output("record"), {
        "variant": name, "factor": str(spec["factor"]), "value": str(spec["value"]),
        "overrides": variant_overrides(cfg.sweep.variants, name), **record,
        "provenance": provenance(cfg, "sweep_collect", variant=name),
    })
    log.info("%s: %s", name, {k: v for k, v in record.items() if k.startswith(("suppress_own_ig", "amplify_own_ig"))})


if __name__ == "__main__":
    run_stage(main)
