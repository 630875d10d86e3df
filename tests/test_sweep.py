"""The organism sweep's collection and seed-stability measure, on hand-built run files."""

from __future__ import annotations

import itertools
import json
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf

from kn.sweep import (
    chance_jaccard,
    collect_variant,
    confidence_trend,
    job_seconds,
    effect_holds,
    factor_axes,
    layer_matched_chance_jaccard,
    learned_facts,
    neuron_jaccard,
    seed_stability,
    spearman,
    variant_overrides,
)


def _neurons(rows):
    return pd.DataFrame(rows, columns=["relation", "method", "fact_id", "layer", "neuron", "order"])


def test_jaccard_per_fact_matches_set_arithmetic():
    a = _neurons([("P1", "ig", 0, 5, 1, 0), ("P1", "ig", 0, 5, 2, 1), ("P1", "ig", 1, 3, 3, 0), ("P1", "base", 2, 0, 0, 0)])
    b = _neurons([("P1", "ig", 0, 5, 2, 0), ("P1", "ig", 0, 4, 9, 1), ("P1", "ig", 2, 1, 1, 0)])
    out = neuron_jaccard(a, b).set_index("fact_id")
    assert out.loc[0, "jaccard"] == pytest.approx(1 / 3)  # {(5,1),(5,2)} vs {(5,2),(4,9)}
    assert out.loc[1, "jaccard"] == 0.0 and out.loc[1, "n_b"] == 0
    assert out.loc[2, "jaccard"] == 0.0 and out.loc[2, "n_a"] == 0  # base neurons of fact 2 are ignored
    both_empty = neuron_jaccard(_neurons([]), _neurons([]))
    assert both_empty.empty
    same = neuron_jaccard(a, a)
    assert (same["jaccard"] == 1.0).all()


def test_facts_without_neurons_in_either_run_are_not_listed():
    a = _neurons([("P1", "base", 0, 1, 1, 0)])
    assert neuron_jaccard(a, a, method="base")["jaccard"].tolist() == [1.0]
    assert neuron_jaccard(a, _neurons([]), method="ig").empty


def test_variant_overrides_names_missing_keys():
    variants = {"ffn512": {"factor": "ffn_width", "value": 512, "overrides": ["model.train.intermediate_size=512"]}}
    assert variant_overrides(variants, "ffn512") == ["model.train.intermediate_size=512"]
    with pytest.raises(KeyError, match="no variant 'x'"):
        variant_overrides(variants, "x")
    with pytest.raises(KeyError, match="lacks 'overrides'"):
        variant_overrides({"bad": {"factor": "f", "value": 1}}, "bad")


