"""Stage: the localisation ceilings over relations (kn.localise) and their figure.

Inputs: per relation ``--in results:<rel>=<rel>.parquet`` from the localise stage. Outputs:
``ceiling.csv`` (one row per relation and ``ALL``: each ablation's relative change of the gold
probability with its 95% CI), ``ceiling.json`` (the ALL row and the provenance a CSV cannot
carry) and the figure (PNG and PDF).
"""

from __future__ import annotations

import logging

from kn.figures import localisation_figure, save_figure
from kn.io import provenance, write_json, write_text
from kn.localise import ALL, ceiling_lines, ceiling_table
from kn.stages.cli import StageArgs, run_stage
from kn.tables import LOCALISATION, concat

log = logging.getLogger("kn.localise_summary")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    per_prompt = concat(LOCALISATION.read(path, rel) for rel, path in args.keyed_inputs("results").items())
    ceiling = ceiling_table(per_prompt, int(cfg.localise.bootstrap), int(cfg.seed))
    record = provenance(cfg, "localise_summary", relations=sorted(per_prompt["relation"].unique()))
    overall = ceiling_lines(ceiling)
    write_text(args.output("csv"), ceiling.to_csv(index=False, float_format="%.6g"))
    write_json(args.output("json"), {ALL: overall, "provenance": record})
    n_layers = sum(1 for name in overall if name.startswith("ffn_mask_layer_"))
    fig = localisation_figure(overall, n_layers, f"{cfg.model.name}: where the studied facts live ({ALL} relations)")
    save_figure(fig, [args.output("png"), args.output("pdf")])
    log.info("ceilings (%s): ffn_mask_all %+.3f, ffn_subject_all %+.3f, ffn_all_positions %+.3f, attn_mask_all %+.3f",
             ALL, overall["ffn_mask_all"], overall["ffn_subject_all"], overall["ffn_all_positions"],
             overall["attn_mask_all"])


if __name__ == "__main__":
    run_stage(main)
