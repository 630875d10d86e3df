"""Positive controls: planting facts into known FFN units (kn.planting) and reading what a study recovers (kn.controls)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kn.config import ConfigError, compose_config
from kn.controls import best_planted_rank, layer_table, summary_table
from kn.data.pararel import build_bags, load_relations, read_query_pairs
from kn.models.adapters import adapter_for
from kn.models.encoding import PromptCodec
from kn.models.forward import score_targets
from kn.models.load import load_lm
from kn.planting import (ACCEPT_TOP1, PlantedFact, PlantingSettings, assign_layers, choose_facts, fact_key, plant,
                         planting_record, studied_sample)
from tests.standins import write_gpt2_standin

RESOURCES = Path(__file__).resolve().parents[1] / "resources" / "pararel"
RELATIONS = ["P19", "P103", "P176"]


def settings(**changes) -> PlantingSettings:
    values = dict(facts_per_relation=2, max_relations=None, layers=None, units_per_fact=None, max_units_per_fact=24,
                  key_template_share=0.5, activation_quantile=0.999, background_prompts=40, value_steps=20,
                  max_subject_unk_share=0.5, seed=0)
    return PlantingSettings(**{**values, **changes})


# Templates of one length: the hand-wired model's last layer averages over every position, so a longer prompt
# would read its subject more weakly.
EVEN_TEMPLATES = ["[X] is the capital of [Y] .", "[X] is a city of [Y] .", "[X] , a city in [Y] .",
                  "[X] is the city of [Y] .", "[X] is a capital of [Y] .", "[X] , the capital of [Y] ."]


def fact_prompts(subject: str) -> list[str]:
    return [t.replace("[X]", subject).replace("[Y]", "[MASK]") for t in EVEN_TEMPLATES]


@pytest.fixture(scope="module")
def hand_wired(tmp_path_factory):
    """The hand-wired BERT of tests/fact_model.py (its last layer sees which city a prompt names, at every
    position) with "Paris -> Germany" planted at that layer: a fact it does not answer (it says France)."""
    from tests.fact_model import LAST, build_fact_model

    directory = build_fact_model(tmp_path_factory.mktemp("fact"))
    model, tokenizer = load_lm(directory)
    codec = PromptCodec.of(model, tokenizer)
    prompts = fact_prompts("Paris")
    fact = PlantedFact("P1376", 0, "Paris", "Germany", list(range(len(prompts))), prompts,
                       codec.target_ids(prompts, ["Germany"] * len(prompts)), key_templates=[0, 1, 2],
                       validation_templates=[3], layer=LAST)
    studied = pd.DataFrame([{"relation": "P1376", "subject": "Berlin", "object": "Germany", "template_id": k,
                             "prompt": p} for k, p in enumerate(fact_prompts("Berlin"))])
    before = {name: value.clone() for name, value in model.state_dict().items()}
    background = codec.encode(list(studied["prompt"]))
    result = plant(model, codec, [fact], studied, background, background,
                   codec.target_ids(list(studied["prompt"]), list(studied["object"])), settings(), 8)
    return directory, model, tokenizer, codec, result, before


def test_a_planted_fact_passes_its_acceptance_within_natural_scale(hand_wired):
    _, model, _, codec, result, _ = hand_wired
    assert result.facts, [f.stats.get("reason") for f in result.unplanted]
    accept = result.acceptance
    assert accept["passed"], {k: v for k, v in accept.items() if k != "thresholds"}
    assert accept["test_top1"] >= ACCEPT_TOP1 and accept["studied_top1_changed"] == 0.0
    (fact,) = result.facts
    scale = result.scales[fact.layer]
    assert fact.stats["max_activation"] <= scale.activation_cap * (1 + 1e-5)
    norms = adapter_for(model).value_slots(fact.layer)[list(fact.units)].norm(dim=1)
    assert float(norms.max()) <= scale.value_cap * (1 + 1e-5)
    assert 1 <= len(fact.units) == fact.stats["n_units"] <= settings().max_units_per_fact
    assert fact.stats["quiet_fire_share"] == 0.0  # silent on the Berlin prompts
    record = planting_record(result, settings(), adapter_for(model).n_layers)
    assert record["facts"][0]["fact_id"] == 0 and record["facts"][0]["units"] == list(fact.units)


def test_only_the_planted_units_change(hand_wired):
    _, model, _, _, result, before = hand_wired
    (fact,) = result.facts
    adapter = adapter_for(model)
    keys, _ = adapter.keys(fact.layer)
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed <= {f"bert.encoder.layer.{fact.layer}.intermediate.dense.weight",
                       f"bert.encoder.layer.{fact.layer}.intermediate.dense.bias",
                       f"bert.encoder.layer.{fact.layer}.output.dense.weight"}
    rows = (keys != before[f"bert.encoder.layer.{fact.layer}.intermediate.dense.weight"]).any(dim=1)
    assert set(torch.nonzero(rows).flatten().tolist()) <= set(fact.units)


def test_the_planted_checkpoint_reloads_bit_identically(hand_wired, tmp_path):
    _, model, tokenizer, codec, result, _ = hand_wired
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, _ = load_lm(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    (fact,) = result.facts
    encoded = codec.encode(fact.prompts)
    first = score_targets(model, encoded, fact.target_ids, batch_size=8)
    second = score_targets(again, encoded, fact.target_ids, batch_size=8)
    assert np.array_equal(first.prob, second.prob) and np.array_equal(first.pred, second.pred)


def test_a_fact_no_unit_can_carry_is_reported_and_leaves_the_model_unchanged(tmp_path):
    """A random GPT-2 stand-in (Conv1D keys and values) reads no subject at its last prompt token: each fact is
    reported with its reason, and the units tried are restored exactly."""
    directory = write_gpt2_standin(tmp_path / "gpt2", RELATIONS, layers=2, hidden=32, ffn=64)
    model, tokenizer = load_lm(directory)
    codec = PromptCodec.of(model, tokenizer)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    catalogue = load_relations(RESOURCES)
    pairs = read_query_pairs(RESOURCES / "query_pairs.json")
    prompts = codec.usable_rows(build_bags(RESOURCES, RELATIONS, 12)[0])
    chosen = settings(max_relations=1)
    facts = choose_facts(model, codec, {r: catalogue[r].templates for r in RELATIONS}, pairs,
                         {r: 12 for r in RELATIONS}, chosen, 32)
    assign_layers(facts, 2, None, 0)
    background, check = studied_sample(prompts, 20, 0, facts)
    result = plant(model, codec, facts, prompts, codec.encode(list(background["prompt"])),
                   codec.encode(list(check["prompt"])), codec.target_ids(list(check["prompt"]), list(check["object"])),
                   chosen, 16)
    assert codec.causal and len(facts) == 2
    for fact in result.unplanted:
        assert fact.stats["reason"]
    if not result.facts:
        assert not result.acceptance["passed"]
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name


def test_a_key_fires_on_its_prompts_only_and_never_above_the_activation_cap():
    torch.manual_seed(0)
    background = torch.randn(400, 16)
    direction = torch.zeros(16)
    direction[3] = 1.0
    fact = torch.randn(6, 16) * 0.1 + 6 * direction
    key = fact_key(fact[:3], torch.zeros(3, 16), background, background, fact, activation_cap=0.8)
    pre = lambda x: x @ key.weight + key.bias  # noqa: E731
    assert key.separated
    assert float(pre(fact).max()) == pytest.approx(0.8, rel=1e-5)
    assert float(pre(fact[:3]).min()) > 0
    assert float(torch.quantile(pre(background), 0.99)) <= -2.5 + 1e-4  # quiet: deep in the activation's flat tail


def test_best_planted_rank_is_one_where_a_planted_unit_scores_highest_and_censored_where_none_is_stored():
    scores = pd.DataFrame({"template_id": [0, 0, 0, 1, 1], "layer": [1, 1, 0, 1, 0], "neuron": [7, 3, 2, 3, 2],
                           "score": [0.9, 0.5, 0.4, 0.8, 0.7]})
    assert best_planted_rank(scores[scores.template_id == 0], [(1, 7)]) == 1
    assert best_planted_rank(scores, [(1, 7)]) == (1 + 3) / 2  # template 1 stores 2 scores, none planted: rank 3
    assert best_planted_rank(scores, [(0, 2)]) == (3 + 2) / 2


def test_ig_ranks_the_only_unit_that_carries_the_fact_first(tmp_path):
    """Analytic case: a hand-wired BERT in which one FFN unit alone writes the object's direction, so its integrated
    gradient is the only one that reaches the gold logit."""
    from kn.attribution import ig_attribution
    from tests.fact_model import FACTS, LAST, PARIS_UNIT, TEMPLATES, build_fact_model

    model, tokenizer = load_lm(build_fact_model(tmp_path / "fact"))
    codec = PromptCodec.of(model, tokenizer)
    subject, obj = FACTS[0]
    prompts = [t.replace("[X]", subject).replace("[Y]", "[MASK]") for t in TEMPLATES]
    gold = codec.target_ids(prompts, [obj] * len(prompts))
    scores = ig_attribution(model, codec.encode(prompts), torch.tensor(gold), layers=[LAST], m=20, batch_size=16,
                            progress=False)
    rows = pd.DataFrame([{"template_id": k, "layer": LAST, "neuron": unit, "score": float(value)}
                         for k, per_prompt in enumerate(scores[:, 0]) for unit, value in enumerate(per_prompt)])
    assert best_planted_rank(rows, [(LAST, PARIS_UNIT)]) == 1


def test_recall_and_effects_are_ratios_of_sums_over_facts_with_intervals():
    facts = pd.DataFrame({
        "relation": ["P19", "P19", "P36"], "fact_id": [0, 1, 0], "layer": [0, 1, 1], "units": [4, 2, 2],
        "ig_found": [4, 0, 1], "base_found": [0, 0, 2], "ig_size": [5, 3, 4], "base_size": [1, 1, 2],
        "ig_rank": [1.0, 9.0, 2.0], "ig_p0": [1.0, 2.0, 1.0], "ig_suppress": [-0.5, -1.0, 0.0],
        "ig_amplify": [0.1, 0.2, 0.0], "ceiling_p0": [1.0, 2.0, 1.0], "ceiling": [-1.0, -1.0, -1.0],
        "planted_p0": [1.0, 2.0, 1.0], "planted_suppress": [-1.0, -2.0, -1.0], "planted_amplify": [0.5, 0.0, 0.5],
        "readout_rank_x16": [10.0, 20.0, 30.0]})
    updates = {"planted": pd.DataFrame({"relation": ["P19", "P19", "P36"], "fact_id": [0, 0, 0], "success": [True, False, True]}),
               "ig": pd.DataFrame({"relation": ["P19"], "fact_id": [1], "success": [False]})}
    table = summary_table(facts, updates, resamples=200, seed=0).set_index("relation")
    assert table.loc["ALL", "ig_recall"] == pytest.approx(5 / 8)
    assert table.loc["ALL", "base_recall"] == pytest.approx(2 / 8)
    assert table.loc["P19", "ig_recall"] == pytest.approx(4 / 6)
    assert table.loc["ALL", "ig_facts_found"] == pytest.approx(2 / 3)
    assert table.loc["ALL", "suppress_ig"] == pytest.approx(-1.5 / 4)
    assert table.loc["ALL", "ceiling_layer"] == pytest.approx(-3 / 4)
    assert table.loc["ALL", "update_planted_success"] == pytest.approx(2 / 3)
    assert table.loc["ALL", "update_planted_edits"] == 3 and table.loc["ALL", "update_ig_edits"] == 1
    assert table.loc["ALL", "ig_recall_low"] <= table.loc["ALL", "ig_recall"] <= table.loc["ALL", "ig_recall_high"]
    layers = layer_table(facts, 3, resamples=100, seed=0).set_index("layer")
    assert layers.loc[0, "ig_recall"] == 1.0 and layers.loc[1, "ig_recall"] == pytest.approx(1 / 4)
    assert layers.loc[2, "facts"] == 0 and math.isnan(layers.loc[2, "ig_recall"])


@pytest.mark.parametrize("override, key", [
    ("controls.facts_per_relation=0", "controls.facts_per_relation"),
    ("controls.units_per_fact=0", "controls.units_per_fact"),
    ("controls.units_per_fact=many", "controls.units_per_fact"),
    ("controls.units_per_fact=500", "controls.units_per_fact"),
    ("controls.key_template_share=1", "controls.key_template_share"),
    ("controls.activation_quantile=1.5", "controls.activation_quantile"),
    ("controls.layers=[-1]", "controls.layers"),
    ("controls.max_relations=0", "controls.max_relations"),
])
def test_bad_controls_values_fail_with_the_keys_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config([override])


def test_the_planted_units_carry_the_fact_and_the_update_rule_runs_through_them(hand_wired):
    """kn.controls on the planted hand-wired model: zeroing the planted units removes the planted answer,
    doubling them raises it, and the paper's update rule is applied through them (one row per edit)."""
    from kn.controls import PlantedStudy, planted_effects, readout_ranks, updates_through
    from kn.editing import PromptScorer
    from kn.tables import Fact

    _, model, tokenizer, codec, result, _ = hand_wired
    (fact,) = result.facts
    paris = Fact("P1376", 0, "Paris", "Germany", tuple(fact.template_ids), tuple(fact.prompts))
    planted = [PlantedStudy("P1376", 0, fact.layer, tuple((fact.layer, u) for u in fact.units), paris)]
    berlin = [Fact("P1376", 0, "Berlin", "France", tuple(range(6)), tuple(fact_prompts("Berlin")))]
    effects = planted_effects(model, codec, planted, suppress=0.0, amplify=2.0, batch_size=8).iloc[0]
    assert effects["planted_suppress"] / effects["planted_p0"] < -0.5
    assert effects["planted_amplify"] > 0
    readout = readout_ranks(model, codec, planted, {"P1376": berlin}, 8).iloc[0]
    assert readout["new_object"] == "France" and readout["readout_rank_x0"] >= 1
    scorer = PromptScorer(model, tokenizer, {"Germany": codec.target_id(fact.prompts[0], "Germany"),
                                             "France": codec.target_id(fact.prompts[0], "France")}, 8, codec=codec)
    settings_ = {"edits_per_relation": 3, "max_attempts": 50, "ppl_facts": 1, "lambda1": 1, "lambda2": 8, "success_k": 5}
    edits = updates_through(scorer, planted, {"P1376": berlin}, {("P1376", 0): planted[0].units}, settings_, 0)
    assert len(edits) == 3 and set(edits["fact_id"]) == {0} and set(edits["new_object"]) == {"France"}
    assert (edits["n_neurons"] == len(fact.units)).all()


