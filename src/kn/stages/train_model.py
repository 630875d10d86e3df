"""Stage: train the embedded model organism (kn-tiny, a BERT masked LM, or kn-tiny-gpt, a GPT-2 causal LM:
``model.train.architecture``) and write its model card, metrics and loss curve.

Training data are the first data.max_facts_per_relation facts of ALL ParaRel relations,
independent of data.relations, so studying a subset of relations never retrains the model.
The ParaRel files come from data.resources_dir (the rule declares them as inputs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kn.config import to_container
from kn.data.bing import SENTENCES_FILE, STATS_FILE, load_sentences
from kn.data.pararel import build_bags, load_relations, read_query_pairs
from kn.figures import save_figure, training_loss_figure
from kn.io import atomic_dir, provenance, write_json, write_text
from kn.models.training import (
    TRAINING_RECORD,
    model_card,
    overall_knowledge,
    parameter_count,
    running_mean,
    study_coverage,
    train_organism,
)
from kn.probe import knowledge_table, probe_relation
from kn.schema import TrainConfig
from kn.stages.cli import StageArgs, run_stage
from kn.tables import concat

log = logging.getLogger("kn.train_model")

LOSS_WINDOW = 50  # steps in the loss curve's running mean


def main(args: StageArgs) -> None:
    cfg = args.cfg
    if cfg.model.source != "trained" or cfg.model.train is None:
        raise SystemExit(f"train_model needs model.source=trained with model.train set (model.name={cfg.model.name})")
    recipe = TrainConfig(**to_container(cfg.model.train))
    torch.set_num_threads(recipe.threads)  # the recipe's, whatever the scheduler granted: same config, same weights
    resources = Path(cfg.data.resources_dir)
    prompts, facts = build_bags(resources, "all", cfg.data.max_facts_per_relation)
    pairs = read_query_pairs(resources / "query_pairs.json")
    catalogue = load_relations(resources)
    vocabulary_objects = sorted({obj for rel in catalogue for _, obj in pairs[rel]})
    log.info("training on %d facts of %d relations (%d prompts)", len(facts), facts["relation"].nunique(), len(prompts))
    sentences = None
    if recipe.natural_ratio > 0:  # web sentences of non-studied facts (kn.models.training.split_natural)
        bing = Path(cfg.distant.resources_dir)
        sentences, _ = load_sentences(bing / SENTENCES_FILE, bing / STATS_FILE)
    organism = train_organism(prompts, vocabulary_objects, recipe, bool(cfg.causal.templates_ending_in_y),
                              sentences=sentences, studied_facts=cfg.study.facts_per_relation)
    probes = [probe_relation(organism.model, organism.tokenizer, group, organism.heldout.get(str(relation), []),
                             codec=organism.codec)
              for relation, group in prompts.groupby("relation", sort=True)]
    templates = {rel: list(meta.templates) for rel, meta in catalogue.items()}
    objects = {rel: {obj for _, obj in rel_pairs} for rel, rel_pairs in pairs.items()}
    table = knowledge_table(organism.model, organism.tokenizer, concat(probes), prompts, templates, organism.heldout,
                            objects, int(cfg.seed), codec=organism.codec)
    overall = overall_knowledge(table)
    data = {
        "relations": int(facts["relation"].nunique()),
        "facts": len(facts),
        "distinct_objects": int(facts["object"].nunique()),
        "vocabulary_objects": len(vocabulary_objects),
        "parameters": parameter_count(organism.model),
        "threads": torch.get_num_threads(),
    }
    if sentences is not None:
        data["study_coverage"] = study_coverage(organism.tokenizer, sentences, int(cfg.study.facts_per_relation),
                                                recipe.seed)
    record = provenance(cfg, "train_model", heldout_templates=organism.heldout, data=data)

    with atomic_dir(args.output("model")) as tmp:
        organism.model.save_pretrained(tmp)
        organism.tokenizer.save_pretrained(tmp)
        write_json(tmp / TRAINING_RECORD, record)
    history = organism.history
    loss_png = args.output("loss")
    figure = training_loss_figure(history.step_loss, running_mean(history.step_loss, LOSS_WINDOW), LOSS_WINDOW,
                                  history.evaluations, f"{cfg.model.name} training")
    save_figure(figure, [loss_png], dpi=120)
    write_json(
        args.output("metrics"),
        {
            **record,
            "overall": overall,
            "per_relation": table.to_dict(orient="records"),
            "training": {
                "steps": history.steps,
                "stop_reason": history.stop_reason,
                "wall_seconds": round(history.seconds, 1),
                "evaluations": history.evaluations,
                "step_loss": history.step_loss,
                "pretrain_loss": history.pretrain_loss,
            },
        },
    )
    card = args.output("card")
    relative_png = Path(os.path.relpath(loss_png, Path(card).parent)).as_posix()
    write_text(card, model_card(str(cfg.model.name), OmegaConf.to_yaml(cfg.model.train), recipe, str(cfg.data.resources_dir),
                                cfg.data.max_facts_per_relation, organism, table, overall, data, relative_png))
    log.info(
        "done: train acc %.3f, held-out acc %.3f, majority %.3f, %d steps in %.1f min",
        overall["train_accuracy"], overall["heldout_accuracy"], overall["majority_baseline"],
        history.steps, history.seconds / 60,
    )


if __name__ == "__main__":
    run_stage(main)
