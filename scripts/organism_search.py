"""Train one kn-tiny recipe and measure where its facts live: one row of the organism search.

    python scripts/organism_search.py --name v1 model=kn-tiny-v1
    python scripts/organism_search.py --name frozen_untied \
        model=kn-tiny-v1 model.train.freeze_word_embeddings=true model.train.tie_word_embeddings=false

Overrides are the project's Hydra overrides (``model.train.*``, ``data.max_facts_per_relation``...).
One recipe per call, one torch thread, outside the DAG: it trains on the first
``data.max_facts_per_relation`` facts of every relation exactly as the ``train_model`` stage does
(kn.models.training.train_organism), then measures

- time: the CPU and wall seconds of training, steps and why it stopped, the 1-minute load average;
- knowledge: top-1 accuracy on training and held-out templates and the majority-object baseline
  (unweighted means over relations, kn.probe) on the first 60 facts of each relation;
- localisation (kn.localise, as the ``localise`` stage): every studied fact (``study.facts_per_relation``),
  all its templates, each sublayer output zeroed; the ALL row of the ceilings.

Writes ``<out>/<name>/`` (record.json, ceiling.csv, model/) and appends the record to
``<out>/records.jsonl``; ``scripts/organism_search_table.py`` turns the records into the table
docs/organism_search.md shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from kn.config import compose_config, to_container  # noqa: E402
from kn.data.pararel import build_bags, load_relations, read_query_pairs  # noqa: E402
from kn.localise import ceiling_lines, ceiling_table, localise_relation  # noqa: E402
from kn.models.training import train_organism  # noqa: E402
from kn.probe import accuracy_summary, overall_row, probe_relation  # noqa: E402
from kn.schema import TrainConfig  # noqa: E402
from kn.tables import studied_rows  # noqa: E402

PROBE_FACTS = 60  # accuracy on the first 60 facts of each relation: comparable across recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="recipe name (folder under --out)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/organism_search"))
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the ceiling CIs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.train.lr=0.0005")
    args = parser.parse_args()
    out = args.out / args.name
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(args.overrides)
    recipe = TrainConfig(**to_container(cfg.model.train))
    torch.set_num_threads(recipe.threads)  # as train_model does: the same recipe gives the same weights
    resources = Path(cfg.data.resources_dir)
    prompts, facts = build_bags(resources, "all", cfg.data.max_facts_per_relation)
    pairs = read_query_pairs(resources / "query_pairs.json")
    objects = sorted({obj for rel in load_relations(resources) for _, obj in pairs[rel]})

    load_before, cpu0, wall0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    organism = train_organism(prompts, objects, recipe)
    train_cpu, train_wall, load_after = time.process_time() - cpu0, time.perf_counter() - wall0, os.getloadavg()[0]
    organism.model.save_pretrained(out / "model")
    organism.tokenizer.save_pretrained(out / "model")
    model, tokenizer, codec = organism.model.eval(), organism.tokenizer, organism.codec

    probed = prompts[prompts["fact_id"] < PROBE_FACTS]
    probe = pd.concat([probe_relation(model, tokenizer, rows, organism.heldout.get(rel, ()), codec=codec)
                       for rel, rows in probed.groupby("relation", sort=True)], ignore_index=True)
    overall = {k: float(v) for k, v in overall_row(accuracy_summary(probe, probed)).items()}

    cpu0 = time.process_time()
    long = pd.concat([localise_relation(model, codec, studied_rows(rows, cfg.study.facts_per_relation))
                      for _, rows in prompts.groupby("relation", sort=True)], ignore_index=True)
    ceiling = ceiling_table(long, args.resamples, int(cfg.seed))
    localise_cpu = time.process_time() - cpu0
    ceiling.to_csv(out / "ceiling.csv", index=False, float_format="%.6g")
    all_row = ceiling[ceiling["relation"] == "ALL"].iloc[0]

    record = {
        "name": args.name, "overrides": args.overrides, "recipe": to_container(cfg.model.train),
        "facts": len(facts), "prompts": len(prompts),
        "training": {"steps": organism.history.steps, "stop_reason": organism.history.stop_reason,
                     "cpu_seconds": round(train_cpu, 1), "wall_seconds": round(train_wall, 1),
                     "load_1min": [round(load_before, 2), round(load_after, 2)]},
        "knowledge": {"probe_facts_per_relation": PROBE_FACTS, **{k: overall[k] for k in (
            "train_accuracy", "heldout_accuracy", "majority_baseline", "train_gold_prob")}},
        "localisation": {"facts_per_relation": cfg.study.facts_per_relation, "cpu_seconds": round(localise_cpu, 1),
                         **ceiling_lines(ceiling),
                         "ffn_mask_all_ci": [float(all_row["ffn_mask_all_ci_low"]), float(all_row["ffn_mask_all_ci_high"])]},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
    }
    (out / "record.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    with open(args.out / "records.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    loc = record["localisation"]
    print(f"[{args.name}] {organism.history.steps} steps, {train_cpu:.0f} CPU-s; train acc {overall['train_accuracy']:.3f}, "
          f"held-out {overall['heldout_accuracy']:.3f}, majority {overall['majority_baseline']:.3f}; ffn_mask_all "
          f"{loc['ffn_mask_all']:+.3f} {loc['ffn_mask_all_ci']}, ffn_all_positions {loc['ffn_all_positions']:+.3f}, "
          f"attn_mask_all {loc['attn_mask_all']:+.3f}", flush=True)


if __name__ == "__main__":
    main()
