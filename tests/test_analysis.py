"""The paper's KN statistics on hand-built neuron sets, checked by independent counting."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pandas as pd
import pytest

from kn.tables import neuron_lists
from kn.analysis import average_kn_per_fact, fact_sets, inter_relation_sharing, intra_relation_sharing, layer_distribution

A, B, C, D = (0, 1), (1, 2), (2, 3), (2, 4)
SETS = {
    "P1": [frozenset({A, B}), frozenset({A, B, C}), frozenset(), frozenset({A})],
    "P2": [frozenset({C, D}), frozenset({D})],
    "P3": [frozenset()],
}


def test_fact_sets_index_by_fact_id_and_keep_empty_facts() -> None:
    rows = pd.DataFrame({"relation": "P1", "method": "ig", "fact_id": [2, 0, 2], "layer": [1, 0, 2], "neuron": [2, 1, 3],
                         "order": [0, 0, 1]})
    lists = neuron_lists(rows, "ig")
    assert fact_sets(lists, range(4)) == [frozenset({A}), frozenset(), frozenset({B, C}), frozenset()]
    with pytest.raises(ValueError, match=r"fact_id\(s\) \[2\]"):
        fact_sets(lists, range(2))


def test_average_counts_zero_kn_facts() -> None:
    assert average_kn_per_fact(SETS) == (2 + 3 + 0 + 1 + 2 + 1 + 0) / 7


def test_layer_distribution_pools_every_facts_neurons() -> None:
    shares = layer_distribution(SETS, 4)
    # layer 0: A x3; layer 1: B x2; layer 2: C x2, D x2; layer 3: none. 9 KNs in all.
    np.testing.assert_allclose(shares, [3 / 9, 2 / 9, 4 / 9, 0.0])
    with pytest.raises(ValueError, match="layer 2"):
        layer_distribution(SETS, 2)


def test_intra_sharing_equals_explicit_pair_enumeration() -> None:
    mean, pairs = intra_relation_sharing(SETS)
    explicit = [len(f & g) for sets in SETS.values() for f, g in itertools.combinations(sets, 2)]
    assert pairs == len(explicit) == 6 + 1 + 0
    assert mean == pytest.approx(sum(explicit) / len(explicit))


def test_intra_sharing_on_random_sets_matches_enumeration() -> None:
    rng = random.Random(0)
    sets = {f"P{r}": [frozenset((rng.randrange(3), rng.randrange(4)) for _ in range(rng.randrange(5)))
                      for _ in range(rng.randrange(1, 9))] for r in range(4)}
    explicit = [len(f & g) for s in sets.values() for f, g in itertools.combinations(s, 2)]
    mean, pairs = intra_relation_sharing(sets)
    assert pairs == len(explicit)
    assert mean == pytest.approx(sum(explicit) / len(explicit))


def test_intra_sharing_without_pairs_is_nan() -> None:
    assert math.isnan(intra_relation_sharing({"P1": [frozenset({A})]})[0])


class ScriptedRng:
    """Stands in for random.Random: records the calls and returns scripted picks."""

    def __init__(self, choices: list[str], ints: list[int]) -> None:
        self.choices, self.ints, self.calls = list(choices), list(ints), []

    def choice(self, seq: list[str]) -> str:
        self.calls.append(("choice", tuple(seq)))
        return self.choices.pop(0)

    def randint(self, a: int, b: int) -> int:
        self.calls.append(("randint", a, b))
        return self.ints.pop(0)


def test_inter_sharing_draws_other_relation_then_fact() -> None:
    sets = {"P1": [frozenset({A, B}), frozenset({C})], "P2": [frozenset({A}), frozenset({A, C})], "P3": [frozenset({B})]}
    # One draw per fact, facts in order P1/0, P1/1, P2/0, P2/1, P3/0.
    rng = ScriptedRng(choices=["P2", "P2", "P3", "P1", "P1"], ints=[1, 1, 0, 1, 0])
    mean, draws = inter_relation_sharing(sets, 1, rng)  # type: ignore[arg-type]
    # |{A,B} & {A,C}| = 1, |{C} & {A,C}| = 1, |{A} & {B}| = 0, |{A,C} & {C}| = 1, |{B} & {A,B}| = 1
    assert draws == 5 and mean == pytest.approx(4 / 5)
    assert rng.calls[:2] == [("choice", ("P2", "P3")), ("randint", 0, 1)]
    assert rng.calls[4:6] == [("choice", ("P1", "P3")), ("randint", 0, 0)]  # P2/0 drew P3 (one fact)


def test_inter_sharing_bounds_and_determinism() -> None:
    shared = {r: [frozenset({A})] * 3 for r in ("P1", "P2", "P3")}
    assert inter_relation_sharing(shared, 5, random.Random(1)) == (1.0, 45)
    disjoint = {"P1": [frozenset({A})], "P2": [frozenset({B})]}
    assert inter_relation_sharing(disjoint, 7, random.Random(1)) == (0.0, 14)
    assert inter_relation_sharing(SETS, 20, random.Random(3)) == inter_relation_sharing(SETS, 20, random.Random(3))
    assert math.isnan(inter_relation_sharing({"P1": [frozenset({A})]}, 5, random.Random(0))[0])
