"""Refinement (SPEC §4) on hand-built score tables: thresholds, floor, order, adaptive p."""

from __future__ import annotations

import pandas as pd
import pytest

from kn.refine import adaptive_refine, coarse_sets, neuron_counts, refine_facts, relation_level


def table(rows: list[tuple[int, int, int, int, float]]) -> pd.DataFrame:
    """Rows (fact_id, template_id, layer, neuron, score) as a score table."""
    return pd.DataFrame(rows, columns=["fact_id", "template_id", "layer", "neuron", "score"])


def fact_with_counts(fact_id: int, n_prompts: int, counts: dict[tuple[int, int], int]) -> list[tuple]:
    """Score rows in which neuron (l, i) reaches the coarse set of exactly counts[(l, i)] prompts."""
    rows = []
    for template in range(n_prompts):
        rows.append((fact_id, template, 0, 999, 1.0))  # the prompt max; in no prompt's count below threshold
        for (layer, neuron), count in counts.items():
            if template < count:
                rows.append((fact_id, template, layer, neuron, 0.9))
    return rows


def test_coarse_set_keeps_ties_and_uses_each_prompts_own_max() -> None:
    t = 0.2
    rows = [
        (0, 0, 1, 1, 5.0),
        (0, 0, 1, 2, t * 5.0),  # exactly at the threshold: kept (">=")
        (0, 0, 1, 3, 0.999),  # just below 1.0 = 0.2 x 5.0: dropped
        (0, 1, 2, 1, 0.5),  # prompt 1 has its own, smaller max
        (0, 1, 2, 2, 0.1),  # 0.1 >= 0.2 x 0.5: kept
        (0, 1, 2, 3, 0.09),
    ]
    kept = coarse_sets(table(rows), t)
    assert list(zip(kept.template_id, kept.layer, kept.neuron)) == [(0, 1, 1), (0, 1, 2), (1, 2, 1), (1, 2, 2)]


def test_coarse_set_is_sorted_by_prompt_then_layer_neuron() -> None:
    rows = [(0, 1, 3, 0, 1.0), (0, 0, 2, 5, 1.0), (0, 0, 0, 7, 1.0), (0, 1, 0, 1, 1.0)]
    kept = coarse_sets(table(rows), 0.5)
    assert list(zip(kept.template_id, kept.layer, kept.neuron)) == [(0, 0, 7), (0, 2, 5), (1, 0, 1), (1, 3, 0)]


def test_floor_of_min_prompts_dominates_small_bags() -> None:
    # n = 4 prompts, p = 0.7: p x n = 2.8, so the floor 3 is the threshold.
    rows = fact_with_counts(0, 4, {(5, 1): 3, (5, 2): 2})
    counts = neuron_counts(coarse_sets(table(rows), 0.2))
    kn = refine_facts(counts, pd.Series({0: 4}), p=0.7, min_prompts=3)
    assert set(zip(kn.layer, kn.neuron)) == {(0, 999), (5, 1)}
    no_floor = refine_facts(counts, pd.Series({0: 4}), p=0.7, min_prompts=0)
    assert (5, 2) not in set(zip(no_floor.layer, no_floor.neuron))  # 2 < 2.8 either way
    assert (5, 1) in set(zip(no_floor.layer, no_floor.neuron))


def test_threshold_is_p_times_each_facts_own_prompt_count() -> None:
    # Fact 0 has 10 prompts (threshold 7), fact 1 has 4 (threshold max(2.8, 3) = 3).
    rows = fact_with_counts(0, 10, {(1, 1): 7, (1, 2): 6}) + fact_with_counts(1, 4, {(1, 1): 3})
    counts = neuron_counts(coarse_sets(table(rows), 0.2))
    kn = refine_facts(counts, pd.Series({0: 10, 1: 4}), p=0.7, min_prompts=3)
    got = {(f, l, i) for f, l, i in zip(kn.fact_id, kn.layer, kn.neuron)}
    assert got == {(0, 0, 999), (0, 1, 1), (1, 0, 999), (1, 1, 1)}


def test_order_is_first_appearance_not_sorted() -> None:
    # (5, 1) first appears in prompt 0; (0, 3) only from prompt 1 on, although (0, 3) < (5, 1).
    rows = [
        (0, 0, 5, 1, 1.0), (0, 0, 6, 0, 1.0),
        (0, 1, 0, 3, 1.0), (0, 1, 5, 1, 1.0), (0, 1, 6, 0, 1.0),
        (0, 2, 6, 0, 1.0), (0, 2, 5, 1, 1.0), (0, 2, 0, 3, 1.0),  # rows out of (l, i) order on purpose
        (0, 3, 0, 3, 1.0),
    ]
    counts = neuron_counts(coarse_sets(table(rows), 0.2))
    kn = refine_facts(counts, pd.Series({0: 4}), p=0.7, min_prompts=3)
    assert list(zip(kn.layer, kn.neuron)) == [(5, 1), (6, 0), (0, 3)]
    assert kn.order.tolist() == [0, 1, 2]


