"""Stage: the paper's knowledge-neuron statistics over all relations (SPEC §4 ``2_analyze_kn.py``, §9).

Inputs: every selected relation's refined neurons as ``--in neurons:<rel>=<rel>.parquet``
(the ``<rel>.json`` beside it gives the number of facts). Outputs: kn_stats.json (main),
kn_stats.csv/.md (ours vs baseline vs paper), kn_per_relation.csv, layer_distribution.csv
and the kneurons_distribution figure (PNG and PDF).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random

import pandas as pd

from kn.analysis import (
    PAPER,
    average_kn_per_fact,
    fact_sets,
    inter_relation_sharing,
    intra_relation_sharing,
    layer_distribution,
)
from kn.config import model_location
from kn.figures import layer_distribution_figure, save_figure
from kn.io import provenance, read_parquet, write_json, write_text
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.kn_analysis")

METHODS = ("ig", "base")


def read_neurons(args: StageArgs) -> tuple[dict[str, dict[str, list]], dict[str, dict]]:
    """Per method {relation: fact KN sets} and per relation its refine JSON record."""
    sets: dict[str, dict[str, list]] = {m: {} for m in METHODS}
    records: dict[str, dict] = {}
    for relation, path in args.keyed_inputs("neurons").items():
        summary_path = path.with_suffix(".json")
        try:
            record = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{summary_path}:{exc.lineno}: malformed JSON ({exc.msg}); rerun refine for {relation}") from None
        neurons = read_parquet(path)
        for method in METHODS:
            if method not in record or "n_facts" not in record[method]:
                raise ValueError(f"{summary_path}: no '{method}.n_facts' (docs/CONTRACTS.md, refine)")
            rows = neurons[(neurons["method"] == method) & (neurons["relation"].astype(str) == relation)]
            sets[method][relation] = fact_sets(rows, int(record[method]["n_facts"]))
        records[relation] = record
    return sets, records


def num_layers(cfg) -> int:
    """Layer count of the studied model, from its config (the figure shows every layer, empty ones too)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_location(cfg.model, cfg.results_dir)).num_hidden_layers)


def main(args: StageArgs) -> None:
    cfg = args.cfg
    sets, records = read_neurons(args)
    n_layers = num_layers(cfg)
    stats: dict[str, dict] = {}
    shares: dict[str, list[float]] = {}
    for method in METHODS:
        by_relation = sets[method]
        intra, n_pairs = intra_relation_sharing(by_relation)
        # One seeded stream per method, so both methods see the same draws (the authors' are unseeded).
        inter, n_draws = inter_relation_sharing(by_relation, int(cfg.evaluate.inter_draws), random.Random(int(cfg.seed)))
        stats[method] = {
            "avg_kn_per_fact": average_kn_per_fact(by_relation),
            "intra_shared": None if math.isnan(intra) else intra,  # null: no pairs (strict JSON has no NaN)
            "intra_pairs": n_pairs,
            "inter_shared": None if math.isnan(inter) else inter,  # null: fewer than two relations
            "inter_draws": n_draws,
            "n_facts": sum(len(s) for s in by_relation.values()),
            "n_facts_without_kn": sum(1 for s in by_relation.values() for kn in s if not kn),
            "relations_not_in_target": [r for r in sorted(records) if not records[r][method]["in_target"]],
        }
        shares[method] = layer_distribution(by_relation, n_layers).tolist()
        log.info("%s: %s", method, {k: v for k, v in stats[method].items() if k != "relations_not_in_target"})

    table = pd.DataFrame(
        [
            {"metric": metric, "ours": stats["ig"][metric], "baseline": stats["base"][metric],
             "paper_ours": PAPER[metric]["ig"], "paper_baseline": PAPER[metric]["base"], "paper_source": PAPER[metric]["source"]}
            for metric in ("avg_kn_per_fact", "intra_shared", "inter_shared")
        ]
    )
    per_relation = pd.DataFrame(
        [
            {"relation": rel, "method": method, "n_facts": rec[method]["n_facts"], "avg_kn": rec[method]["avg_kn"],
             "p": rec[method]["p"], "in_target": rec[method]["in_target"], "evaluations": len(rec[method]["evaluations"]),
             "relation_level": len(rec[method]["relation_level"])}
            for rel, rec in sorted(records.items()) for method in METHODS
        ]
    )
    layers = pd.DataFrame({"layer": range(1, n_layers + 1), "ig_share": shares["ig"], "base_share": shares["base"]})

    record = provenance(cfg, "kn_analysis", relations=sorted(records), n_layers=n_layers)
    write_json(args.output("stats"), {"methods": stats, "layer_share": shares, "paper": PAPER, "provenance": record})
    write_text(args.output("table"), table.to_csv(index=False))
    write_text(args.output("per_relation"), per_relation.to_csv(index=False))
    write_text(args.output("layers"), layers.to_csv(index=False))
    write_text(args.output("markdown"), markdown_report(table, stats, layers))
    save_figure(layer_distribution_figure(shares["ig"]), [args.output("figure_png"), args.output("figure_pdf")])


def markdown_report(table: pd.DataFrame, stats: dict[str, dict], layers: pd.DataFrame) -> str:
    """Ours vs baseline vs the paper (SPEC §12), plus the IG layer shares."""
    out = io.StringIO()
    out.write("# Knowledge-neuron statistics (SPEC §4)\n\n")
    out.write("| metric | ours (IG) | baseline | paper ours | paper baseline | paper source |\n|---|---|---|---|---|---|\n")
    for row in table.itertuples():
        out.write(f"| {row.metric} | {_number(row.ours)} | {_number(row.baseline)} | {row.paper_ours} | {row.paper_baseline} | "
                  f"{row.paper_source} |\n")
    for method, label in (("ig", "IG"), ("base", "baseline")):
        s = stats[method]
        out.write(f"\n{label}: {s['n_facts']} facts ({s['n_facts_without_kn']} without KNs), {s['intra_pairs']} "
                  f"intra-relation pairs, {s['inter_draws']} inter-relation draws; relations whose adaptive p never "
                  f"reached the target: {', '.join(s['relations_not_in_target']) or 'none'}.\n")
    out.write("\n| layer | share of IG KNs | share of baseline KNs |\n|---|---|---|\n")
    for row in layers.itertuples():
        out.write(f"| {row.layer} | {row.ig_share:.1%} | {row.base_share:.1%} |\n")
    return out.getvalue()


def _number(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
