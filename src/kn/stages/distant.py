"""Stage 4 (SPEC §6), one relation: KN activations at [MASK] on web sentences T1 / T2 / T3.

Inputs: ``data`` (the relation's prompts parquet), ``neurons`` (its refined KNs),
``sentences`` (resources/bing_distant/sentences.parquet; its stats.json must sit beside
it). Outputs: ``facts`` (per studied fact: sentence counts, tail tokenisation, status per
method), ``sentences`` (every masked sentence and what tokenisation did to it) and
``activations`` (per method, fact, KN and sentence: the activation at [MASK]).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa

from kn.config import model_location
from kn.data.bing import load_sentences
from kn.distant import TYPES, encode_sentences, mask_fact_sentences, position_limit, read_activations, tail_piece_count
from kn.io import provenance, read_parquet, write_parquet
from kn.models import load_masked_lm, object_token_id, resolve_device
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.distant")

METHODS = ("ig", "base")
NEURON_COLUMNS = ["relation", "method", "fact_id", "layer", "neuron", "order"]

FACTS_SCHEMA = pa.schema(
    [
        ("relation", pa.string()), ("fact_id", pa.int32()), ("subject", pa.string()), ("object", pa.string()),
        ("n_th", pa.int32()), ("n_h", pa.int32()), ("tail_pieces", pa.int32()), ("tail_single_token", pa.bool_()),
        ("n_kn_ig", pa.int32()), ("n_kn_base", pa.int32()), ("status_ig", pa.string()), ("status_base", pa.string()),
    ]
)  # fmt: skip
SENTENCES_SCHEMA = pa.schema(
    [
        ("relation", pa.string()), ("fact_id", pa.int32()), ("type", pa.string()), ("sentence_idx", pa.int32()),
        ("source_idx", pa.int64()), ("text", pa.string()), ("masked_word", pa.string()), ("n_pieces", pa.int32()),
        ("n_unk", pa.int32()), ("truncated", pa.bool_()), ("readable", pa.bool_()), ("max_len", pa.int32()),
    ]
)  # fmt: skip
ACTIVATIONS_SCHEMA = pa.schema(
    [
        ("relation", pa.string()), ("method", pa.string()), ("fact_id", pa.int32()), ("layer", pa.int16()),
        ("neuron", pa.int32()), ("order", pa.int32()), ("type", pa.string()), ("sentence_idx", pa.int32()),
        ("activation", pa.float32()),
    ]
)  # fmt: skip


def studied_facts(data: pd.DataFrame, relation: str, cap: int | None, source: Path) -> pd.DataFrame:
    """One row per studied fact (fact_id < study.facts_per_relation): fact_id, subject, object."""
    for column in ("relation", "fact_id", "subject", "object"):
        if column not in data.columns:
            raise ValueError(f"{source}: no column {column!r}; expected the ingest_relation table (docs/CONTRACTS.md)")
    other = data.loc[data["relation"] != relation, "relation"]
    if len(other):
        raise ValueError(f"{source}: holds relation {other.iloc[0]!r}, but the job is for {relation}")
    facts = data.drop_duplicates("fact_id")[["fact_id", "subject", "object"]].sort_values("fact_id")
    if cap is not None:
        facts = facts[facts["fact_id"] < cap]
    return facts.reset_index(drop=True)


def kn_lists(neurons: pd.DataFrame, relation: str, source: Path) -> dict[str, dict[int, list[tuple[int, int, int]]]]:
    """Per method and fact, the KNs as (layer, neuron, order), in first-appearance order."""
    missing = [c for c in NEURON_COLUMNS if c not in neurons.columns]
    if missing:
        raise ValueError(f"{source}: missing columns {missing}; expected {NEURON_COLUMNS} (docs/CONTRACTS.md)")
    unknown = sorted(set(neurons["method"]) - set(METHODS))
    if unknown:
        raise ValueError(f"{source}: method {unknown[0]!r}; expected one of {list(METHODS)}")
    if len(neurons) and (neurons["relation"] != relation).any():
        raise ValueError(f"{source}: holds relation {neurons['relation'].iloc[0]!r}, but the job is for {relation}")
    out: dict[str, dict[int, list[tuple[int, int, int]]]] = {method: {} for method in METHODS}
    for (method, fact_id), group in neurons.sort_values(["method", "fact_id", "order"]).groupby(["method", "fact_id"]):
        out[str(method)][int(fact_id)] = [
            (int(layer), int(unit), int(order)) for layer, unit, order in zip(group["layer"], group["neuron"], group["order"])
        ]
    return out


def main(args: StageArgs) -> None:
    cfg, relation = args.cfg, args.relation
    if relation is None:
        raise SystemExit("distant needs --relation")
    dcfg = cfg.distant
    facts = studied_facts(read_parquet(args.input("data")), relation, cfg.study.facts_per_relation, args.input("data"))
    kns = kn_lists(read_parquet(args.input("neurons")), relation, args.input("neurons"))
    bing, n_facts = load_sentences(args.input("sentences").parent)
    if n_facts.get(relation, 0) < len(facts):
        raise ValueError(
            f"{args.input('sentences')}: {relation} has sentences for {n_facts.get(relation, 0)} facts, "
            f"but {len(facts)} facts are studied; the Bing lists must be aligned with query_pairs.json"
        )
    pool = bing["sentence"].tolist()  # the global th+h pool of every relation (SPEC §6, T3)
    mine = bing[(bing["relation"] == relation) & bing["fact_id"].isin(facts["fact_id"])]
    bags = {(int(f), str(k)): list(g["sentence"]) for (f, k), g in mine.groupby(["fact_id", "kind"], sort=False)}

    device = resolve_device(cfg.ig.device)
    model, tokenizer = load_masked_lm(model_location(cfg.model, cfg.results_dir), device, cfg.model.layer_norm_eps)
    max_len = position_limit(model, tokenizer, dcfg.max_len)
    if max_len < dcfg.max_len:
        log.warning("model takes at most %d positions: sentences are cut there (distant.max_len=%d)", max_len, dcfg.max_len)

    rng = random.Random(f"{cfg.seed}/{relation}")  # str seeds are hashed deterministically (sha512)
    fact_rows, sentence_rows, sentence_neurons = [], [], []
    for fact_id, subject, obj in facts.itertuples(index=False):
        th, h = bags.get((fact_id, "th"), []), bags.get((fact_id, "h"), [])
        lists = {method: kns[method].get(fact_id, []) for method in METHODS}
        status = {m: "no_exmp" if not th or not h else ("no_kn" if not lists[m] else "ok") for m in METHODS}
        pieces = tail_piece_count(tokenizer, obj)
        fact_rows.append(
            (relation, fact_id, subject, obj, len(th), len(h), pieces, object_token_id(tokenizer, obj) is not None,
             len(lists["ig"]), len(lists["base"]), status["ig"], status["base"])
        )  # fmt: skip
        if not th or not h:
            continue
        union = list(dict.fromkeys((layer, unit) for m in METHODS for layer, unit, _ in lists[m]))
        for masked in mask_fact_sentences(subject, obj, th, h, pool, rng, dcfg.max_mask_word, dcfg.head_redraws):
            sentence_rows.append((relation, fact_id, masked.type, masked.sentence_idx, masked.source_idx, masked.text, masked.masked_word))
            sentence_neurons.append(union)

    sentences = pd.DataFrame(sentence_rows, columns=SENTENCES_SCHEMA.names[:7])
    found = sentences["text"].notna().to_numpy()
    encoded = encode_sentences(tokenizer, sentences.loc[found, "text"].tolist(), max_len)
    for column, values in (("n_pieces", encoded.n_pieces), ("n_unk", encoded.n_unk), ("truncated", encoded.truncated)):
        sentences[column] = pd.Series(values, index=sentences.index[found])
        sentences[column] = sentences[column].fillna(0 if column != "truncated" else False)
    sentences["readable"] = False
    sentences.loc[found, "readable"] = encoded.readable
    sentences["max_len"] = max_len
    log.info(
        "%s: %d studied facts, %d sentences (%d tail not found, %d truncated, %d [MASK] cut off), max_len %d",
        relation, len(facts), len(sentences), int((~found).sum()), int(sentences["truncated"].sum()),
        int(found.sum() - sum(encoded.readable)), max_len,
    )  # fmt: skip

    found_neurons = [n for n, ok in zip(sentence_neurons, found) if ok]
    values = read_activations(model, encoded, found_neurons, dcfg.batch_size, device, desc=f"{relation} sentences")
    activation_rows = []
    for (row, neurons), acts in zip(
        ((r, n) for r, n, ok in zip(sentences.itertuples(index=False), sentence_neurons, found) if ok), values
    ):
        if not len(acts):
            continue
        value_of = dict(zip(neurons, acts.tolist()))
        for method in METHODS:
            for layer, unit, order in kns[method].get(row.fact_id, []):
                activation_rows.append((relation, method, row.fact_id, layer, unit, order, row.type, row.sentence_idx, value_of[(layer, unit)]))

    record = provenance(cfg, "distant", relation=relation, max_len=max_len, types=list(TYPES))
    write_parquet(args.output("facts"), pd.DataFrame(fact_rows, columns=FACTS_SCHEMA.names), record, schema=FACTS_SCHEMA)
    write_parquet(args.output("sentences"), sentences[SENTENCES_SCHEMA.names], record, schema=SENTENCES_SCHEMA)
    write_parquet(
        args.output("activations"), pd.DataFrame(activation_rows, columns=ACTIVATIONS_SCHEMA.names), record,
        schema=ACTIVATIONS_SCHEMA,
    )  # fmt: skip


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
