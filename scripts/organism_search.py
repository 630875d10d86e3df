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
- natural text: masked-token accuracy and masked-piece perplexity on held-out web sentences
  (kn.models.training.split_natural's evaluation facts, never studied ones) and on the studied facts'
  own web sentences (never trained either), against the unigram-frequency baseline, and the share of
  [UNK] pieces / split words in the study's T1, T2 and T3 sentences;
- embedding readout (kn.models.readout): on the studied facts' prompts, the median rank of another
  studied object t of the relation after adding e(t) to the final hidden state at [MASK] at 1x/4x/16x
  its norm (1 = the paper's update can make t the answer).

``--trained DIR`` measures an already trained model of the same recipe instead of training one.

Writes ``<out>/<name>/`` (record.json, ceiling.csv, model/) and appends the record to
``<out>/records.jsonl``; the tables of docs/organism_search.md are read from these records (kept
under docs/organism_search/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from kn.config import compose_config, to_container  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from e2e_benchmark import host_speed  # noqa: E402  (the benchmark's one-thread matmul probe)

from kn.data.bing import SENTENCES_FILE, STATS_FILE, load_sentences  # noqa: E402
from kn.data.pararel import build_bags, load_relations, read_query_pairs  # noqa: E402
from kn.models.encoding import PromptCodec  # noqa: E402
from kn.models.load import load_lm  # noqa: E402
from kn.models.readout import READOUT_SCALES, embedding_readout_ranks  # noqa: E402
from kn.localise import ceiling_lines, ceiling_table, localise_relation  # noqa: E402
from kn.models.training import (  # noqa: E402
    EVAL_MASK_PROB,
    EVAL_MAX_TOKENS,
    encode_natural,
    masked_token_accuracy,
    read_heldout_templates,
    split_natural,
    study_coverage,
    train_organism,
)
from kn.probe import accuracy_summary, overall_row, probe_relation  # noqa: E402
from kn.schema import TrainConfig  # noqa: E402
from kn.tables import studied_rows  # noqa: E402

PROBE_FACTS = 60  # accuracy on the first 60 facts of each relation: comparable across recipes


def readout_medians(model: torch.nn.Module, codec: PromptCodec, prompts: pd.DataFrame, studied: int) -> dict[str, float]:
    """Median embedding-readout rank over the studied facts' prompts; t = the relation's first studied
    object that differs from the fact's own."""
    texts, targets = [], []
    for _, rows in prompts.groupby("relation", sort=True):
        rows = studied_rows(rows, studied)
        objects = list(dict.fromkeys(rows["object"]))
        for prompt, obj in zip(rows["prompt"], rows["object"]):
            other = next((o for o in objects if o != obj), None)
            target = None if other is None else codec.target_id(prompt, other)
            if target is not None:
                texts.append(prompt)
                targets.append(target)
    ranks = embedding_readout_ranks(model, codec.encode(texts), targets)
    return {"prompts": len(texts), **{f"median_rank_x{s:g}": float(np.median(ranks[:, k])) for k, s in enumerate(READOUT_SCALES)},
            **{f"top1_share_x{s:g}": float((ranks[:, k] == 1).mean()) for k, s in enumerate(READOUT_SCALES)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="recipe name (folder under --out)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/organism_search"))
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the ceiling CIs")
    parser.add_argument("--trained", type=Path, help="measure this saved model (trained by the same recipe) instead")
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

    bing_dir = Path(cfg.distant.resources_dir)
    sentences, _ = load_sentences(bing_dir / SENTENCES_FILE, bing_dir / STATS_FILE)
    studied = int(cfg.study.facts_per_relation)
    natural = split_natural(sentences, studied, cfg.data.max_facts_per_relation, recipe.natural_eval_facts, recipe.seed)

    host = host_speed()
    load_before, cpu0, wall0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    if args.trained is None:
        organism = train_organism(prompts, objects, recipe, sentences=sentences, studied_facts=studied)
        organism.model.save_pretrained(out / "model")
        organism.tokenizer.save_pretrained(out / "model")
        model, tokenizer, heldout = organism.model.eval(), organism.tokenizer, organism.heldout
        steps, stop_reason = organism.history.steps, organism.history.stop_reason
    else:
        model, tokenizer = load_lm(args.trained)
        heldout, steps, stop_reason = read_heldout_templates(args.trained), 0, f"measured {args.trained}"
    train_cpu, train_wall, load_after = time.process_time() - cpu0, time.perf_counter() - wall0, os.getloadavg()[0]
    codec = PromptCodec(tokenizer, causal=False)

    probed = prompts[prompts["fact_id"] < PROBE_FACTS]
    probe = pd.concat([probe_relation(model, tokenizer, rows, heldout.get(rel, ()), codec=codec)
                       for rel, rows in probed.groupby("relation", sort=True)], ignore_index=True)
    overall = {k: float(v) for k, v in overall_row(accuracy_summary(probe, probed)).items()}

    cpu0 = time.process_time()
    long = pd.concat([localise_relation(model, codec, studied_rows(rows, cfg.study.facts_per_relation))
                      for _, rows in prompts.groupby("relation", sort=True)], ignore_index=True)
    ceiling = ceiling_table(long, args.resamples, int(cfg.seed))
    localise_cpu = time.process_time() - cpu0
    ceiling.to_csv(out / "ceiling.csv", index=False, float_format="%.6g")
    all_row = ceiling[ceiling["relation"] == "ALL"].iloc[0]
    specials = tokenizer.all_special_ids
    train_ids = encode_natural(tokenizer, natural.train, recipe.natural_max_tokens)
    natural_scores = masked_token_accuracy(
        model, encode_natural(tokenizer, natural.heldout, EVAL_MAX_TOKENS), train_ids, EVAL_MASK_PROB,
        int(tokenizer.mask_token_id), specials, recipe.seed)
    # A second unseen set: the studied facts' own web sentences (the §6 study's T1 / T2), which no recipe
    # trains on and no recipe choice was read from.
    studied_texts = sorted(set(sentences.loc[sentences["fact_id"] < studied, "sentence"].astype(str)))
    studied_scores = masked_token_accuracy(
        model, encode_natural(tokenizer, studied_texts, EVAL_MAX_TOKENS), train_ids, EVAL_MASK_PROB,
        int(tokenizer.mask_token_id), specials, recipe.seed)
    coverage = study_coverage(tokenizer, sentences, studied, recipe.seed)
    readout = readout_medians(model, codec, prompts, studied)

    record = {
        "name": args.name, "overrides": args.overrides, "recipe": to_container(cfg.model.train),
        "facts": len(facts), "prompts": len(prompts),
        "training": {"steps": steps, "stop_reason": stop_reason,
                     "cpu_seconds": round(train_cpu, 1), "wall_seconds": round(train_wall, 1),
                     "load_1min": [round(load_before, 2), round(load_after, 2)]},
        "knowledge": {"probe_facts_per_relation": PROBE_FACTS, **{k: overall[k] for k in (
            "train_accuracy", "heldout_accuracy", "majority_baseline", "train_gold_prob")}},
        "localisation": {"facts_per_relation": cfg.study.facts_per_relation, "cpu_seconds": round(localise_cpu, 1),
                         **ceiling_lines(ceiling),
                         "ffn_mask_all_ci": [float(all_row["ffn_mask_all_ci_low"]), float(all_row["ffn_mask_all_ci_high"])]},
        "natural": {"train_sentences": len(natural.train), "heldout_sentences": len(natural.heldout),
                    "heldout_facts": natural.heldout_facts, **natural_scores, "coverage": coverage,
                    "studied_sentences": {"sentences": len(studied_texts), **studied_scores}},
        "readout": readout,
        "machine": {"cpu": host["cpu_model"], "matmul_gflops_1_thread": host["matmul_gflops_1_thread"],
                    "torch_threads": torch.get_num_threads()},
    }
    (out / "record.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    with open(args.out / "records.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    loc = record["localisation"]
    print(f"[{args.name}] {steps} steps, {train_cpu:.0f} CPU-s; train acc {overall['train_accuracy']:.3f}, "
          f"held-out {overall['heldout_accuracy']:.3f}, majority {overall['majority_baseline']:.3f}; ffn_mask_all "
          f"{loc['ffn_mask_all']:+.3f} {loc['ffn_mask_all_ci']}, ffn_all_positions {loc['ffn_all_positions']:+.3f}, "
          f"attn_mask_all {loc['attn_mask_all']:+.3f}; natural masked acc {natural_scores['masked_accuracy']:.3f} "
          f"(unigram {natural_scores['unigram_baseline']:.3f}; studied facts' sentences "
          f"{studied_scores['masked_accuracy']:.3f} / {studied_scores['unigram_baseline']:.3f}); readout median rank x1/x4/x16 "
          f"{readout['median_rank_x1']:g}/{readout['median_rank_x4']:g}/{readout['median_rank_x16']:g}; "
          f"T1/T2/T3 unk {[round(coverage[t]['unk_piece_share'], 4) for t in ('T1', 'T2', 'T3')]}", flush=True)


if __name__ == "__main__":
    main()
