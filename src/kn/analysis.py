"""The paper's knowledge-neuron statistics (SPEC §4, ``2_analyze_kn.py``) and its layer figure (SPEC §9).

Inputs are per relation the list of each fact's KN set, indexed by fact_id (facts with
no KNs hold an empty set), so every statistic counts zero-KN facts as the paper does.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from kn.paper_numbers import paper_status, paper_values

Neuron = tuple[int, int]
FactSets = Sequence[frozenset[Neuron]]

# SPEC §12: the paper's statistics, with their source markers ([2nd] summaries, [mem] recollection).
PAPER = {
    metric: {**paper_values(key), "source": paper_status(key)}
    for metric, key in (("avg_kn_per_fact", "avg_kn"), ("intra_shared", "intra_shared"), ("inter_shared", "inter_shared"))
}


def fact_sets(neurons: pd.DataFrame, n_facts: int) -> list[frozenset[Neuron]]:
    """One KN set per fact_id 0..n_facts-1 from a refined-neuron table of one relation and method."""
    sets: list[set[Neuron]] = [set() for _ in range(n_facts)]
    for fact_id, layer, neuron in zip(neurons["fact_id"], neurons["layer"], neurons["neuron"]):
        if not 0 <= fact_id < n_facts:
            raise ValueError(f"neuron row for fact_id {fact_id}, but the relation has {n_facts} facts")
        sets[int(fact_id)].add((int(layer), int(neuron)))
    return [frozenset(s) for s in sets]


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