def test_collect_variant_reads_the_run_files(tmp_path):
    metrics = {"overall": {"train_accuracy": 0.9, "heldout_accuracy": 0.8, "majority_baseline": 0.2},
               "training": {"steps": 100, "wall_seconds": 12.5}, "data": {"parameters": 1234}}
    kn_stats = {"methods": {m: {"avg_kn_per_fact": v, "n_facts_without_kn": 1} for m, v in (("ig", 3.0), ("base", 4.0))},
                "layer_share": {"ig": [0.25, 0.75], "base": [0.5, 0.5]}}
    records = {rel: {"ig": {"p": p, "in_target": ok}, "base": {"p": 0.7, "in_target": False}, "n_layers": 2, "ffn_size": 8}
               for rel, p, ok in (("P1", 0.75, True),)}
    gold_probs = pd.concat([pd.Series([0.2, 0.4]), pd.Series([0.6])], ignore_index=True)
    summary = pd.DataFrame([
        ("mean", "ig", "suppress_own", "all", -0.3, -0.4, -0.2, 2),
        ("mean", "random", "suppress_own", "all", -0.01, -0.02, 0.0, 2),
        ("P1", "ig", "suppress_own", "all", -0.9, -1.0, -0.8, 2),
        ("mean", "ig", "suppress_own", "with_kn", -0.5, -0.6, -0.4, 1),
    ], columns=["relation", "method", "metric", "variant", "ratio", "ci_low", "ci_high", "n_facts"])
    (tmp_path / "benchmarks" / "train").mkdir(parents=True)
    pd.DataFrame({"s": [10.5], "max_rss": [1.0]}).to_csv(tmp_path / "benchmarks" / "train" / "model.tsv", sep="\t", index=False)
    pd.DataFrame({"s": [2.0], "max_rss": [1.0]}).to_csv(tmp_path / "benchmarks" / "ig.tsv", sep="\t", index=False)
    seconds = job_seconds([tmp_path / "benchmarks" / "train" / "model.tsv", tmp_path / "benchmarks" / "ig.tsv"])

    record = collect_variant(metrics, kn_stats, summary, gold_probs, records, seconds)
    assert record["mean_gold_prob"] == pytest.approx(0.4)
    assert record["suppress_own_ig"] == -0.3 and record["suppress_own_ig_ci_low"] == -0.4
    assert record["suppress_own_random"] == -0.01
    assert "amplify_own_ig" not in record
    assert record["ig_p_mean"] == 0.75 and record["ig_relations_off_target"] == 0
    assert record["base_relations_off_target"] == 1
    assert record["ig_mean_layer"] == pytest.approx(0.25 * 1 + 0.75 * 2)
    assert record["ig_top_layer_share"] == 0.75 and not math.isnan(record["heldout_accuracy"])
    assert record["ig_layer_share"] == [0.25, 0.75]
    assert record["job_seconds"] == pytest.approx(12.5)
    assert (record["n_layers"], record["ffn_size"]) == (2, 8)
    assert "ffn_mask_all" not in record  # no ceiling given
    ceiling = {"ffn_mask_all": -0.6, "ffn_subject_all": -0.1, "attn_mask_all": -0.9, "ffn_mask_layer_0": -0.05,
               "ffn_mask_layer_1": -0.4}
    with_ceiling = collect_variant(metrics, kn_stats, summary, gold_probs, records, seconds, ceiling)
    assert with_ceiling["ffn_mask_all"] == -0.6 and with_ceiling["ffn_mask_layers"] == [-0.05, -0.4]


def test_collect_variant_without_benchmarks_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark"):
        job_seconds([])


def _enumerated_chance_jaccard(n_a, n_b, n_units):
    """Reference: average Jaccard over every pair of subsets of the given sizes."""
    units = range(n_units)
    values = [
        len(set(a) & set(b)) / len(set(a) | set(b))
        for a in itertools.combinations(units, n_a)
        for b in itertools.combinations(units, n_b)
    ]
    return sum(values) / len(values)


@pytest.mark.parametrize("n_a,n_b,n_units", [(1, 1, 3), (2, 3, 6), (3, 3, 5), (0, 2, 4), (4, 4, 4)])
def test_chance_jaccard_equals_enumeration(n_a, n_b, n_units):
    assert chance_jaccard(n_a, n_b, n_units) == pytest.approx(_enumerated_chance_jaccard(n_a, n_b, n_units))


def _enumerated_layer_matched_jaccard(per_layer_a, per_layer_b, units_per_layer):
    """Reference: average Jaccard over every pair of sets drawn layer by layer with these counts."""
    layers = sorted(set(per_layer_a) | set(per_layer_b))

    def all_sets(per_layer):
        choices = [
            [{(layer, u) for u in combo} for combo in itertools.combinations(range(units_per_layer), count)]
            for layer, count in ((layer, per_layer.get(layer, 0)) for layer in layers)
        ]
        return [set().union(*parts) for parts in itertools.product(*choices)]

    values = [len(a & b) / len(a | b) for a in all_sets(per_layer_a) for b in all_sets(per_layer_b)]
    return sum(values) / len(values)


