"""Stage 4 (SPEC §6), one relation: KN activations at [MASK] on web sentences T1 / T2 / T3 (a causal LM:
at the last token before the masked word, the sentence cut there; docs/causal.md).

Inputs: ``data`` (the relation's prompts parquet), ``neurons`` (its refined KNs),
``sentences`` (resources/bing_distant/sentences.parquet) and ``sentence_stats`` (its
stats.json), and the trained organism as ``model``. Outputs: ``facts`` (per studied fact:
sentence counts, tail tokenisation, status per method), ``sentences`` (every masked
sentence and what tokenisation did to it) and ``activations`` (per method, fact, KN and
sentence: the activation at [MASK]).
"""

from __future__ import annotations

from kn.data.bing import load_sentences
from kn.distant import TYPES, relation_study
from kn.io import provenance
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import DISTANT_ACTIVATIONS, DISTANT_FACTS, DISTANT_SENTENCES, RELATION_PROMPTS, read_neurons, studied_rows


def main(args: StageArgs) -> None:
    cfg, relation = args.cfg, args.require_relation()
    dcfg = cfg.distant
    data = studied_rows(RELATION_PROMPTS.read(args.input("data"), relation), cfg.study.facts_per_relation)
    facts = data.drop_duplicates("fact_id").sort_values("fact_id")[["fact_id", "subject", "object"]].reset_index(drop=True)
    neurons = read_neurons(args.input("neurons"), relation)
    bing, n_facts = load_sentences(args.input("sentences"), args.input("sentence_stats"))
    if n_facts.get(relation, 0) < len(facts):
        raise ValueError(
            f"{args.input('sentences')}: {relation} has sentences for {n_facts.get(relation, 0)} facts, "
            f"but {len(facts)} facts are studied; the Bing lists must be aligned with query_pairs.json"
        )
    pool = bing["sentence"].tolist()  # the global th+h pool of every relation (SPEC §6, T3)
    mine = bing[(bing["relation"] == relation) & bing["fact_id"].isin(facts["fact_id"])]
    bags = {(int(f), str(k)): list(g["sentence"]) for (f, k), g in mine.groupby(["fact_id", "kind"], sort=False)}
    loaded = load_model(args)
    fact_table, sentences, activations, max_len = relation_study(
        loaded.model, loaded.tokenizer, relation, facts, neurons, bags, pool, seed=int(cfg.seed),
        max_len=int(dcfg.max_len), max_mask_word=int(dcfg.max_mask_word), head_redraws=int(dcfg.head_redraws),
        batch_size=int(dcfg.batch_size), codec=loaded.codec,
    )
    record = provenance(cfg, "distant", relation=relation, max_len=max_len, types=list(TYPES), **loaded.record())
    DISTANT_FACTS.write(args.output("facts"), fact_table, record)
    DISTANT_SENTENCES.write(args.output("sentences"), sentences, record)
    DISTANT_ACTIVATIONS.write(args.output("activations"), activations, record)


if __name__ == "__main__":
    run_stage(main)
