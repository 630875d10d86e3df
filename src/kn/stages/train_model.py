"""Stage: train the embedded model organism (kn-tiny) and write its model card, metrics and loss curve.

Training data are the first data.max_facts_per_relation facts of ALL ParaRel relations,
independent of data.relations, so studying a subset of relations never retrains the model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from kn.config import to_container
from kn.data.pararel import build_bags, load_relations, read_query_pairs
from kn.io import atomic_dir, atomic_path, provenance, write_json, write_text
from kn.models.training import TRAINING_RECORD, TrainedOrganism, parameter_count, running_mean, train_organism
from kn.probe import accuracy_summary, overall_row, probe_relation, relation_use, train_template_ids
from kn.schema import TrainConfig
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.train_model")


def evaluate_organism(organism: TrainedOrganism, prompts: pd.DataFrame, resources: Path, seed: int) -> pd.DataFrame:
    """Per relation: train/held-out accuracy, gold probability, majority baseline and relation use."""
    probes = [
        probe_relation(organism.model, organism.tokenizer, group, organism.heldout.get(str(relation), []))
        for relation, group in prompts.groupby("relation", sort=True)
    ]
    summary = accuracy_summary(pd.concat(probes, ignore_index=True), prompts)
    catalogue = load_relations(resources)
    templates = {rel: list(meta.templates) for rel, meta in catalogue.items()}
    objects = {rel: {obj for _, obj in pairs} for rel, pairs in read_query_pairs(resources / "query_pairs.json").items()}
    facts = prompts.drop_duplicates(["relation", "fact_id"])[["relation", "fact_id", "subject", "object"]]
    use = relation_use(
        organism.model, organism.tokenizer, facts, templates, train_template_ids(templates, organism.heldout), objects, seed
    )
    return summary.merge(use, on="relation", how="left")


def plot_loss(path: Path, organism: TrainedOrganism) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = organism.history
    steps = np.arange(1, len(history.step_loss) + 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, history.step_loss, color="0.8", linewidth=0.6, label="step loss")
    ax.plot(steps, running_mean(history.step_loss, 50), color="C0", label="running mean (50 steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    acc = ax.twinx()
    evals = history.evaluations
    acc.plot([e["step"] for e in evals], [e["train_accuracy"] for e in evals], "o-", color="C1", label="train-template acc.")
    if evals and "heldout_accuracy" in evals[0]:
        acc.plot([e["step"] for e in evals], [e["heldout_accuracy"] for e in evals], "s--", color="C2", label="held-out acc.")
    acc.set_ylim(0, 1)
    acc.set_ylabel("top-1 accuracy (eval sample)")
    lines = ax.get_legend_handles_labels()
    more = acc.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    ax.set_title("kn-tiny training")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _pct(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{100 * value:.1f}%"


def model_card(cfg, organism: TrainedOrganism, table: pd.DataFrame, overall: dict, data: dict, loss_png: str) -> str:
    recipe = OmegaConf.to_yaml(cfg.model.train).strip()
    history = organism.history
    heldout = ", ".join(f"{rel}: {ids}" for rel, ids in organism.heldout.items() if ids)
    lines = [
        f"# Model card: {cfg.model.name}",
        "",
        "A BERT masked language model trained from scratch by the `train_model` rule on ParaRel "
        "(LAMA T-REx facts written through each relation's paraphrase templates, object masked). It is the "
        "pipeline's embedded model organism: no pretrained English masked LM is available offline. "
        "It knows only these facts and this template language; it is a test subject for knowledge-neuron "
        "methods, not a general language model.",
        "",
        "## Data",
        "",
        f"- Resources: `{cfg.data.resources_dir}`; all {data['relations']} relations, first "
        f"{cfg.data.max_facts_per_relation} facts each: {data['facts']} facts, {data['distinct_objects']} distinct objects.",
        f"- Training prompts: {organism.train_prompts}; held-out-template prompts: {organism.heldout_prompts}.",
        f"- Held-out templates (relations with >= {cfg.model.train.heldout_min_templates} templates, "
        f"{cfg.model.train.heldout_templates} each, seeded draw): {heldout or 'none'}.",
        f"- Tokenizer: cased WordPiece trained with `tokenizers` on the filled prompts; vocabulary "
        f"{len(organism.tokenizer.get_vocab())} entries, every one of the {data['vocabulary_objects']} ParaRel object "
        "labels a single token.",
        "",
        "## Recipe",
        "",
        f"Seed {cfg.model.train.seed} (`model.train.seed`); every key below is a Hydra override `model.train.<key>=...`.",
        "",
        "```yaml",
        recipe,
        "```",
        "",
        "## Training",
        "",
        f"- Parameters: {data['parameters']:,} (tied input/output embeddings counted once).",
        f"- Steps: {history.steps}; stopped because {history.stop_reason}.",
        f"- Wall time: {history.seconds / 60:.1f} min on {data['threads']} CPU thread(s) "
        "(shared machine: timing depends on load).",
        f"- Final running-mean loss (50 steps): {running_mean(history.step_loss, 50)[-1]:.3f}.",
        f"- Loss curve: [{loss_png}]({loss_png})",
        "",
        "## What it knows",
        "",
        f"- Top-1 accuracy on training-template prompts: **{_pct(overall['train_accuracy'])}** (mean over "
        f"{data['relations']} relations, unweighted; {_pct(overall['train_accuracy_pooled'])} pooled over prompts); "
        f"majority-object baseline {_pct(overall['majority_baseline'])}.",
        f"- On held-out templates: **{_pct(overall['heldout_accuracy'])}** (mean over the "
        f"{int((table['heldout_prompts'] > 0).sum())} relations with one; {_pct(overall['heldout_accuracy_pooled'])} pooled); "
        f"majority-object baseline over the same relations {_pct(overall['majority_baseline_heldout_relations'])}.",
        f"- Mean gold probability: {overall['train_gold_prob']:.3f} (training templates), "
        f"{overall['heldout_gold_prob']:.3f} (held-out templates).",
        f"- Relation use: with a subject put into another relation's templates, the model answers the subject's own "
        f"object in {_pct(overall['xrel_own_object'])} of prompts (where that object is not a valid answer there; "
        f"high = answers from the subject alone) and an object of the other relation in {_pct(overall['xrel_other_type'])} "
        "(high = reads the relation).",
        "",
        "## Per relation",
        "",
        "| relation | facts | train acc. | held-out acc. | majority | gold prob. | own object in other relation | other relation's type |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.relation} | {row.facts} | {_pct(row.train_accuracy)} | {_pct(row.heldout_accuracy)} | "
            f"{_pct(row.majority_baseline)} | {row.train_gold_prob:.3f} | {_pct(row.xrel_own_object)} | "
            f"{_pct(row.xrel_other_type)} |"
        )
    return "\n".join(lines) + "\n"


def main(args: StageArgs) -> None:
    cfg = args.cfg
    if cfg.model.source != "trained" or cfg.model.train is None:
        raise SystemExit(f"train_model needs model.source=trained with model.train set (model.name={cfg.model.name})")
    recipe = TrainConfig(**to_container(cfg.model.train))
    resources = Path(cfg.data.resources_dir)
    prompts, facts = build_bags(resources, "all", cfg.data.max_facts_per_relation)
    pairs = read_query_pairs(resources / "query_pairs.json")
    catalogue = load_relations(resources)
    vocabulary_objects = sorted({obj for rel in catalogue for _, obj in pairs[rel]})
    log.info("training on %d facts of %d relations (%d prompts)", len(facts), facts["relation"].nunique(), len(prompts))
    organism = train_organism(prompts, vocabulary_objects, recipe)
    table = evaluate_organism(organism, prompts, resources, int(cfg.seed))
    overall = {key: float(value) for key, value in overall_row(table).items()}
    with_heldout = table["heldout_prompts"] > 0
    overall["majority_baseline_heldout_relations"] = float(table.loc[with_heldout, "majority_baseline"].mean())
    for split in ("train", "heldout"):  # prompt-weighted, next to the unweighted relation means
        weights = table[f"{split}_prompts"]
        overall[f"{split}_accuracy_pooled"] = float((table[f"{split}_accuracy"].fillna(0) * weights).sum() / weights.sum())
    data = {
        "relations": int(facts["relation"].nunique()),
        "facts": len(facts),
        "distinct_objects": int(facts["object"].nunique()),
        "vocabulary_objects": len(vocabulary_objects),
        "parameters": parameter_count(organism.model),
        "threads": torch.get_num_threads(),
    }
    record = provenance(cfg, "train_model", heldout_templates=organism.heldout, data=data)

    model_dir = args.output("model")
    with atomic_dir(model_dir) as tmp:
        organism.model.save_pretrained(tmp)
        organism.tokenizer.save_pretrained(tmp)
        write_json(tmp / TRAINING_RECORD, record)
    loss_png = args.output("loss")
    plot_loss(loss_png, organism)
    history = organism.history
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
            },
        },
    )
    card = args.output("card")
    relative_png = Path(os.path.relpath(loss_png, Path(card).parent)).as_posix()
    write_text(card, model_card(cfg, organism, table, overall, data, relative_png))
    log.info(
        "done: train acc %.3f, held-out acc %.3f, majority %.3f, %d steps in %.1f min",
        overall["train_accuracy"], overall["heldout_accuracy"], overall["majority_baseline"],
        history.steps, history.seconds / 60,
    )


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