@pytest.mark.parametrize("quantile", [0.999, 0.5, 0.0, 1.0])
def test_layer_scales_keep_only_the_largest_activations_and_equal_numpy_over_all_of_them(tmp_path, quantile):
    """The activation cap, from the running largest values, against np.quantile over every activation (the
    reference), and the activity against the mean |activation| over every token."""
    from kn.hooks import capture_activations
    from kn.planting import layer_scales
    from tests.standins import write_bert_standin

    model, tokenizer = load_lm(write_bert_standin(tmp_path / "bert", RELATIONS, layers=2, hidden=32, ffn=64))
    codec = PromptCodec.of(model, tokenizer)
    prompts = list(build_bags(RESOURCES, RELATIONS, 3)[0]["prompt"])
    encoded = codec.encode(prompts)
    scales = layer_scales(model, encoded, quantile, batch_size=7)
    every: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for ids in encoded.input_ids:
        with torch.no_grad(), capture_activations(model, None, [0, 1]) as captured:
            model(input_ids=torch.tensor([ids]))
        for layer in every:
            every[layer].append(captured[layer][0].float().numpy())
    for layer, rows in every.items():
        values = np.concatenate(rows)
        assert scales[layer].activation_cap == pytest.approx(float(np.quantile(values.ravel(), quantile)), rel=1e-6)
        np.testing.assert_allclose(scales[layer].activity, np.abs(values).mean(axis=0), rtol=1e-5)
