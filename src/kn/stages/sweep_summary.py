"""Stage: the organism-sweep table and figures: effect size against each varied factor.

Inputs: one record per variant ``--in record:<variant>=<variant>.json`` (sweep_collect; each
holds its variant's IG neuron sets for the seed-stability measure). Outputs: ``csv``, ``markdown``, ``json`` and the
effects, confidence and ceiling figures (PNG and PDF).
"""

from __future__ import annotations

import json
import logging

from kn.figures import save_figure, sweep_effects_figure, sweep_scatter_figure
from kn.io import provenance, write_json, write_text
from kn.stages.cli import StageArgs, run_stage
from kn.sweep import (
    METHODS,
    confidence_trend,
    factor_axes,
    ig_neuron_table,
    neuron_jaccard,
    seed_stability,
    seed_variants,
    sweep_markdown,
    sweep_table,
)

log = logging.getLogger("kn.sweep")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    variants, baseline = cfg.sweep.variants, str(cfg.sweep.baseline)
    records = [json.loads(path.read_text()) for path in args.keyed_inputs("record").values()]
    table, layers = sweep_table(records, variants)
    by_name = {r["variant"]: r for r in records}
    stability = {}
    seeds = seed_variants(variants, baseline, list(by_name))
    for other in seeds[1:]:
        pair = [ig_neuron_table(by_name[name]["ig_neurons"]) for name in (baseline, other)]
        stability[other] = seed_stability(neuron_jaccard(*pair, method="ig"), int(by_name[other]["n_layers"]),
                                          int(by_name[other]["ffn_size"]))
    trend = confidence_trend(table)
    write_text(args.output("csv"), table.to_csv(index=False))
    write_text(args.output("markdown"), sweep_markdown(table, layers, records, baseline, stability, trend))
    write_json(args.output("json"), {"variants": records, "seed_stability": stability, "confidence_trend": trend,
                                     "provenance": provenance(cfg, "sweep_summary")})
    save_figure(sweep_effects_figure(table, factor_axes(variants, baseline, cfg), METHODS),
                [args.output("figure_png"), args.output("figure_pdf")])
    save_figure(sweep_scatter_figure(table, "mean_gold_prob", "mean gold probability of the studied prompts"),
                [args.output("confidence_png"), args.output("confidence_pdf")])
    save_figure(sweep_scatter_figure(table, "ffn_mask_all", "[MASK]-FFN ceiling (ffn_mask_all, localise)", ceiling=True),
                [args.output("ceiling_png"), args.output("ceiling_pdf")])
    log.info("sweep table over %d variants written", len(table))


if __name__ == "__main__":
    run_stage(main)
