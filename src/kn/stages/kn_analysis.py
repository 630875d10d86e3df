"""Stage: the paper's knowledge-neuron statistics over all relations (SPEC §4 ``2_analyze_kn.py``, §9).

Inputs, per selected relation: its refined neurons ``--in neurons:<rel>=<rel>.parquet`` and
the refine record ``--in record:<rel>=<rel>.json`` (studied facts, adaptive p, the model's
number of layers). Outputs: kn_stats.json (main), kn_stats.csv/.md (ours vs baseline vs
paper), kn_per_relation.csv, layer_distribution.csv and the kneurons_distribution figure
(PNG and PDF).
"""

from __future__ import annotations

import logging

from kn.analysis import PAPER, fact_sets, kn_statistics, statistics_markdown, statistics_tables
from kn.figures import layer_distribution_figure, save_figure
from kn.io import provenance, write_json, write_text
from kn.stages.cli import StageArgs, run_stage
from kn.tables import METHODS, NEURONS, layers_and_units, neuron_lists, read_refine_record

log = logging.getLogger("kn.kn_analysis")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    records = {rel: read_refine_record(path) for rel, path in args.keyed_inputs("record").items()}
    neuron_paths = args.keyed_inputs("neurons")
    if set(neuron_paths) != set(records):
        raise SystemExit(f"relations with neurons {sorted(neuron_paths)} differ from those with records {sorted(records)}")
    sets: dict[str, dict] = {method: {} for method in METHODS}
    for relation, path in neuron_paths.items():
        frame = NEURONS.read(path, relation)
        for method in METHODS:
            sets[method][relation] = fact_sets(neuron_lists(frame, method, path), records[relation][method]["fact_ids"])
    n_layers, _units = layers_and_units(list(records.values()))
    stats, shares = kn_statistics(sets, records, n_layers, int(cfg.analysis.inter_draws), int(cfg.seed))
    for method in METHODS:
        log.info("%s: %s", method, {k: v for k, v in stats[method].items() if k != "relations_not_in_target"})
    table, per_relation, layers = statistics_tables(stats, records, shares)
    record = provenance(cfg, "kn_analysis", relations=sorted(records), n_layers=n_layers)
    write_json(args.output("stats"), {"methods": stats, "layer_share": shares, "paper": PAPER, "provenance": record})
    write_text(args.output("table"), table.to_csv(index=False))
    write_text(args.output("per_relation"), per_relation.to_csv(index=False))
    write_text(args.output("layers"), layers.to_csv(index=False))
    write_text(args.output("markdown"), statistics_markdown(table, stats, layers))
    save_figure(layer_distribution_figure(shares["ig"]), [args.output("figure_png"), args.output("figure_pdf")])


if __name__ == "__main__":
    run_stage(main)
