"""Stage: what the unchanged study recovers of the planted storage (positive control, kn.controls).

Inputs: ``--in record=planting.json`` and ``--in study=study.json`` (the planted study's run record); the
planted checkpoint ``--in model=<dir>``; the planted study's files, per planted relation: ``--in data:<rel>``
(its ingested prompts), ``--in neurons:<rel>``, ``--in evaluation:<rel>``, ``--in localisation:<rel>``, and
its attribution shards as ``--in scores:<rel>/<k>`` / ``--in prompts:<rel>/<k>``; the run's own prompt tables
of those relations as ``--in studied:<rel>`` (new objects and perplexity prompts for the updates).
Outputs: ``table`` (controls/planted.csv), ``layers`` (recall by layer, csv), ``facts`` (per fact, csv),
``markdown``, ``json`` (for the summary) and the recall figure as ``figure_png`` / ``figure_pdf``.
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from kn.config import to_container
from kn.controls import (control_lines, layer_table, planted_effects, planted_facts, readout_ranks, study_rows,
                         summary_table, updates_through)
from kn.editing import PromptScorer
from kn.figures import planted_recall_figure, save_figure
from kn.io import provenance, write_json, write_text
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import (EVALUATION, LOCALISATION, PLANTED_LAYERS, PLANTED_SUMMARY, RELATION_PROMPTS, facts_of,
                       read_attribution, read_neurons, studied_rows)

log = logging.getLogger("kn.controls_summary")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    record = json.loads(args.input("record").read_text(encoding="utf-8"))
    study = json.loads(args.input("study").read_text(encoding="utf-8"))
    table = layers = facts_table = None
    loaded = load_model(args)  # also where no planted study ran: every model stage records the device it ran on
    if study["ran"]:
        data = args.keyed_inputs("data")
        facts = {rel: facts_of(RELATION_PROMPTS.read(path, rel), path) for rel, path in data.items()}
        planted = planted_facts(record, facts)
        neurons = {rel: read_neurons(path, rel) for rel, path in args.keyed_inputs("neurons").items()}
        attribution = {rel: read_attribution({key: (args.inputs[f"scores:{key}"], args.inputs[f"prompts:{key}"])
                                              for key in args.keyed_inputs("scores") if key.startswith(f"{rel}/")}, rel)
                       for rel in data}
        evaluation = {rel: EVALUATION.read(path, rel) for rel, path in args.keyed_inputs("evaluation").items()}
        localisation = {rel: LOCALISATION.read(path, rel) for rel, path in args.keyed_inputs("localisation").items()}
        studied = {rel: facts_of(studied_rows(RELATION_PROMPTS.read(path, rel), cfg.study.facts_per_relation), path)
                   for rel, path in args.keyed_inputs("studied").items()}
        batch_size = int(cfg.controls.batch_size)
        rows = study_rows(planted, neurons, attribution, evaluation, localisation)
        effects = planted_effects(loaded.model, loaded.codec, planted, suppress=float(cfg.evaluate.suppress_factor),
                                  amplify=float(cfg.evaluate.amplify_factor), batch_size=batch_size)
        readout = readout_ranks(loaded.model, loaded.codec, planted, studied, batch_size)
        facts_table = rows.merge(effects, on=["relation", "fact_id"]).merge(readout, on=["relation", "fact_id"])
        scorer = PromptScorer(loaded.model, loaded.tokenizer, {}, int(cfg.edit.batch_size), codec=loaded.codec)
        if not loaded.codec.causal:
            scorer.object_ids = _object_ids(loaded.tokenizer, planted, studied)
        edit = to_container(cfg.edit)
        updates = {
            "planted": updates_through(scorer, planted, studied, {(p.relation, p.fact_id): p.units for p in planted},
                                       edit, int(cfg.seed)),
            "ig": updates_through(scorer, planted, studied, {(p.relation, p.fact_id): neurons[p.relation]["ig"].get(p.fact_id, [])
                                                             for p in planted}, edit, int(cfg.seed)),
        }
        table = summary_table(facts_table, updates, int(cfg.evaluate.bootstrap), int(cfg.seed))
        layers = layer_table(facts_table, int(record["n_layers"]), int(cfg.evaluate.bootstrap), int(cfg.seed))
    lines = control_lines(record, table)
    for line in lines:
        log.info("%s", line)
    meta = provenance(cfg, "controls_summary", **loaded.record())
    # without a planted study the tables keep their columns and have no rows
    table = pd.DataFrame(columns=list(PLANTED_SUMMARY.columns)) if table is None else table
    layers = pd.DataFrame(columns=list(PLANTED_LAYERS.columns)) if layers is None else layers
    facts_table = pd.DataFrame(columns=["relation", "fact_id", "layer", "units"]) if facts_table is None else facts_table
    write_text(args.output("table"), table.to_csv(index=False))
    write_text(args.output("layers"), layers.to_csv(index=False))
    write_text(args.output("facts"), facts_table.to_csv(index=False))
    all_row = table[table["relation"] == "ALL"].iloc[0].to_dict() if len(table) else None
    write_json(args.output("json"), {"lines": lines, "acceptance": record["acceptance"], "all": all_row,
                                     "units_per_fact": record["units_per_fact"], "provenance": meta})
    markdown = ["# Positive control: planted facts", "", *lines, ""]
    if len(table):
        markdown += ["## Per relation", "", table.to_markdown(index=False, floatfmt=".3f"), "",
                     "## Recall by planted layer", "", layers.to_markdown(index=False, floatfmt=".3f"), ""]
    write_text(args.output("markdown"), "\n".join(markdown) + f"\n<!-- provenance: {json.dumps(meta)} -->\n")
    save_figure(planted_recall_figure(layers, int(record["n_layers"])),
                [args.output("figure_png"), args.output("figure_pdf")])


def _object_ids(tokenizer, planted, studied) -> dict[str, int | None]:
    """A masked LM's vocabulary id of every object the updates may use."""
    from kn.models.encoding import object_token_id

    objects = {p.fact.object for p in planted} | {f.object for facts in studied.values() for f in facts}
    return {obj: object_token_id(tokenizer, obj) for obj in objects}


if __name__ == "__main__":
    run_stage(main)