def test_facts_without_scores_count_in_the_average() -> None:
    rows = fact_with_counts(0, 4, {(3, 3): 4, (3, 4): 4, (3, 5): 4})  # 4 KNs incl. the max neuron
    counts = neuron_counts(coarse_sets(table(rows), 0.2))
    n_prompts = pd.Series({0: 4, 1: 4})  # fact 1 stored nothing
    result = adaptive_refine(counts, n_prompts, p=0.7, p_step=0.05, max_evals=6, target_min=2, target_max=5, min_prompts=3)
    assert result.evaluations == [{"p": 0.7, "avg": 4 / 2}]
    assert result.in_target and result.p == 0.7


def test_adaptive_p_accumulates_in_binary_floating_point() -> None:
    # One fact, 10 prompts. 3 neurons in all 10 prompts, 3 in 9, one in 8, one in 7 (+ the max neuron in 10).
    counts_by_neuron = {(9, k): 10 for k in range(3)} | {(9, 10 + k): 9 for k in range(3)} | {(9, 20): 8, (9, 21): 7}
    counts = neuron_counts(coarse_sets(table(fact_with_counts(0, 10, counts_by_neuron)), 0.2))
    n_prompts = pd.Series({0: 10})
    result = adaptive_refine(counts, n_prompts, p=0.7, p_step=0.05, max_evals=6, target_min=2, target_max=5, min_prompts=3)
    expected_ps = [0.7]
    for _ in range(4):
        expected_ps.append(expected_ps[-1] + 0.05)
    assert [e["p"] for e in result.evaluations] == expected_ps
    assert expected_ps[-1] == 0.9000000000000001  # the accumulated value, not 0.9
    # With the accumulated p the threshold is 9.000000000000002, so count-9 neurons drop out: 4 KNs.
    assert result.in_target and result.avg_kn == 4
    # A literal p = 0.9 would have kept the count-9 neurons too (7 KNs): the accumulation matters.
    assert len(refine_facts(counts, n_prompts, p=0.9, min_prompts=3)) == 7


def test_adaptive_p_oscillation_keeps_last_evaluation_and_flags_it() -> None:
    # n = 4: p = 0.7 or 0.75 -> threshold 3 (7 KNs, too many); p = 0.8 -> 3.2 (1 KN, too few).
    counts_by_neuron = {(2, k): 3 for k in range(6)}
    counts = neuron_counts(coarse_sets(table(fact_with_counts(0, 4, counts_by_neuron)), 0.2))
    n_prompts = pd.Series({0: 4})
    result = adaptive_refine(counts, n_prompts, p=0.7, p_step=0.05, max_evals=6, target_min=2, target_max=5, min_prompts=3)
    ps = [0.7]
    for direction in (+1, +1, -1, +1, -1):
        ps.append(ps[-1] + 0.05 if direction > 0 else ps[-1] - 0.05)
    assert [e["p"] for e in result.evaluations] == ps
    assert [e["avg"] for e in result.evaluations] == [7, 7, 1, 7, 1, 7]
    assert not result.in_target
    assert result.p == ps[-1]
    pd.testing.assert_frame_equal(result.neurons, refine_facts(counts, n_prompts, p=ps[-1], min_prompts=3))


def test_adaptive_p_rejects_zero_evaluations() -> None:
    with pytest.raises(ValueError, match="max_evals"):
        adaptive_refine(pd.DataFrame(), pd.Series({0: 4}), p=0.7, p_step=0.05, max_evals=0, target_min=2,
                        target_max=5, min_prompts=3)


def test_relation_level_counts_facts_sharing_a_neuron() -> None:
    neurons = pd.DataFrame(
        [(0, 3, 3, 0), (0, 1, 1, 1), (1, 1, 1, 0), (2, 3, 3, 0), (2, 4, 4, 1)],
        columns=["fact_id", "layer", "neuron", "order"],
    )
    # 10 facts (7 without KNs): (3, 3) and (1, 1) are in 2 facts each, (4, 4) in 1.
    assert relation_level(neurons, 10, 0.2) == [[3, 3], [1, 1]]
    assert relation_level(neurons, 10, 0.1) == [[3, 3], [1, 1], [4, 4]]
    assert relation_level(neurons, 10, 0.25) == []
