"""The paper's knowledge-neuron statistics (SPEC §4, ``2_analyze_kn.py``) and its layer figure (SPEC §9).

Inputs are per relation the list of each fact's KN set, indexed by fact_id (facts with
no KNs hold an empty set), so every statistic counts zero-KN facts as the paper does.
"""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from kn.paper_numbers import paper_status, paper_values
from kn.tables import METHODS, Neuron

FactSets = Sequence[frozenset[Neuron]]

# SPEC §12: the paper's statistics, with their source markers ([2nd] summaries, [mem] recollection).
PAPER = {
    metric: {**paper_values(key), "source": paper_status(key)}
    for metric, key in (("avg_kn_per_fact", "avg_kn"), ("intra_shared", "intra_shared"), ("inter_shared", "inter_shared"))
}


def fact_sets(lists: Mapping[int, Sequence[Neuron]], fact_ids: Sequence[int]) -> list[frozenset[Neuron]]:
    """One KN set per studied fact (in ``fact_ids`` order) from its neuron list (kn.tables.neuron_lists)."""
    stray = sorted(set(lists) - set(fact_ids))
    if stray:
        raise ValueError(f"knowledge neurons for fact_id(s) {stray[:5]}, which are not among the studied facts")
    return [frozenset(lists.get(int(fact), ())) for fact in fact_ids]


def average_kn_per_fact(sets_by_relation: Mapping[str, FactSets]) -> float:
    """Total KNs over all facts of all relations / number of facts (fact-weighted, zeros included)."""
    n_facts = sum(len(sets) for sets in sets_by_relation.values())
    return sum(len(s) for sets in sets_by_relation.values() for s in sets) / n_facts


def layer_distribution(sets_by_relation: Mapping[str, FactSets], n_layers: int) -> np.ndarray:
    """Share of all pooled KNs (each fact's neurons counted once per fact) in each layer 0..n_layers-1."""
    counts = np.zeros(n_layers, dtype=np.int64)
    for sets in sets_by_relation.values():
        for kn in sets:
            for layer, _ in kn:
                if not 0 <= layer < n_layers:
                    raise ValueError(f"knowledge neuron in layer {layer}, but the model has {n_layers} layers")
                counts[layer] += 1
    total = counts.sum()
    return counts / total if total else np.zeros(n_layers)


