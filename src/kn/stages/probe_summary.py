"""Stage: per-relation accuracy table from the probe files (train vs held-out templates, majority
baseline, skipped objects) plus relation use (does the model read the relation or only the subject?)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from kn.data.pararel import load_relations, read_query_pairs, select_relations
from kn.io import atomic_path, provenance, read_parquet, write_text
from kn.models.load import load_masked_lm, model_location, resolve_device
from kn.models.training import read_heldout_templates
from kn.probe import accuracy_summary, overall_row, relation_use, train_template_ids
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.probe_summary")

COLUMN_TITLES = {
    "relation": "relation",
    "facts": "facts",
    "skipped_facts": "skipped facts",
    "train_accuracy": "train-template acc.",
    "heldout_accuracy": "held-out acc.",
    "majority_baseline": "majority baseline",
    "train_gold_prob": "gold prob. (train)",
    "xrel_own_object": "own object in other relation",
    "xrel_other_type": "other relation's type",
}


def markdown_table(table: pd.DataFrame, model: str) -> str:
    """The accuracy table for humans: percentages, one row per relation and an unweighted mean row."""
    lines = [
        f"# Probe accuracy: {model}",
        "",
        "Top-1 accuracy over the full vocabulary at [MASK] (SPEC §1). Held-out templates were never "
        "seen in training (trained organisms only). Majority baseline: always answering the relation's most "
        "frequent object. Relation use: a subject put into another relation's templates; 'own object' = the "
        "model still answers the subject's own object (where that is not a valid answer there), 'other "
        "relation's type' = it answers some object of the other relation. Skipped facts have objects that are "
        "not one token for this tokenizer and are not scored.",
        "",
        "| " + " | ".join(COLUMN_TITLES.values()) + " |",
        "|" + "---|" * len(COLUMN_TITLES),
    ]
    for row in table.to_dict(orient="records"):
        cells = []
        for key in COLUMN_TITLES:
            value = row[key]
            if key in ("relation", "facts", "skipped_facts"):
                cells.append(str(value))
            elif pd.isna(value):
                cells.append("n/a")
            elif key == "train_gold_prob":
                cells.append(f"{value:.3f}")
            else:
                cells.append(f"{100 * value:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: StageArgs) -> None:
    cfg = args.cfg
    resources = Path(cfg.data.resources_dir)
    catalogue = load_relations(resources)
    relations = select_relations(list(catalogue), cfg.data.relations)
    probe_dir, data_dir = args.input("probe_dir"), args.input("data_dir")
    probes = pd.concat([read_parquet(probe_dir / f"{rel}.parquet") for rel in relations], ignore_index=True)
    prompts = pd.concat([read_parquet(data_dir / f"{rel}.parquet") for rel in relations], ignore_index=True)
    table = accuracy_summary(probes, prompts)

    spec = str(args.inputs.get("model", model_location(cfg.model, cfg.results_dir)))
    model, tokenizer = load_masked_lm(spec, resolve_device(cfg.ig.device), cfg.model.layer_norm_eps)
    templates = {rel: list(meta.templates) for rel, meta in catalogue.items()}
    train_templates = train_template_ids(templates, read_heldout_templates(spec))
    objects = {rel: {obj for _, obj in pairs} for rel, pairs in read_query_pairs(resources / "query_pairs.json").items()}
    probed = probes[~probes["skipped"]].drop_duplicates(["relation", "fact_id"])[["relation", "fact_id"]]
    facts = prompts.drop_duplicates(["relation", "fact_id"]).merge(probed, on=["relation", "fact_id"])
    use = relation_use(model, tokenizer, facts[["relation", "fact_id", "subject", "object"]], templates, train_templates,
                       objects, int(cfg.seed))
    table = table.merge(use, on="relation", how="left")
    mean_row = {"relation": "mean", **overall_row(table)}
    table = pd.concat([table, pd.DataFrame([mean_row])], ignore_index=True)

    with atomic_path(args.output("csv")) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    # CSV has no metadata slot: the provenance record rides in the Markdown twin, as a comment
    record = json.dumps(provenance(cfg, "probe_summary", model=spec, relations=relations), default=str)
    write_text(args.output("md"), markdown_table(table, cfg.model.name) + f"\n<!-- provenance: {record} -->\n")
    log.info("summary of %d relations: %s", len(relations), table.iloc[-1].to_dict())


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