@pytest.mark.parametrize(
    "per_layer_a,per_layer_b", [({0: 1, 1: 1}, {0: 2}), ({0: 2, 1: 1}, {0: 1, 1: 2}), ({1: 3}, {0: 1, 1: 1})]
)
def test_layer_matched_chance_jaccard_equals_enumeration(per_layer_a, per_layer_b):
    expected = _enumerated_layer_matched_jaccard(per_layer_a, per_layer_b, units_per_layer=4)
    assert layer_matched_chance_jaccard(per_layer_a, per_layer_b, 4) == pytest.approx(expected)


def test_layer_matching_raises_the_yardstick_when_neurons_share_a_layer():
    # 3 + 3 neurons all in one of 6 layers of 100 units: overlap is ~6x likelier than over 600 units
    matched = layer_matched_chance_jaccard({5: 3}, {5: 3}, 100)
    assert matched == pytest.approx(chance_jaccard(3, 3, 100))
    assert matched > 5 * chance_jaccard(3, 3, 600)


def test_chance_jaccard_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="both sets are empty"):
        chance_jaccard(0, 0, 10)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        chance_jaccard(4, 1, 3)


def test_spearman_is_pearson_on_ranks():
    a = pd.Series([1, 2, 3, 4, 5])
    assert spearman(a, pd.Series([10, 20, 30, 40, 50])) == pytest.approx(1.0)
    assert spearman(a, pd.Series([5, 4, 3, 2, 1])) == pytest.approx(-1.0)
    # ties: ranks of [1, 1, 2] are [1.5, 1.5, 3]
    expected = pd.Series([1.0, 2.0, 3.0]).corr(pd.Series([1.5, 1.5, 3.0]))
    assert spearman(pd.Series([1, 2, 3]), pd.Series([1, 1, 2])) == pytest.approx(expected)
    assert math.isnan(spearman(pd.Series([1, 2]), pd.Series([1, 2])))
    assert math.isnan(spearman(a, pd.Series([7] * 5)))


def test_seed_stability_compares_against_random_sets():
    a = _neurons([("P1", "ig", 0, 0, 1, 0), ("P1", "ig", 0, 0, 2, 1), ("P1", "ig", 1, 1, 3, 0)])
    b = _neurons([("P1", "ig", 0, 0, 2, 0), ("P1", "ig", 1, 1, 4, 0), ("P1", "ig", 2, 0, 0, 0)])
    per_fact = neuron_jaccard(a, b)
    out = seed_stability(per_fact, num_layers=2, units_per_layer=5)
    assert out["facts"] == 3 and out["facts_with_kn_in_both"] == 2
    assert out["mean_jaccard"] == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    assert out["facts_sharing_a_neuron"] == 1 and out["facts_identical"] == 0
    expected_chance = (chance_jaccard(2, 1, 10) + chance_jaccard(1, 1, 10) + chance_jaccard(0, 1, 10)) / 3
    assert out["chance_jaccard"] == pytest.approx(expected_chance)
    expected_matched = (
        layer_matched_chance_jaccard({0: 2}, {0: 1}, 5)  # fact 0: both runs' neurons in layer 0
        + layer_matched_chance_jaccard({1: 1}, {1: 1}, 5)
        + 0.0  # fact 2: run a has none
    ) / 3
    assert out["chance_jaccard_layer_matched"] == pytest.approx(expected_matched)
    assert seed_stability(per_fact.iloc[:0], num_layers=2, units_per_layer=5) == {"facts": 0}


def test_effect_holds_needs_both_intervals_clear_of_zero():
    good = {"suppress_own_ig_ci_high": -0.01, "amplify_own_ig_ci_low": 0.02}
    assert effect_holds(good)
    assert not effect_holds({**good, "suppress_own_ig_ci_high": 0.001})
    assert not effect_holds({**good, "amplify_own_ig_ci_low": -0.001})
    assert not effect_holds({"suppress_own_ig_ci_high": -0.01})  # amplification not measured


