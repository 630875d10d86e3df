"""Interventions (SPEC §5): exact restoration, batching equivalence, draws, controls, aggregation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kn.hooks import scale_neurons
from kn.interventions import (
    EvaluationInputs,
    Intervention,
    draw_other_facts,
    evaluate_relation,
    gold_probabilities,
    layer_matched_random,
    rank_by_attribution,
    ratio_of_averages,
    summarize,
    summarize_dose,
)
from kn.hooks import scale_neurons_per_row as scale_rows
from kn.models import encode_prompts, load_masked_lm

PROMPTS = ["Paris is the capital of [MASK] .", "[MASK] is located in Germany .", "Alan Turing works in the field of [MASK] ."]


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir: Path):
    torch.manual_seed(0)
    model, tokenizer = load_masked_lm(tiny_bert_dir)
    encoded = encode_prompts(tokenizer, PROMPTS)
    ids, mask = encoded.padded(tokenizer.pad_token_id)
    positions = torch.tensor(encoded.mask_positions)
    return model, tokenizer, encoded, ids, mask, positions


def scale_neurons_per_row(model, rows: list[Intervention], positions: torch.Tensor):
    """kn.hooks.scale_neurons_per_row for a batch of interventions (row r: its neurons and factor)."""
    return scale_rows(model, [row.neurons for row in rows], [row.factor for row in rows], positions)


def mask_logits(model, ids, mask, positions) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(ids)), positions]


def test_per_row_scaling_matches_scale_neurons_row_by_row(tiny) -> None:
    model, _, _, ids, mask, positions = tiny
    rows = [Intervention(0, ((0, 3), (1, 5), (1, 7)), 0.0), Intervention(1, ((1, 5),), 2.0), Intervention(2, (), 1.0)]
    with scale_neurons_per_row(model, rows, positions):
        batched = mask_logits(model, ids, mask, positions)
    for r, row in enumerate(rows):
        with scale_neurons(model, list(row.neurons), row.factor, positions[r : r + 1]):
            single = mask_logits(model, ids[r : r + 1], mask[r : r + 1], positions[r : r + 1])
        torch.testing.assert_close(batched[r : r + 1], single, rtol=1e-5, atol=1e-5)
    plain = mask_logits(model, ids, mask, positions)
    assert torch.equal(batched[2], plain[2])  # a row with no neurons is the unmodified model
    assert not torch.allclose(batched[0], plain[0])  # and the scaled rows really changed


def test_interventions_restore_model_exactly_also_on_exception(tiny) -> None:
    model, _, _, ids, mask, positions = tiny
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = mask_logits(model, ids, mask, positions)
    rows = [Intervention(r, ((0, 1), (1, 2)), 0.0) for r in range(3)]
    with scale_neurons_per_row(model, rows, positions):
        inside = mask_logits(model, ids, mask, positions)
    assert not torch.equal(inside, before)
    with pytest.raises(RuntimeError, match="boom"):
        with scale_neurons_per_row(model, rows, positions):
            raise RuntimeError("boom")
    after = mask_logits(model, ids, mask, positions)
    assert torch.equal(before, after)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_gold_probabilities_full_softmax_dedup_and_batching(tiny) -> None:
    model, tokenizer, encoded, ids, mask, positions = tiny
    gold = [tokenizer.convert_tokens_to_ids(w) for w in ("France", "Berlin", "logic")]
    rows = [Intervention(0), Intervention(1), Intervention(2), Intervention(1, ((1, 4),), 0.0), Intervention(0)]
    probs = gold_probabilities(model, encoded, gold, rows, batch_size=2)
    expected = torch.softmax(mask_logits(model, ids, mask, positions), dim=-1)[torch.arange(3), torch.tensor(gold)]
    np.testing.assert_allclose(probs[:3], expected.numpy(), rtol=1e-5)
    assert probs[4] == probs[0]
    with scale_neurons(model, [(1, 4)], 0.0, positions[1:2]):
        direct = torch.softmax(mask_logits(model, ids[1:2], mask[1:2], positions[1:2]), -1)[0, gold[1]]
    assert probs[3] == pytest.approx(float(direct), rel=1e-5)
    single = gold_probabilities(model, encoded, gold, rows, batch_size=1)
    np.testing.assert_allclose(single, probs, rtol=1e-5)
    one_prompt_at_a_time = gold_probabilities(model, encoded, gold, rows, batch_size=2, max_resumed_prompts=1)
    np.testing.assert_allclose(one_prompt_at_a_time, probs, rtol=1e-5)


def test_draws_replay_one_stream_over_all_relations() -> None:
    n_facts = {"P19": 3, "P101": 4, "P20": 2, "P1303": 5}
    relations = sorted(n_facts)
    rng = random.Random(42)  # one process over every relation in sorted order, as the authors' code
    stream = {}
    for rel in relations:
        others = [r for r in relations if r != rel]
        stream[rel] = []
        for _ in range(n_facts[rel]):
            other = rng.choice(others)
            stream[rel].append((other, rng.randint(0, n_facts[other] - 1)))
    for rel in reversed(relations):  # job order must not matter
        draws = draw_other_facts(list(n_facts), n_facts, rel, 42)
        assert draws == stream[rel]
        assert all(o != rel and 0 <= f < n_facts[o] for o, f in draws)
    assert draw_other_facts(["P1"], {"P1": 3}, "P1", 42) == []
    with pytest.raises(ValueError, match="P9"):
        draw_other_facts(relations, n_facts, "P9", 42)


def test_layer_matched_random_control() -> None:
    reference = [(3, 1), (3, 2), (0, 5), (3, 7)]
    drawn = layer_matched_random(reference, 10, np.random.default_rng(7))
    assert [l for l, _ in drawn] == [l for l, _ in reference]
    assert len(set(drawn)) == len(drawn) and not set(drawn) & set(reference)
    assert drawn == layer_matched_random(reference, 10, np.random.default_rng(7))
    # layer 0 has 3 units: the third reference neuron of layer 0 finds none free, so the
    # control stops at the layer-matched prefix instead of failing the evaluation
    short = layer_matched_random([(1, 0), (0, 0), (0, 1), (1, 1)], 3, np.random.default_rng(0))
    assert [l for l, _ in short] == [1, 0]
    assert not set(short) & {(1, 0), (0, 0), (0, 1), (1, 1)}


def test_rank_by_attribution_sums_max_normalised_scores() -> None:
    scores = pd.DataFrame(
        [(0, 0, 1, 1, 10.0), (0, 0, 1, 2, 5.0), (0, 1, 1, 2, 1.0), (0, 1, 0, 9, 0.5), (1, 0, 2, 2, 3.0), (1, 0, 2, 1, 3.0)],
        columns=["fact_id", "template_id", "layer", "neuron", "score"],
    )
    ranked = rank_by_attribution(scores)
    # fact 0: (1,2) = 0.5 + 1.0 = 1.5, (1,1) = 1.0, (0,9) = 0.5; fact 1: a tie, broken by ascending (l, i).
    assert ranked == {0: [(1, 2), (1, 1), (0, 9)], 1: [(2, 1), (2, 2)]}


def synthetic_results(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for relation, n_facts, n_prompts in (("P1", 5, 3), ("P2", 4, 2)):
        for fact in range(n_facts):
            for method in ("ig", "base"):
                n_neurons = 0 if (fact == 0 and method == "ig") else 2
                for target in ("own", "other"):
                    for template in range(n_prompts):
                        p0 = rng.uniform(0.05, 0.9)
                        change = 0.0 if n_neurons == 0 else rng.uniform(-0.5, 0.5) * p0
                        rows.append((relation, fact, target, method, template, n_neurons, p0, p0 - abs(change),
                                     p0 + abs(change) / 2))
    return pd.DataFrame(rows, columns=["relation", "fact_id", "target", "method", "template_id", "n_neurons", "p0",
                                       "p_suppress", "p_amplify"])


def test_summary_is_ratio_of_averages_and_unweighted_mean() -> None:
    results = synthetic_results(np.random.default_rng(0))
    summary = summarize(results, resamples=0, seed=0).set_index(["relation", "method", "metric", "variant"])
    for (relation, method, target), group in results.groupby(["relation", "method", "target"]):
        direct = (group.p_suppress - group.p0).mean() / group.p0.mean()  # mean over prompts, then the ratio
        assert summary.loc[(relation, method, f"suppress_{target}", "all"), "ratio"] == pytest.approx(direct)
        with_kn = group[group.n_neurons > 0]
        direct_kn = (with_kn.p_amplify - with_kn.p0).mean() / with_kn.p0.mean()
        assert summary.loc[(relation, method, f"amplify_{target}", "with_kn"), "ratio"] == pytest.approx(direct_kn)
        assert summary.loc[(relation, method, f"amplify_{target}", "with_kn"), "n_facts"] == with_kn.fact_id.nunique()
    for method in ("ig", "base"):
        per_relation = [summary.loc[(r, method, "suppress_own", "all"), "ratio"] for r in ("P1", "P2")]
        assert summary.loc[("mean", method, "suppress_own", "all"), "ratio"] == pytest.approx(np.mean(per_relation))
    # It is not the average of per-prompt ratios.
    own = results[(results.relation == "P1") & (results.method == "base") & (results.target == "own")]
    assert summary.loc[("P1", "base", "suppress_own", "all"), "ratio"] != pytest.approx(((own.p_suppress - own.p0) / own.p0).mean())


def test_ratio_of_averages_weights() -> None:
    delta, p0 = np.array([-1.0, -2.0, 0.0]), np.array([2.0, 4.0, 4.0])
    assert ratio_of_averages(delta, p0) == pytest.approx(-3.0 / 10.0)
    assert ratio_of_averages(delta, p0, np.array([2.0, 0.0, 1.0])) == pytest.approx(-2.0 / 8.0)
    assert np.isnan(ratio_of_averages(delta, p0, np.zeros(3)))


def test_bootstrap_is_deterministic_and_brackets_the_estimate() -> None:
    results = synthetic_results(np.random.default_rng(1))
    first = summarize(results, resamples=200, seed=5)
    pd.testing.assert_frame_equal(first, summarize(results, resamples=200, seed=5))
    other = summarize(results, resamples=200, seed=6)
    assert not np.allclose(first.ci_low, other.ci_low)
    finite = first.dropna()
    assert (finite.ci_low <= finite.ci_high).all()
    assert ((finite.ci_low <= finite.ratio + 1e-12) & (finite.ratio <= finite.ci_high + 1e-12)).mean() > 0.9


def test_evaluate_relation_rows_match_direct_forward_passes(tiny) -> None:
    model, tokenizer, encoded, ids, mask, positions = tiny
    gold = [tokenizer.convert_tokens_to_ids(w) for w in ("France", "Berlin", "logic")]
    prompts = pd.DataFrame({"relation": ["P1", "P1", "P2"], "fact_id": [0, 0, 0], "template_id": [0, 1, 0]})
    kn = {"ig": {0: [(1, 3), (0, 2)]}, "base": {}}
    inputs = EvaluationInputs("P1", encoded, gold, prompts, [0], {0: ("P2", 0)}, kn, {"ig": {0: [(1, 3), (0, 2), (1, 9)]}})
    results, dose = evaluate_relation(model, inputs, suppress_factor=0.0, amplify_factor=2.0, dose_ks=[1, 2, 5],
                                      batch_size=4)
    assert len(results) == 3 * 2  # (2 own + 1 other prompt) x 2 methods
    base = results[results.method == "base"]
    assert (base.p_suppress == base.p0).all() and (base.p_amplify == base.p0).all() and (base.n_neurons == 0).all()
    ig_other = results[(results.method == "ig") & (results.target == "other")].iloc[0]
    with scale_neurons(model, kn["ig"][0], 2.0, positions[2:3]):
        direct = torch.softmax(mask_logits(model, ids[2:3], mask[2:3], positions[2:3]), -1)[0, gold[2]]
    assert ig_other.p_amplify == pytest.approx(float(direct), rel=1e-5)
    assert ig_other.prompt_relation == "P2"
    assert dose.k.tolist() == [1, 2, 5, 1, 2, 5] and dose.n_neurons.tolist() == [1, 2, 3] * 2


def test_dose_summary_matches_direct_ratios() -> None:
    rng = np.random.default_rng(2)
    rows = [(rel, fact, t, method, k, min(k, 3), p0, p0 * rng.uniform(0.2, 1.0))
            for rel, n_facts in (("P1", 4), ("P2", 3)) for fact in range(n_facts) for t in range(2)
            for method in ("ig", "random") for k in (1, 5) for p0 in [rng.uniform(0.1, 0.9)]]
    dose = pd.DataFrame(rows, columns=["relation", "fact_id", "template_id", "method", "k", "n_neurons", "p0", "p_suppress"])
    curve = summarize_dose(dose, resamples=100, seed=0).set_index(["relation", "method", "k"])
    for (rel, method, k), group in dose.groupby(["relation", "method", "k"]):
        direct = (group.p_suppress - group.p0).mean() / group.p0.mean()
        assert curve.loc[(rel, method, k), "ratio"] == pytest.approx(direct)
    assert curve.loc[("mean", "ig", 5), "ratio"] == pytest.approx(
        (curve.loc[("P1", "ig", 5), "ratio"] + curve.loc[("P2", "ig", 5), "ratio"]) / 2)
    assert curve.loc[("mean", "ig", 5), "n_neurons"] == 3
    assert (curve.ci_low <= curve.ci_high).all()
    pd.testing.assert_frame_equal(summarize_dose(dose, 100, 0), summarize_dose(dose, 100, 0))
