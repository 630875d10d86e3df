"""Stage: plant facts the model does not know into known FFN units of a copy of it (positive control, kn.planting).

Inputs: every selected relation's ingested prompt table as ``--in data:<rel>=...`` (the studied prompts the keys
stay quiet on and the acceptance checks); ParaRel's resources under ``data.resources_dir`` (the facts to plant);
the trained organism as ``--in model=...`` (pretrained models come from ``model.path``).
Outputs: the planted checkpoint ``--out model=<dir>`` (loads with ``from_pretrained``), the planted facts as a
ParaRel resources folder ``--out pararel=<dir>`` (the planted study ingests it), ``--out record=planting.json``
and ``--out accepted=acceptance.txt`` ("passed" or "failed": whether the planted study runs).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from kn.config import to_container
from kn.data.pararel import load_relations, read_query_pairs
from kn.io import atomic_dir, provenance, write_json, write_text
from kn.models.adapters import adapter_for
from kn.planting import PlantingSettings, assign_layers, choose_facts, plant, planted_pararel, planting_record, studied_sample
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import RELATION_PROMPTS, studied_rows

log = logging.getLogger("kn.plant_facts")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    settings = PlantingSettings.of(to_container(cfg.controls), int(cfg.seed))
    batch_size = int(cfg.controls.batch_size)
    tables = {rel: RELATION_PROMPTS.read(path, rel) for rel, path in args.keyed_inputs("data").items()}
    studied = pd.concat([studied_rows(frame, cfg.study.facts_per_relation) for frame in tables.values()], ignore_index=True)
    resources = Path(cfg.data.resources_dir)
    catalogue = load_relations(resources)
    pairs = read_query_pairs(resources / "query_pairs.json")
    trained = cfg.model.source == "trained"
    if trained and cfg.data.max_facts_per_relation is None:
        raise ValueError("controls: the organism trained on every ParaRel fact (data.max_facts_per_relation = null), "
                         "so no fact is unseen; cap it or set controls.enabled=false")
    # the first fact no study uses: after the organism's training set, or after a pretrained model's studied facts;
    # where every fact is studied (the paper's setting), the planted facts come from those the model gets wrong
    first = {}
    for rel, frame in tables.items():
        used = int(cfg.data.max_facts_per_relation) if trained else int(studied_rows(frame, cfg.study.facts_per_relation)["fact_id"].nunique())
        first[rel] = used if used < len(pairs[rel]) else 0
    loaded = load_model(args)
    model, codec = loaded.model, loaded.codec
    n_layers = adapter_for(model).n_layers
    facts = choose_facts(model, codec, {rel: catalogue[rel].templates for rel in tables}, pairs, first, settings,
                         batch_size)
    assign_layers(facts, n_layers, settings.layers, settings.seed)
    background, check = studied_sample(codec.usable_rows(studied), settings.background_prompts, settings.seed, facts)
    result = plant(model, codec, facts, studied, codec.encode(list(background["prompt"])),
                   codec.encode(list(check["prompt"])), codec.target_ids(list(check["prompt"]), list(check["object"])),
                   settings, batch_size)
    record = planting_record(result, settings, n_layers)
    record["provenance"] = provenance(cfg, "plant_facts", **loaded.record())
    with atomic_dir(args.output("model")) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    with atomic_dir(args.output("pararel")) as tmp:
        (tmp / "patterns").mkdir()
        planted = planted_pararel(record)
        for rel in planted:
            shutil.copyfile(resources / "patterns" / f"{rel}.jsonl", tmp / "patterns" / f"{rel}.jsonl")
        shutil.copyfile(resources / "lama_relations.jsonl", tmp / "lama_relations.jsonl")
        (tmp / "query_pairs.json").write_text(json.dumps(planted, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_json(args.output("record"), record)
    write_text(args.output("accepted"), ("passed" if record["acceptance"]["passed"] else "failed") + "\n")
    accept = record["acceptance"]
    log.info("planted %d facts (%d could not be), units per fact %s; acceptance %s: held-out top-1 %.3f, studied "
             "top-1 changed %.4f, gold probability change %+.4f", accept["planted_facts"], len(record["unplanted"]),
             record["units_per_fact"], "passed" if accept["passed"] else "FAILED", accept["test_top1"],
             accept["studied_top1_changed"], accept["studied_gold_prob_change"])


if __name__ == "__main__":
    run_stage(main)
