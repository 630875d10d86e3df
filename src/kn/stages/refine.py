"""Stage: knowledge-neuron refinement of one relation (SPEC §4), for IG and the activation baseline.

Inputs: the relation's attribution shards, passed as ``--in scores<k>=<shard>.parquet``
(the matching ``<shard>.prompts.parquet`` is read from beside each). Outputs: the refined
neurons (``--out neurons=...parquet``) and per method the adaptive-p record
(``--out summary=...json``), both as in docs/CONTRACTS.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa

from kn.io import provenance, read_parquet, write_json, write_parquet
from kn.refine import SCORE_COLUMNS, adaptive_refine, coarse_sets, neuron_counts, relation_level
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.refine")

METHODS = ("ig", "base")
NEURONS_SCHEMA = pa.schema(
    [
        ("relation", pa.string()),
        ("method", pa.string()),
        ("fact_id", pa.int32()),
        ("layer", pa.int16()),
        ("neuron", pa.int32()),
        ("order", pa.int32()),
    ]
)


def prompts_path(shard: Path) -> Path:
    """``<shard>.parquet`` -> ``<shard>.prompts.parquet`` (docs/CONTRACTS.md)."""
    return shard.with_name(shard.name.removesuffix(".parquet") + ".prompts.parquet")


def _require_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected at least {columns} (docs/CONTRACTS.md)")


def read_shards(shards: list[Path], relation: str) -> tuple[pd.DataFrame, pd.Series]:
    """All stored scores of the relation and the number of prompts per fact.

    Checks what refinement relies on: one relation, methods ig/base, no duplicate
    (prompt, method, neuron) rows, and fact_ids 0..N-1 without gaps (a missing fact
    would silently drop out of the average #KN, which counts zero-KN facts).
    """
    score_frames, prompt_frames = [], []
    for shard in shards:
        scores = read_parquet(shard)
        _require_columns(scores, ["relation", "method", *SCORE_COLUMNS], shard)
        prompts_file = prompts_path(shard)
        prompts = read_parquet(prompts_file)
        _require_columns(prompts, ["relation", "fact_id", "template_id"], prompts_file)
        for frame, path in ((scores, shard), (prompts, prompts_file)):
            other = sorted(set(frame["relation"].astype(str)) - {relation})
            if other:
                raise ValueError(f"{path}: rows of relation(s) {other}; this job refines {relation}")
        bad_methods = sorted(set(scores["method"].astype(str)) - set(METHODS))
        if bad_methods:
            raise ValueError(f"{shard}: column 'method' has values {bad_methods}; expected {list(METHODS)}")
        score_frames.append(scores)
        prompt_frames.append(prompts)
    scores = pd.concat(score_frames, ignore_index=True)
    prompts = pd.concat(prompt_frames, ignore_index=True)
    duplicated = scores.duplicated(["method", "fact_id", "template_id", "layer", "neuron"])
    if duplicated.any():
        row = scores[duplicated].iloc[0]
        raise ValueError(
            f"attribution shards of {relation}: duplicate score for method {row['method']}, fact {row['fact_id']}, "
            f"template {row['template_id']}, neuron ({row['layer']}, {row['neuron']}); each shard must hold distinct facts"
        )
    if prompts.duplicated(["fact_id", "template_id"]).any():
        raise ValueError(f"prompt tables of {relation}: a (fact_id, template_id) appears in more than one row/shard")
    n_prompts = prompts.groupby("fact_id").size().sort_index()
    expected = list(range(len(n_prompts)))
    if n_prompts.index.tolist() != expected:
        gaps = sorted(set(expected) - set(n_prompts.index.tolist()))
        raise ValueError(
            f"prompt tables of {relation}: fact_ids must be 0..N-1 without gaps (study facts); "
            f"got {len(n_prompts)} facts, first out-of-range or missing ids: {gaps[:5] or n_prompts.index[-1:].tolist()}"
        )
    stray = sorted(set(scores["fact_id"].unique()) - set(expected))
    if stray:
        raise ValueError(f"attribution shards of {relation}: score rows for fact_ids {stray[:5]} absent from the prompt tables")
    return scores, n_prompts


def main(args: StageArgs) -> None:
    cfg = args.cfg
    relation = args.relation
    if relation is None:
        raise SystemExit("refine needs --relation")
    shards = [args.inputs[name] for name in sorted(args.inputs) if name.startswith("scores")]
    if not shards:
        raise SystemExit("refine needs at least one --in scores<k>=<attribution shard>")
    scores, n_prompts = read_shards(shards, relation)
    rc = cfg.refine
    thresholds = {"ig": float(rc.t), "base": float(rc.t_base)}
    tables, summary = [], {"relation": relation}
    for method in METHODS:
        counts = neuron_counts(coarse_sets(scores[scores["method"] == method], thresholds[method]))
        result = adaptive_refine(
            counts,
            n_prompts,
            p=float(rc.p),
            p_step=float(rc.p_step),
            max_evals=int(rc.max_evals),
            target_min=float(rc.target_min),
            target_max=float(rc.target_max),
            min_prompts=int(rc.min_prompts),
        )
        if not result.in_target:
            log.warning(
                "%s %s: no evaluation of p landed in [%s, %s] within %d evaluations %s; keeping the last (p=%r)",
                relation, method, rc.target_min, rc.target_max, rc.max_evals,
                [(e["p"], round(e["avg"], 3)) for e in result.evaluations], result.p,
            )
        log.info("%s %s: p=%r, avg #KN=%.3f over %d facts", relation, method, result.p, result.avg_kn, len(n_prompts))
        tables.append(result.neurons.assign(relation=relation, method=method))
        summary[method] = {
            "t": thresholds[method],
            "p": result.p,
            "evaluations": result.evaluations,
            "in_target": result.in_target,
            "avg_kn": result.avg_kn,
            "n_facts": len(n_prompts),
            "relation_level": relation_level(result.neurons, len(n_prompts), float(rc.relation_share)),
        }
    neurons = pd.concat(tables, ignore_index=True)[[f.name for f in NEURONS_SCHEMA]]
    record = provenance(cfg, "refine", relation=relation)
    write_parquet(args.output("neurons"), neurons, record, schema=NEURONS_SCHEMA)
    write_json(args.output("summary"), {**summary, "provenance": record})


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