def test_learned_facts_needs_accuracy_above_the_majority_baseline():
    assert learned_facts({"train_accuracy": 0.93, "majority_baseline": 0.26})
    assert not learned_facts({"train_accuracy": 0.036, "majority_baseline": 0.26})  # stuck on the object prior
    assert not learned_facts({"train_accuracy": 0.26, "majority_baseline": 0.26})  # no better than the prior


def test_factor_axes_place_the_baseline_at_its_own_value():
    cfg = OmegaConf.create({"model": {"train": {"intermediate_size": 1024, "target_accuracy": 0.93}}})
    variants = {
        "baseline": {"factor": "baseline", "value": "default", "overrides": []},
        "ffn4096": {"factor": "ffn_width", "value": 4096, "overrides": ["model.train.intermediate_size=4096"]},
        "ffn512": {"factor": "ffn_width", "value": 512, "overrides": ["model.train.intermediate_size=512"]},
        "converged": {"factor": "training_length", "value": "converged", "overrides": ["model.train.target_accuracy=null"]},
        "short": {"factor": "training_length", "value": 0.7, "overrides": ["model.train.target_accuracy=0.7"]},
    }
    axes = factor_axes(variants, "baseline", cfg)
    assert axes["ffn_width"] == [("ffn512", "512"), ("baseline", "1024\n(baseline)"), ("ffn4096", "4096")]
    assert axes["training_length"] == [("short", "0.7"), ("baseline", "0.93\n(baseline)"), ("converged", "converged")]


def test_factor_axes_compare_a_factor_with_its_named_reference():
    cfg = OmegaConf.create({"model": {"train": {"intermediate_size": 1024, "lr": 0.001}}})
    lr = "model.train.lr=0.0005"
    variants = {
        "baseline": {"factor": "baseline", "value": "default", "overrides": []},
        "lr5e-4": {"factor": "learning_rate", "value": 0.0005, "overrides": [lr]},
        "w4096": {"factor": "width at lr 5e-4", "value": 4096, "reference": "lr5e-4",
                  "overrides": ["model.train.intermediate_size=4096", lr]},
        "w2048": {"factor": "width at lr 5e-4", "value": 2048, "reference": "lr5e-4",
                  "overrides": ["model.train.intermediate_size=2048", lr]},
    }
    axes = factor_axes(variants, "baseline", cfg)
    assert axes["learning_rate"] == [("lr5e-4", "0.0005"), ("baseline", "0.001\n(baseline)")]
    # lr is the same in every variant of the factor, so only the width labels the reference
    assert axes["width at lr 5e-4"] == [("lr5e-4", "1024\n(ref: lr5e-4)"), ("w2048", "2048"), ("w4096", "4096")]
    with pytest.raises(KeyError, match="reference 'nope'"):
        factor_axes({**variants, "w2048": {**variants["w2048"], "reference": "nope"},
                     "w4096": {**variants["w4096"], "reference": "nope"}}, "baseline", cfg)
    with pytest.raises(ValueError, match="different references"):
        factor_axes({**variants, "w2048": {**variants["w2048"], "reference": "baseline"}}, "baseline", cfg)


def test_confidence_trend_ranks_learned_variants_only():
    table = pd.DataFrame({
        "learned_facts": [True, True, True, True, False],
        "mean_gold_prob": [0.4, 0.7, 0.8, 0.9, 0.01],
        "suppress_own_ig": [-0.03, -0.02, -0.015, -0.007, -0.5],  # not-learned row would break the order
        "amplify_own_ig": [0.02, 0.01, 0.012, 0.0, 0.5],
    })
    trend = confidence_trend(table)
    assert trend["variants"] == 4
    assert trend["spearman_gold_prob_suppress_own"] == pytest.approx(1.0)
    assert trend["spearman_gold_prob_amplify_own"] == pytest.approx(-0.8)
