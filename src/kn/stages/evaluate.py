"""Stage: suppress/amplify one relation's knowledge neurons (SPEC §5), for IG, base and a random control.

Inputs: ``--in neurons=<model>/neurons/<rel>.parquet``, the relation's attribution shards
as ``--in scores<k>=...`` (rankings for the dose curve), and every selected relation's
prompt table as ``--in data:<rel>=...`` (other-relation prompts). Outputs: per-prompt
probabilities ``--out results=...parquet`` and the dose curve ``--out dose=...parquet``.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from kn.config import model_location
from kn.interventions import (
    EvaluationInputs,
    draw_other_facts,
    evaluate_relation,
    layer_matched_random,
    rank_by_attribution,
)
from kn.io import provenance, read_parquet, write_parquet
from kn.models import encode_prompts, load_masked_lm, object_token_id, resolve_device, value_projections
from kn.stages.cli import StageArgs, run_stage
from kn.stages.refine import read_shards

log = logging.getLogger("kn.evaluate")

METHODS = ("ig", "base")
MAX_LEN = 128  # ParaRel prompts (SPEC §1)
RESULT_SCHEMA = pa.schema(
    [("relation", pa.string()), ("fact_id", pa.int32()), ("target", pa.string()), ("prompt_relation", pa.string()),
     ("prompt_fact_id", pa.int32()), ("template_id", pa.int32()), ("method", pa.string()), ("n_neurons", pa.int32()),
     ("p0", pa.float64()), ("p_suppress", pa.float64()), ("p_amplify", pa.float64())]
)
DOSE_SCHEMA = pa.schema(
    [("relation", pa.string()), ("fact_id", pa.int32()), ("template_id", pa.int32()), ("method", pa.string()),
     ("k", pa.int32()), ("n_neurons", pa.int32()), ("p0", pa.float64()), ("p_suppress", pa.float64())]
)


def read_relation_prompts(args: StageArgs, study_cap: int | None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Study-fact prompts of every selected relation and the number of study facts of each."""
    frames, n_facts = [], {}
    for relation, path in args.keyed_inputs("data").items():
        frame = read_parquet(path)
        missing = [c for c in ("relation", "fact_id", "template_id", "object", "prompt") if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (docs/CONTRACTS.md, ingest_relation)")
        if set(frame["relation"].astype(str)) != {relation}:
            raise ValueError(f"{path}: expected only relation {relation}, found {sorted(set(frame['relation']))}")
        total = int(frame["fact_id"].max()) + 1 if len(frame) else 0
        n_facts[relation] = total if study_cap is None else min(study_cap, total)
        frames.append(frame[frame["fact_id"] < n_facts[relation]])
    prompts = pd.concat(frames, ignore_index=True)
    prompts["relation"] = prompts["relation"].astype(str)
    return prompts, n_facts


def knowledge_neurons(path, relation: str) -> dict[str, dict[int, list[tuple[int, int]]]]:
    """Per method, fact_id -> its KN list in first-appearance order."""
    neurons = read_parquet(path)
    missing = [c for c in ("relation", "method", "fact_id", "layer", "neuron", "order") if c not in neurons.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (docs/CONTRACTS.md, refine)")
    neurons = neurons[neurons["relation"].astype(str) == relation].sort_values(["method", "fact_id", "order"])
    out: dict[str, dict[int, list[tuple[int, int]]]] = {m: {} for m in METHODS}
    for (method, fact), group in neurons.groupby(["method", "fact_id"], sort=True):
        if method not in out:
            raise ValueError(f"{path}: column 'method' has value {method!r}; expected one of {list(METHODS)}")
        out[method][int(fact)] = list(zip(group["layer"].astype(int), group["neuron"].astype(int)))
    return out


def main(args: StageArgs) -> None:
    cfg = args.cfg
    relation = args.relation
    if relation is None:
        raise SystemExit("evaluate needs --relation")
    ec = cfg.evaluate
    prompts, n_facts = read_relation_prompts(args, cfg.study.facts_per_relation)
    if relation not in n_facts:
        raise SystemExit(f"evaluate --relation {relation}: no --in data:{relation}=... among the inputs")
    draws = dict(enumerate(draw_other_facts(list(n_facts), n_facts, relation, int(cfg.seed))))
    if not draws:
        log.warning("only one relation selected: no other-relation prompts to evaluate")

    device = resolve_device(ec.device)
    model, tokenizer = load_masked_lm(model_location(cfg.model, cfg.results_dir), device, cfg.model.layer_norm_eps)

    needed = {(relation, f) for f in range(n_facts[relation])} | set(draws.values())
    keys = list(zip(prompts["relation"], prompts["fact_id"]))
    prompts = prompts[[k in needed for k in keys]].reset_index(drop=True)
    gold = {obj: object_token_id(tokenizer, obj) for obj in prompts["object"].unique()}
    no_gold = sorted(obj for obj, token in gold.items() if token is None)
    if no_gold:
        log.warning("%d objects are not one token and their facts are skipped: %s", len(no_gold), no_gold[:10])
    prompts = prompts[prompts["object"].map(gold).notna()].reset_index(drop=True)
    encoded = encode_prompts(tokenizer, prompts["prompt"].tolist(), MAX_LEN)
    gold_ids = [int(gold[obj]) for obj in prompts["object"]]

    kn = knowledge_neurons(args.input("neurons"), relation)
    shards = [args.inputs[name] for name in sorted(args.inputs) if name.startswith("scores")]
    scores, _ = read_shards(shards, relation)
    rankings = {m: rank_by_attribution(scores[scores["method"] == m]) for m in METHODS}
    facts = sorted(set(prompts.loc[prompts["relation"] == relation, "fact_id"].astype(int)))
    neuron_sets: dict[str, dict[int, list[tuple[int, int]]]] = {m: kn[m] for m in METHODS}
    dose_ks = sorted(k for k in ec.dose_ks if k <= ec.dose_max_k)
    if ec.random_control:
        # Seeded per relation (jobs run per relation); same size and layers as the IG sets / IG ranking.
        rng = np.random.default_rng([int(cfg.seed), zlib.crc32(relation.encode())])
        n_units = value_projections(model)[0].in_features
        neuron_sets["random"], rankings["random"] = {}, {}
        for fact in facts:
            neuron_sets["random"][fact] = layer_matched_random(kn["ig"].get(fact, []), n_units, rng)
            rankings["random"][fact] = layer_matched_random(rankings["ig"].get(fact, [])[: max(dose_ks, default=0)], n_units, rng)
    inputs = EvaluationInputs(relation, encoded, gold_ids, prompts[["relation", "fact_id", "template_id"]], facts,
                              draws, neuron_sets, rankings)
    results, dose = evaluate_relation(
        model, inputs, suppress_factor=float(ec.suppress_factor), amplify_factor=float(ec.amplify_factor),
        dose_ks=dose_ks, pad_id=int(tokenizer.pad_token_id), batch_size=int(ec.batch_size), device=device,
    )
    record = provenance(cfg, "evaluate", relation=relation, device=str(device), torch_threads=torch.get_num_threads())
    write_parquet(args.output("results"), results, record, schema=RESULT_SCHEMA)
    write_parquet(args.output("dose"), dose, record, schema=DOSE_SCHEMA)
    own = results[results["target"] == "own"]
    for method, group in own.groupby("method"):
        log.info("%s %s: suppress %.4f, amplify %.4f (ratio of averages, own prompts)", relation, method,
                 (group.p_suppress - group.p0).mean() / group.p0.mean(), (group.p_amplify - group.p0).mean() / group.p0.mean())


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