def intra_relation_sharing(sets_by_relation: Mapping[str, FactSets]) -> tuple[float, int]:
    """Mean |KN(f) ∩ KN(g)| over all unordered pairs f != g within each relation, pooled.

    Pooling all Σ_r N_r(N_r−1)/2 pairs (large relations dominate, as in the paper) makes
    the sum of intersections equal Σ over neurons of C(c, 2), where c is the number of
    facts of the relation holding that neuron: linear time instead of quadratic.
    Returns (mean, number of pairs); the mean is NaN without pairs.
    """
    shared = 0
    pairs = 0
    for sets in sets_by_relation.values():
        holders = Counter(neuron for kn in sets for neuron in kn)
        shared += sum(c * (c - 1) // 2 for c in holders.values())
        pairs += len(sets) * (len(sets) - 1) // 2
    return (shared / pairs if pairs else float("nan")), pairs


def inter_relation_sharing(sets_by_relation: Mapping[str, FactSets], draws: int, rng: random.Random) -> tuple[float, int]:
    """Mean |KN(f) ∩ KN(g)| over ``draws`` draws per fact f of a fact g of another relation.

    Per draw: a relation uniformly from the others (in sorted order), then a fact
    uniformly within it (``choice`` then ``randint``, the call pattern of SPEC §13). The
    authors' draws are unseeded; ``rng`` makes them reproducible. Returns (mean, number
    of draws); NaN with fewer than two relations.
    """
    relations = sorted(sets_by_relation)
    if len(relations) < 2 or draws < 1:
        return float("nan"), 0
    shared = 0
    total = 0
    for relation in relations:
        others = [r for r in relations if r != relation]
        for kn in sets_by_relation[relation]:
            for _ in range(draws):
                other = sets_by_relation[rng.choice(others)]
                shared += len(kn & other[rng.randint(0, len(other) - 1)])
                total += 1
    return shared / total, total


def kn_statistics(
    sets: Mapping[str, Mapping[str, FactSets]], records: Mapping[str, Mapping], n_layers: int, inter_draws: int, seed: int
) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """The paper's statistics per method, and the layer shares of each method's pooled neurons.

    ``sets[method][relation]`` are the studied facts' KN sets; ``records[relation]`` the refine
    records (adaptive p outcome). Inter-relation draws: one stream seeded with ``seed`` per
    method, so both methods see the same draws (the authors' are unseeded).
    """
    stats: dict[str, dict] = {}
    shares: dict[str, list[float]] = {}
    for method in METHODS:
        by_relation = sets[method]
        intra, n_pairs = intra_relation_sharing(by_relation)
        inter, n_draws = inter_relation_sharing(by_relation, inter_draws, random.Random(seed))
        stats[method] = {
            "avg_kn_per_fact": average_kn_per_fact(by_relation),
            "intra_shared": None if math.isnan(intra) else intra,  # null: no pairs (strict JSON has no NaN)
            "intra_pairs": n_pairs,
            "inter_shared": None if math.isnan(inter) else inter,  # null: fewer than two relations
            "inter_draws": n_draws,
            "n_facts": sum(len(s) for s in by_relation.values()),
            "n_facts_without_kn": sum(1 for s in by_relation.values() for kn in s if not kn),
            "n_facts_without_attribution": sum(len(records[r].get("facts_without_attribution", [])) for r in by_relation),
            "relations_not_in_target": [r for r in sorted(records) if not records[r][method]["in_target"]],
        }
        shares[method] = layer_distribution(by_relation, n_layers).tolist()
    return stats, shares


def statistics_tables(stats: Mapping[str, dict], records: Mapping[str, Mapping], shares: Mapping[str, list[float]]
                      ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ours vs baseline vs paper, per relation adaptive-p outcome, layer shares) as tables."""
    table = pd.DataFrame(
        [
            {"metric": metric, "ours": stats["ig"][metric], "baseline": stats["base"][metric],
             "paper_ours": PAPER[metric]["ig"], "paper_baseline": PAPER[metric]["base"], "paper_source": PAPER[metric]["source"]}
            for metric in ("avg_kn_per_fact", "intra_shared", "inter_shared")
        ]
    )
    per_relation = pd.DataFrame(
        [
            {"relation": rel, "method": method, "n_facts": rec[method]["n_facts"], "avg_kn": rec[method]["avg_kn"],
             "p": rec[method]["p"], "in_target": rec[method]["in_target"], "evaluations": len(rec[method]["evaluations"]),
             "relation_level": len(rec[method]["relation_level"])}
            for rel, rec in sorted(records.items()) for method in METHODS
        ]
    )
    n_layers = len(shares["ig"])
    layers = pd.DataFrame({"layer": range(1, n_layers + 1), "ig_share": shares["ig"], "base_share": shares["base"]})
    return table, per_relation, layers


def statistics_markdown(table: pd.DataFrame, stats: Mapping[str, dict], layers: pd.DataFrame) -> str:
    """Ours vs baseline vs the paper (SPEC §12), plus the layer shares."""
    out = io.StringIO()
    out.write("# Knowledge-neuron statistics (SPEC §4)\n\n")
    out.write("| metric | ours (IG) | baseline | paper ours | paper baseline | paper source |\n|---|---|---|---|---|---|\n")
    for row in table.itertuples():
        out.write(f"| {row.metric} | {_number(row.ours)} | {_number(row.baseline)} | {row.paper_ours} | {row.paper_baseline} | "
                  f"{row.paper_source} |\n")
    for method, label in (("ig", "IG"), ("base", "baseline")):
        s = stats[method]
        out.write(f"\n{label}: {s['n_facts']} facts ({s['n_facts_without_kn']} without KNs), {s['intra_pairs']} "
                  f"intra-relation pairs, {s['inter_draws']} inter-relation draws; relations whose adaptive p never "
                  f"reached the target: {', '.join(s['relations_not_in_target']) or 'none'}.\n")
    out.write("\n| layer | share of IG KNs | share of baseline KNs |\n|---|---|---|\n")
    for row in layers.itertuples():
        out.write(f"| {row.layer} | {row.ig_share:.1%} | {row.base_share:.1%} |\n")
    return out.getvalue()


def _number(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"
