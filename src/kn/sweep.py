"""Model-organism sweep (issue 9): collect one row per kn-tiny variant and compare variants.

Each variant is the default pipeline run with a few config overrides (one factor changed)
into its own results directory; these functions only read those runs' output files and
turn them into a tidy table, so the sweep adds no science of its own beyond the
neuron-set stability measure (Jaccard across seeds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

HEADLINE_METRICS = ("suppress_own", "amplify_own")
METHODS = ("ig", "base", "random")


def variant_overrides(variants: Mapping[str, Mapping[str, Any]], name: str) -> list[str]:
    """The Hydra overrides that define variant ``name`` (its ``overrides`` list)."""
    if name not in variants:
        raise KeyError(f"sweep.variants has no variant {name!r}; defined: {sorted(variants)}")
    spec = variants[name]
    for key in ("factor", "value", "overrides"):
        if key not in spec:
            raise KeyError(f"sweep.variants.{name} lacks {key!r}; expected keys factor, value, overrides")
    return [str(o) for o in spec["overrides"]]


def collect_variant(model_dir: Path, relations: list[str]) -> dict[str, Any]:
    """One tidy record of a finished variant run, read from its output files."""
    model_dir = Path(model_dir)
    metrics = json.loads((model_dir / "training" / "metrics.json").read_text())
    stats = json.loads((model_dir / "analysis" / "kn_stats.json").read_text())
    summary = pd.read_csv(model_dir / "evaluate" / "summary.csv")
    record: dict[str, Any] = {
        "train_accuracy": metrics["overall"]["train_accuracy"],
        "heldout_accuracy": metrics["overall"]["heldout_accuracy"],
        "majority_baseline": metrics["overall"]["majority_baseline"],
        "train_steps": metrics["training"]["steps"],
        "train_seconds": metrics["training"]["wall_seconds"],
        "parameters": metrics["data"]["parameters"],
        "mean_gold_prob": mean_gold_probability(model_dir, relations),
    }
    for method in ("ig", "base"):
        record[f"{method}_avg_kn"] = stats["methods"][method]["avg_kn_per_fact"]
        record[f"{method}_facts_without_kn"] = stats["methods"][method]["n_facts_without_kn"]
        record[f"{method}_p_mean"], record[f"{method}_relations_off_target"] = reached_p(model_dir, relations, method)
        shares = stats["layer_share"][method]
        record[f"{method}_top_layer_share"] = shares[-1]
        record[f"{method}_mean_layer"] = sum((i + 1) * s for i, s in enumerate(shares))
    mean_rows = summary[(summary["relation"] == "mean") & (summary["variant"] == "all")]
    for metric in HEADLINE_METRICS:
        for method in METHODS:
            row = mean_rows[(mean_rows["metric"] == metric) & (mean_rows["method"] == method)]
            if row.empty:
                continue
            record[f"{metric}_{method}"] = float(row["ratio"].iloc[0])
            record[f"{metric}_{method}_ci_low"] = float(row["ci_low"].iloc[0])
            record[f"{metric}_{method}_ci_high"] = float(row["ci_high"].iloc[0])
    return record


def mean_gold_probability(model_dir: Path, relations: list[str]) -> float:
    """Mean gold probability over the studied prompts (from the attribution prompt tables)."""
    frames = [
        pd.read_parquet(path, columns=["gold_prob"])
        for rel in relations
        for path in sorted((model_dir / "attributions" / rel).glob("*.prompts.parquet"))
    ]
    if not frames:
        raise FileNotFoundError(f"{model_dir}/attributions: no *.prompts.parquet for relations {relations}")
    return float(pd.concat(frames)["gold_prob"].mean())


def reached_p(model_dir: Path, relations: list[str], method: str) -> tuple[float, int]:
    """Mean adaptive p over relations, and how many relations ended outside the [2, 5] target."""
    ps, off = [], 0
    for rel in relations:
        record = json.loads((model_dir / "neurons" / f"{rel}.json").read_text())[method]
        ps.append(record["p"])
        off += not record["in_target"]
    return sum(ps) / len(ps), off


def neuron_jaccard(a: pd.DataFrame, b: pd.DataFrame, method: str = "ig") -> pd.DataFrame:
    """Per fact, |A ∩ B| / |A ∪ B| of two runs' knowledge-neuron sets.

    Facts are matched on (relation, fact_id); a fact absent from a table has no neurons.
    Only facts with neurons in at least one run are listed: with none in either, overlap is
    undefined rather than perfect agreement.
    """
    def sets(frame: pd.DataFrame) -> dict[tuple[str, int], set[tuple[int, int]]]:
        rows = frame[frame["method"] == method]
        out: dict[tuple[str, int], set[tuple[int, int]]] = {}
        for rel, fact, layer, neuron in zip(rows["relation"], rows["fact_id"], rows["layer"], rows["neuron"]):
            out.setdefault((str(rel), int(fact)), set()).add((int(layer), int(neuron)))
        return out

    left, right = sets(a), sets(b)
    records = []
    for key in sorted(set(left) | set(right)):
        sa, sb = left.get(key, set()), right.get(key, set())
        records.append(
            {
                "relation": key[0],
                "fact_id": key[1],
                "n_a": len(sa),
                "n_b": len(sb),
                "shared": len(sa & sb),
                "jaccard": len(sa & sb) / len(sa | sb),
            }
        )
    return pd.DataFrame(records, columns=["relation", "fact_id", "n_a", "n_b", "shared", "jaccard"])
