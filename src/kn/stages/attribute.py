"""Stage: knowledge attribution of one shard of a relation's study facts (SPEC §3).

Inputs: ``--in data=<relation parquet>`` (docs/CONTRACTS.md, ingest_relation); the model
comes from the config (``model``, ``results_dir``). Outputs: ``--out scores=<shard>.parquet``
(integrated gradients and the activation baseline, long format, only scores >=
ig.storage_ratio x the prompt's max) and ``--out prompts=<shard>.prompts.parquet`` (one
row per prompt: gold / prediction / maxima). Shard k holds the study facts
[k * ig.facts_per_shard, min((k + 1) * ig.facts_per_shard, n_study)).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from kn.attribution import activation_scores, ig_attribution, sparsify
from kn.io import provenance, read_parquet, write_parquet
from kn.models import encode_prompts, load_masked_lm, model_location, object_token_id, resolve_device
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.attribute")

MAX_LEN = 128  # SPEC §1: ParaRel prompts use max_len 128
DATA_COLUMNS = ["relation", "fact_id", "template_id", "object", "prompt"]
SCORES_SCHEMA = pa.schema(
    [
        ("relation", pa.string()),
        ("fact_id", pa.int32()),
        ("template_id", pa.int32()),
        ("method", pa.string()),
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("score", pa.float32()),
    ]
)
PROMPTS_SCHEMA = pa.schema(
    [
        ("relation", pa.string()),
        ("fact_id", pa.int32()),
        ("template_id", pa.int32()),
        ("gold_id", pa.int32()),  # -1: the object is not one token of this vocabulary (prompt not attributed)
        ("gold_prob", pa.float32()),
        ("pred_id", pa.int32()),
        ("pred_token", pa.string()),
        ("correct", pa.bool_()),
        ("ig_max", pa.float32()),
        ("base_max", pa.float32()),
    ]
)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def study_fact_count(fact_ids: pd.Series, cap: int | None) -> int:
    """Number of study facts: the first ``cap`` facts of the relation (all when ``cap`` is None)."""
    n_facts = int(fact_ids.max()) + 1 if len(fact_ids) else 0
    return n_facts if cap is None else min(int(cap), n_facts)


def shard_fact_range(shard: int, facts_per_shard: int, n_study: int) -> range:
    """Fact ids of shard ``shard``: [k * per_shard, min((k + 1) * per_shard, n_study))."""
    if facts_per_shard < 1:
        raise ValueError(f"config key 'ig.facts_per_shard' = {facts_per_shard}; expected >= 1")
    start = shard * facts_per_shard
    if shard < 0 or start >= n_study:
        raise ValueError(
            f"shard {shard} is out of range: {n_study} study facts in shards of {facts_per_shard} "
            f"give shards 0..{max(0, (n_study + facts_per_shard - 1) // facts_per_shard - 1)}"
        )
    return range(start, min(start + facts_per_shard, n_study))


def shard_prompts(data: pd.DataFrame, path: Path, relation: str, facts: range) -> pd.DataFrame:
    """The shard's prompts in (fact_id, template_id) order, with the input (read from ``path``) checked."""
    missing = [c for c in DATA_COLUMNS if c not in data.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {DATA_COLUMNS} (docs/CONTRACTS.md)")
    others = sorted(set(data["relation"].astype(str)) - {relation})
    if others:
        raise ValueError(f"{path}: rows of relation(s) {others}; this job attributes {relation}")
    rows = data[(data["fact_id"] >= facts.start) & (data["fact_id"] < facts.stop)]
    rows = rows.sort_values(["fact_id", "template_id"], kind="stable").reset_index(drop=True)
    absent = sorted(set(facts) - set(rows["fact_id"].astype(int)))
    if absent:
        raise ValueError(f"{path}: no prompts for fact_id(s) {absent[:5]} of this shard ({facts.start}..{facts.stop - 1})")
    return rows


def long_scores(sparse: pd.DataFrame, prompts: pd.DataFrame, relation: str, method: str) -> pd.DataFrame:
    """Attach (fact_id, template_id) to :func:`kn.attribution.sparsify` rows (whose ``prompt`` indexes ``prompts``)."""
    keys = prompts.iloc[sparse["prompt"].to_numpy()]
    return pd.DataFrame(
        {
            "relation": relation,
            "fact_id": keys["fact_id"].to_numpy(np.int32),
            "template_id": keys["template_id"].to_numpy(np.int32),
            "method": method,
            "layer": sparse["layer"].to_numpy(np.int16),
            "neuron": sparse["neuron"].to_numpy(np.int32),
            "score": sparse["score"].to_numpy(np.float32),
        }
    )


def main(args: StageArgs) -> None:
    cfg = args.cfg
    if args.relation is None or args.shard is None:
        raise SystemExit("attribute needs --relation and --shard")
    relation, ig = args.relation, cfg.ig
    data = read_parquet(args.input("data"))
    if "fact_id" not in data.columns:
        raise ValueError(f"{args.input('data')}: no column 'fact_id'; expected {DATA_COLUMNS} (docs/CONTRACTS.md)")
    n_study = study_fact_count(data["fact_id"], cfg.study.facts_per_relation)
    facts = shard_fact_range(args.shard, int(ig.facts_per_shard), n_study)
    prompts = shard_prompts(data, args.input("data"), relation, facts)

    device = resolve_device(ig.device)
    model, tokenizer = load_masked_lm(model_location(cfg.model, cfg.results_dir), device, cfg.model.layer_norm_eps)
    gold = {obj: object_token_id(tokenizer, obj) for obj in prompts["object"].unique()}
    usable = prompts["object"].map(gold).notna().to_numpy()
    if not usable.all():
        skipped = sorted(obj for obj, token in gold.items() if token is None)
        log.warning("%d prompts skipped: object(s) not one token of this vocabulary: %s", int((~usable).sum()), skipped[:10])
    studied = prompts[usable].reset_index(drop=True)
    log.info("%s shard %d: facts %d..%d, %d prompts, device %s, %d threads",
             relation, args.shard, facts.start, facts.stop - 1, len(studied), device, torch.get_num_threads())

    table = prompts[["relation", "fact_id", "template_id"]].assign(
        gold_id=-1, gold_prob=np.nan, pred_id=-1, pred_token=None, correct=False, ig_max=np.nan, base_max=np.nan
    )
    frames = []
    if len(studied):
        encoded = encode_prompts(tokenizer, studied["prompt"].tolist(), MAX_LEN)
        gold_ids = torch.tensor([gold[obj] for obj in studied["object"]], dtype=torch.long)
        plain = activation_scores(model, encoded, gold_ids, batch_size=int(ig.batch_size))
        targets = gold_ids if ig.target == "gold" else plain.pred_ids
        ig_scores = ig_attribution(
            model, encoded, targets, m=int(ig.m), alpha_rule=str(ig.alpha_rule), batch_size=int(ig.batch_size),
            dtype=TORCH_DTYPES[str(ig.dtype)],
        )
        for method, scores in (("ig", ig_scores), ("base", plain.activations)):
            frames.append(long_scores(sparsify(scores, float(ig.storage_ratio)), studied, relation, method))
        index = np.flatnonzero(usable)
        table.loc[index, "gold_id"] = gold_ids.numpy()
        table.loc[index, "gold_prob"] = plain.target_prob.numpy()
        table.loc[index, "pred_id"] = plain.pred_ids.numpy()
        table.loc[index, "pred_token"] = tokenizer.convert_ids_to_tokens(plain.pred_ids.tolist())
        table.loc[index, "correct"] = (plain.pred_ids == gold_ids).numpy()  # same id <=> same vocabulary string
        table.loc[index, "ig_max"] = ig_scores.flatten(1).amax(dim=1).numpy()
        table.loc[index, "base_max"] = plain.activations.flatten(1).amax(dim=1).numpy()

    meta = provenance(
        cfg, "attribute", relation=relation, shard=args.shard, fact_ids=[facts.start, facts.stop],
        device=str(device), model=model_location(cfg.model, cfg.results_dir),
    )
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCORES_SCHEMA.names)
    write_parquet(args.output("scores"), scores, meta, schema=SCORES_SCHEMA)
    write_parquet(args.output("prompts"), table, meta, schema=PROMPTS_SCHEMA)
    log.info("%s shard %d: wrote %d score rows", relation, args.shard, len(scores))


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
