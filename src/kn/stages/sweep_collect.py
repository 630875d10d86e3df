"""Stage: one tidy JSON record of a finished organism-sweep variant (issue 9)."""

from __future__ import annotations

import logging

from kn.data.pararel import load_relations, select_relations
from kn.io import provenance, write_json
from kn.stages.cli import StageArgs, run_stage
from kn.sweep import collect_variant, variant_overrides

log = logging.getLogger("kn.sweep")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    name = args.input("variant_dir").name  # results/sweep/<variant>
    spec = cfg.sweep.variants[name]
    relations = select_relations(list(load_relations(cfg.data.resources_dir)), cfg.data.relations)
    model_dir = args.input("variant_dir") / str(cfg.model.name)
    record = collect_variant(model_dir, relations)
    write_json(
        args.output("record"),
        {
            "variant": name,
            "factor": str(spec["factor"]),
            "value": str(spec["value"]),
            "overrides": variant_overrides(cfg.sweep.variants, name),
            **record,
            "provenance": provenance(cfg, "sweep_collect", variant=name),
        },
    )
    log.info("%s: %s", name, {k: v for k, v in record.items() if k.startswith(("suppress_own_ig", "amplify_own_ig"))})


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
