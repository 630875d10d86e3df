"""End to end on a model whose knowledge neurons are known by construction (tests/fact_model.py).

One FFN unit in the last layer carries each fact. Integrated gradients + refinement must
recover exactly these units, and suppressing them must lower the gold probability while
amplifying raises it, on the fact's own prompts but not on the other fact's prompts.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from kn.attribution import activation_scores, ig_attribution, sparsify
from kn.interventions import Intervention, gold_probabilities
from kn.models import encode_prompts, load_masked_lm
from kn.refine import adaptive_refine, coarse_sets, neuron_counts
from tests.fact_model import BERLIN_UNIT, FACTS, LAST, PARIS_UNIT, TEMPLATES, build_fact_model


@pytest.fixture(scope="module")
def fact_model(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = load_masked_lm(build_fact_model(tmp_path_factory.mktemp("fact-model")))
    prompts = pd.DataFrame(
        [(f, t, template.replace("[X]", subject).replace("[Y]", "[MASK]"), obj)
         for f, (subject, obj) in enumerate(FACTS) for t, template in enumerate(TEMPLATES)],
        columns=["fact_id", "template_id", "prompt", "object"],
    )
    encoded = encode_prompts(tokenizer, prompts["prompt"].tolist())
    gold = torch.tensor([tokenizer.convert_tokens_to_ids(o) for o in prompts["object"]])
    return model, tokenizer, prompts, encoded, gold


def refined(scores: torch.Tensor, prompts: pd.DataFrame, t: float) -> dict[int, list[tuple[int, int]]]:
    """Stored triplets (SPEC §3) -> refined KNs per fact with the paper's settings (SPEC §4)."""
    stored = sparsify(scores, 0.1)
    stored = stored.assign(fact_id=prompts["fact_id"].to_numpy()[stored["prompt"]],
                           template_id=prompts["template_id"].to_numpy()[stored["prompt"]])
    counts = neuron_counts(coarse_sets(stored, t))
    result = adaptive_refine(counts, prompts.groupby("fact_id").size(), p=0.7, p_step=0.05, max_evals=6,
                             target_min=2.0, target_max=5.0, min_prompts=3)
    return {f: list(zip(g.layer, g.neuron)) for f, g in result.neurons.groupby("fact_id")}


def test_construction_predicts_the_facts(fact_model) -> None:
    model, tokenizer, prompts, encoded, gold = fact_model
    probs = gold_probabilities(model, encoded, gold.tolist(), [Intervention(i) for i in range(len(prompts))])
    assert (probs > 0.3).all(), probs  # a memorised fact, far above 1 / vocabulary


def test_ig_and_refinement_find_the_constructed_neurons(fact_model) -> None:
    model, _, prompts, encoded, gold = fact_model
    kn = refined(ig_attribution(model, encoded, gold, m=20, progress=False), prompts, t=0.2)
    assert kn == {0: [(LAST, PARIS_UNIT)], 1: [(LAST, BERLIN_UNIT)]}


def test_activation_baseline_also_sees_the_firing_unit(fact_model) -> None:
    model, _, prompts, encoded, gold = fact_model
    kn = refined(activation_scores(model, encoded, gold).activations, prompts, t=0.5)
    assert (LAST, PARIS_UNIT) in kn[0] and (LAST, BERLIN_UNIT) in kn[1]


def test_suppress_lowers_and_amplify_raises_only_the_own_fact(fact_model) -> None:
    model, tokenizer, prompts, encoded, gold = fact_model
    units = {0: ((LAST, PARIS_UNIT),), 1: ((LAST, BERLIN_UNIT),)}
    rows = []
    for i, fact in enumerate(prompts["fact_id"]):
        for neurons in (units[fact], units[1 - fact]):  # own KN, then the other fact's KN
            rows += [Intervention(i), Intervention(i, neurons, 0.0), Intervention(i, neurons, 2.0)]
    probs = gold_probabilities(model, encoded, gold.tolist(), rows).reshape(-1, 2, 3)
    own, other = probs[:, 0], probs[:, 1]
    assert (own[:, 1] < 0.5 * own[:, 0]).all(), own  # suppressing its neuron at least halves P(gold)
    assert (own[:, 2] > own[:, 0]).all(), own
    # The other fact's neuron does not fire here: scaling it changes P(gold) by far less.
    assert (abs(other[:, 1] - other[:, 0]) < 0.1 * abs(own[:, 1] - own[:, 0])).all(), other
