"""Editing case studies (SPEC §7, §8): formula, neuron filter, sampling order, exact restore, erase choice."""

from __future__ import annotations

import copy
import hashlib
import math
import random
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from kn.editing import (
    PromptScorer,
    erase_relation,
    erased_value_slots,
    keep_uncommon_neurons,
    mask_logits,
    neuron_fact_counts,
    run_update,
    sample_updates,
    score_facts,
    top_frequent_neurons,
    updated_value_slots,
    UpdatePlan,
)
from kn.hooks import edited_value_slots
from kn.models import adapter_for, load_masked_lm, object_token_id
from kn.tables import NEURONS, Fact, facts_of, neuron_lists, studied_rows


def value_projections(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Each layer's down projection (weight [hidden, units]: column i is neuron i's value slot)."""
    adapter = adapter_for(model)
    return [adapter.value_projection(layer) for layer in range(adapter.n_layers)]


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    torch.set_num_threads(1)
    return load_masked_lm(tiny_bert_dir)


def checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- update formula


def reference_update(v: np.ndarray, e_old: np.ndarray, e_new: np.ndarray, l1: float, l2: float, times: int = 1) -> np.ndarray:
    """SPEC §7 in float64: scales from the unedited v, applied ``times`` times."""
    norm_v = np.linalg.norm(v)
    delta = -l1 * norm_v / np.linalg.norm(e_old) * e_old + l2 * norm_v / np.linalg.norm(e_new) * e_new
    return v + times * delta


def test_update_formula_matches_independent_computation(tiny):
    model, tokenizer = tiny
    old_id, new_id = tokenizer.convert_tokens_to_ids(["Paris", "Berlin"])
    emb = model.get_input_embeddings().weight.detach().double().numpy()
    weights = [p.weight.detach().double().numpy().copy() for p in value_projections(model)]
    neurons = [(0, 3), (1, 10), (1, 3), (0, 3)]  # (0, 3) twice: the random baseline can draw a neuron twice
    slots = updated_value_slots(model, neurons, old_id, new_id, 1, 8)
    assert set(slots) == {(0, 3), (1, 10), (1, 3)}
    for (layer, unit), column in slots.items():
        expected = reference_update(weights[layer][:, unit], emb[old_id], emb[new_id], 1, 8, times=neurons.count((layer, unit)))
        np.testing.assert_allclose(column.double().numpy(), expected, rtol=1e-5, atol=1e-5)

    with edited_value_slots(model, slots):
        edited = [p.weight.detach().double().numpy() for p in value_projections(model)]
        for layer, unit in slots:
            np.testing.assert_array_equal(edited[layer][:, unit], slots[(layer, unit)].double().numpy())
        untouched = np.ones(weights[0].shape[1], dtype=bool)
        untouched[3] = False
        np.testing.assert_array_equal(edited[0][:, untouched], weights[0][:, untouched])


def test_update_slots_are_computed_from_unedited_weights(tiny):
    model, tokenizer = tiny
    old_id, new_id = tokenizer.convert_tokens_to_ids(["Rome", "Italy"])
    before = checksum(model)
    slots = updated_value_slots(model, [(0, 1), (1, 2)], old_id, new_id, 1, 8)
    assert checksum(model) == before  # computing the update does not touch the model


# ----------------------------------------------------------------------------- exact restore


def test_every_edit_is_restored_bit_exactly(tiny):
    model, tokenizer = tiny
    original = checksum(model)
    ids = tokenizer.convert_tokens_to_ids(["Paris", "Berlin", "Rome", "Madrid"])
    for k, (old_id, new_id) in enumerate(zip(ids, ids[1:])):
        slots = updated_value_slots(model, [(k % 2, k), (1, 60 - k), (0, 7)], old_id, new_id, 1, 8)
        with edited_value_slots(model, slots):
            assert checksum(model) != original
        assert checksum(model) == original
    with edited_value_slots(model, erased_value_slots(model, [(0, 5), (1, 6)], "unk", tokenizer.unk_token_id)):
        assert checksum(model) != original
    assert checksum(model) == original


def test_restore_is_exact_when_the_body_raises(tiny):
    model, tokenizer = tiny
    original = checksum(model)
    old_id, new_id = tokenizer.convert_tokens_to_ids(["Paris", "Berlin"])
    with pytest.raises(RuntimeError, match="mid-edit"):
        with edited_value_slots(model, updated_value_slots(model, [(0, 3), (1, 4)], old_id, new_id, 1, 8)):
            raise RuntimeError("mid-edit")
    assert checksum(model) == original


def test_restore_is_exact_when_a_later_slot_is_invalid(tiny):
    model, _ = tiny
    original = checksum(model)
    hidden = value_projections(model)[0].weight.shape[0]
    bad = {(0, 2): torch.ones(hidden), (1, 9): torch.ones(hidden), (1, 10_000): torch.ones(hidden)}
    with pytest.raises(IndexError, match="neuron 10000 out of range"):
        with edited_value_slots(model, bad):
            pass
    assert checksum(model) == original


def test_erase_slots_zero_and_unk(tiny):
    model, tokenizer = tiny
    zero = erased_value_slots(model, [(0, 1), (1, 2), (0, 1)], "zero", tokenizer.unk_token_id)
    assert list(zero) == [(0, 1), (1, 2)] and all(float(c.abs().sum()) == 0.0 for c in zero.values())
    unk = erased_value_slots(model, [(0, 1)], "unk", tokenizer.unk_token_id)
    emb = model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("[UNK]")]
    assert torch.equal(unk[(0, 1)], emb)


# ----------------------------------------------------------------------------- neuron choice


def authors_select_kn(kn_bag: list, kn_bag_list: list) -> list:
    """Transcription of the authors' select_kn (SPEC §7 step 3): a Counter seeded with the fact's KNs."""
    kn_counter: Counter = Counter()
    for kn in kn_bag:
        kn_counter.update([kn])
    for tmp_kn_bag in kn_bag_list:
        for kn in tmp_kn_bag:
            if kn not in kn_counter:
                continue
            kn_counter.update([kn])
    return [k for k, v in kn_counter.items() if not v > len(kn_bag_list) * 0.1]


def test_code_filter_equals_the_authors_select_kn():
    rng = random.Random(3)
    pool = [(layer, unit) for layer in range(3) for unit in range(6)]
    for n_facts in (5, 12, 20, 37):
        kn_bags = [rng.sample(pool, rng.randint(0, 5)) for _ in range(n_facts)]
        counts = neuron_fact_counts(kn_bags)
        for bag in kn_bags:
            assert keep_uncommon_neurons(bag, counts, n_facts, 0.1, "code") == authors_select_kn(bag, kn_bags)


def test_filter_off_by_one_example():
    """SPEC §7: with N_r = 696, c = 69 is dropped by the code rule although it is not relation-level."""
    neurons = [(0, 68), (0, 69), (0, 70)]
    counts = Counter({(0, 68): 68, (0, 69): 69, (0, 70): 70})
    relation_level = {n for n, c in counts.items() if c >= 0.1 * 696}  # SPEC §4's kn_rel
    assert relation_level == {(0, 70)}
    assert keep_uncommon_neurons(neurons, counts, 696, 0.1, "code") == [(0, 68)]
    assert keep_uncommon_neurons(neurons, counts, 696, 0.1, "paper") == [n for n in neurons if n not in relation_level]
    # share * N_r an integer: both rules drop exactly the relation-level neurons
    counts20 = Counter({(0, 68): 1, (0, 69): 2, (0, 70): 3})
    assert keep_uncommon_neurons(neurons, counts20, 20, 0.1, "code") == keep_uncommon_neurons(neurons, counts20, 20, 0.1, "paper") == [(0, 68)]
    # N_r = 12 (the tiny default): the code rule keeps nothing, the paper rule keeps unshared neurons
    counts12 = Counter({(0, 68): 1, (0, 69): 2, (0, 70): 1})
    assert keep_uncommon_neurons(neurons, counts12, 12, 0.1, "code") == []
    assert keep_uncommon_neurons(neurons, counts12, 12, 0.1, "paper") == [(0, 68), (0, 70)]
    with pytest.raises(ValueError, match="kn_filter"):
        keep_uncommon_neurons(neurons, counts12, 12, 0.1, "exact")


def test_erase_choice_is_top_k_with_ties_by_first_appearance():
    rng = random.Random(5)
    pool = [(layer, unit) for layer in range(2) for unit in range(5)]
    kn_lists = [rng.sample(pool, rng.randint(0, 4)) for _ in range(30)]
    first_seen: dict = {}
    for neurons in kn_lists:
        for neuron in neurons:
            first_seen.setdefault(neuron, len(first_seen))
    facts_with = {n: sum(n in lst for lst in kn_lists) for n in first_seen}
    expected = sorted(first_seen, key=lambda n: (-facts_with[n], first_seen[n]))
    for k in (1, 3, 7, 20):
        assert top_frequent_neurons(kn_lists, k) == expected[:k]
    ties = [[(1, 1)], [(0, 0), (1, 1)], [(0, 0)], [(2, 2)]]
    assert top_frequent_neurons(ties, 2) == [(1, 1), (0, 0)]


# ----------------------------------------------------------------------------- sampling order


def synthetic_study(seed: int, relations=("P1", "P10", "P2"), n_facts=25):
    """Facts with a few objects (frequent ones repeat), 3-6 prompts, KNs from a small shared pool."""
    rng = random.Random(seed)
    facts, kn_lists = {}, {}
    pool = [(layer, unit) for layer in range(3) for unit in range(8)]
    for relation in relations:
        objects = [rng.choice(["a", "a", "b", "c", "d"]) for _ in range(n_facts)]
        facts[relation] = [
            Fact(relation, i, f"s{i}", obj, tuple(range(k)), tuple(f"{relation} {i} {t} [MASK]" for t in range(k)))
            for i, (obj, k) in enumerate((obj, rng.randint(3, 6)) for obj in objects)
        ]
        kn_lists[relation] = [rng.sample(pool, rng.randint(0, 4)) for _ in range(n_facts)]
    return facts, kn_lists


def synthetic_top1(fact: Fact, prompt_index: int) -> bool:
    return (7 * fact.fact_id + prompt_index) % 3 != 0


def authors_sampling(seed, facts, kn_lists, top1, random_shape=None, edits=10, attempts=10000, ppl=5):
    """Transcription of the authors' stage-6 loop (6_edit_knowledge_sampled.py), with their random calls."""
    rng = random.Random(seed)
    randint, choice = rng.randint, rng.choice
    rels = list(facts)
    out, skips = [], Counter()
    for rel in rels:
        bags = facts[rel]
        rel_sample_cnt = 0
        for i in range(attempts):
            bag_idx = randint(0, len(bags) - 1)
            while True:
                tail = choice(bags).object
                if tail != bags[bag_idx].object:
                    break
            kn_bag = authors_select_kn(kn_lists[rel][bag_idx], kn_lists[rel])
            if random_shape:
                for j in range(len(kn_bag)):
                    kn_bag[j] = (randint(0, random_shape[0] - 1), randint(0, random_shape[1] - 1))
            if len(kn_bag) == 0:
                skips[(rel, "no_kn")] += 1
                continue
            rd_idx = randint(1, len(bags[bag_idx].prompts)) - 1
            if not top1(bags[bag_idx], rd_idx):
                skips[(rel, "incorrect_answer")] += 1
                continue
            inner = []
            for _ in range(ppl):
                r = randint(0, len(bags) - 1)
                while r == bag_idx:
                    r = randint(0, len(bags) - 1)
                inner.append(r)
            inter = []
            for _ in range(ppl):
                rand_rel = choice(rels)
                while rand_rel == rel:
                    rand_rel = choice(rels)
                inter.append((rand_rel, randint(0, len(facts[rand_rel]) - 1)))
            out.append((rel, i, bag_idx, tail, tuple(kn_bag), rd_idx, tuple(inner), tuple(inter)))
            rel_sample_cnt += 1
            if rel_sample_cnt == edits:
                break
    return out, skips


@pytest.mark.parametrize("random_shape", [None, (3, 8)])
def test_sampling_reproduces_the_authors_call_order(random_shape):
    facts, kn_lists = synthetic_study(11)
    expected, expected_skips = authors_sampling(42, facts, kn_lists, synthetic_top1, random_shape, edits=4, attempts=300)
    plans, report = sample_updates(
        random.Random(42), facts, kn_lists, synthetic_top1, edits_per_relation=4, max_attempts=300,
        share=0.1, rule="code", ppl_facts=5, random_shape=random_shape,
    )
    got = [(p.relation, p.attempt, p.fact_id, p.new_object, p.neurons, p.prompt_index, p.intra_facts, p.inter_facts) for p in plans]
    assert got == expected
    assert len(got) == 12  # every relation reached its 4 edits
    got_skips = Counter({(s.relation, reason): n for s in report for reason, n in s.skipped.items() if n})
    assert got_skips == expected_skips
    assert {s.relation: s.edits for s in report} == {"P1": 4, "P10": 4, "P2": 4}


def test_sampling_is_deterministic_per_seed():
    facts, kn_lists = synthetic_study(2)
    kwargs = dict(edits_per_relation=5, max_attempts=200, share=0.1, rule="paper", ppl_facts=5)
    first, _ = sample_updates(random.Random(42), facts, kn_lists, synthetic_top1, **kwargs)
    again, _ = sample_updates(random.Random(42), facts, kn_lists, synthetic_top1, **kwargs)
    other, _ = sample_updates(random.Random(43), facts, kn_lists, synthetic_top1, **kwargs)
    assert first == again
    assert first != other
    for plan in first:
        assert plan.fact_id not in plan.intra_facts and all(r != plan.relation for r, _ in plan.inter_facts)
        assert plan.new_object != facts[plan.relation][plan.fact_id].object


def test_single_object_relation_is_skipped_without_draws():
    facts, kn_lists = synthetic_study(4, relations=("P1", "P2"))
    same = [Fact("P0", f.fact_id, f.subject, "a", f.template_ids, f.prompts) for f in facts["P1"]]
    with_single = {"P0": same, **facts}
    kwargs = dict(edits_per_relation=3, max_attempts=100, share=0.1, rule="code", ppl_facts=0)
    plans, report = sample_updates(random.Random(42), with_single, {**kn_lists, "P0": kn_lists["P1"]}, synthetic_top1, **kwargs)
    alone, _ = sample_updates(random.Random(42), facts, kn_lists, synthetic_top1, **kwargs)
    assert report[0].relation == "P0" and report[0].single_object and report[0].attempts == 0
    assert plans == alone  # with no PPL draws, the other relations see the same stream


# ----------------------------------------------------------------------------- inputs


def test_inputs_from_tables_and_bad_input():
    prompts = pd.DataFrame(
        {
            "relation": ["P1"] * 5, "relation_label": ["r"] * 5, "lama_type": ["N-1"] * 5, "fact_id": [0, 0, 1, 1, 2],
            "subject": ["x", "x", "y", "y", "z"], "object": ["Paris", "Paris", "Rome", "Rome", "Paris"],
            "template_id": [1, 0, 0, 1, 0], "template": ["t"] * 5,
            "prompt": ["x b [MASK]", "x a [MASK]", "y a [MASK]", "y b [MASK]", "z a [MASK]"],
        }
    )
    facts = facts_of(studied_rows(prompts, 2), "P1.parquet")
    assert [f.prompts for f in facts] == [("x a [MASK]", "x b [MASK]"), ("y a [MASK]", "y b [MASK]")]
    with pytest.raises(ValueError, match=r"P1.parquet: fact_id 1 is missing"):
        facts_of(prompts[prompts.fact_id != 1], "P1.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['prompt'\]"):
        facts_of(prompts.drop(columns="prompt"), "P1.parquet")
    neurons = pd.DataFrame(
        {"relation": ["P1"] * 4, "method": ["ig", "ig", "base", "ig"], "fact_id": [1, 1, 0, 5],
         "layer": [1, 0, 0, 0], "neuron": [4, 9, 1, 2], "order": [1, 0, 0, 0]}
    )
    lists = neuron_lists(neurons, "ig", "n.parquet")
    assert [lists.get(fact, []) for fact in range(3)] == [[], [(0, 9), (1, 4)], []]
    with pytest.raises(ValueError, match=r"n.parquet: holds relation\(s\) \['P2'\]; expected only P1"):
        NEURONS.check(neurons.assign(relation="P2"), "n.parquet", "P1")


# ----------------------------------------------------------------------------- metrics against plain forward passes


def tiny_facts(tokenizer) -> dict[str, list[Fact]]:
    subjects = ["Alan Turing", "Einstein", "a city", "the country", "London"]
    objects = ["Paris", "Berlin", "Rome", "Paris", "Madrid"]
    templates = ["[X] is located in [MASK] .", "[X] was born in [MASK] .", "the capital of [X] is [MASK] ."]
    facts = {
        rel: [Fact(rel, i, s, o, (0, 1, 2), tuple(t.replace("[X]", s) for t in templates)) for i, (s, o) in enumerate(zip(subjects, objects))]
        for rel in ("P1", "P2")
    }
    assert all(object_token_id(tokenizer, f.object) is not None for fs in facts.values() for f in fs)
    return facts


def single_prompt_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    return logits[enc["input_ids"][0].tolist().index(tokenizer.mask_token_id)]


def test_run_update_metrics_match_a_manually_edited_copy(tiny):
    model, tokenizer = tiny
    facts = tiny_facts(tokenizer)
    ids = {f.object: object_token_id(tokenizer, f.object) for fs in facts.values() for f in fs}
    scorer = PromptScorer(model, tokenizer, ids, batch_size=4)
    plan = UpdatePlan("P1", 0, 1, "Madrid", ((0, 3), (1, 17), (1, 40)), 2, (0, 2, 2), (("P2", 4), ("P2", 0)))
    original = checksum(model)
    unedited, _ = score_facts(scorer, facts)
    row = run_update(scorer, facts, plan, unedited, lambda1=1, lambda2=8, success_k=5)
    assert checksum(model) == original

    edited = copy.deepcopy(model)
    emb = model.get_input_embeddings().weight.detach()
    e_old, e_new = emb[ids["Berlin"]], emb[ids["Madrid"]]
    with torch.no_grad():
        for layer, unit in plan.neurons:
            w = value_projections(edited)[layer].weight
            v = w[:, unit].clone()
            w[:, unit] = v - torch.norm(v) / torch.norm(e_old) * e_old + 8 * torch.norm(v) / torch.norm(e_new) * e_new
    prompt = facts["P1"][1].prompts[2]
    before, after = single_prompt_logits(model, tokenizer, prompt), single_prompt_logits(edited, tokenizer, prompt)
    new_id = ids["Madrid"]
    assert row["pred_after"] == tokenizer.convert_ids_to_tokens(int(after.argmax()))
    assert row["success"] == (int(after.argmax()) == new_id)
    assert row["change"] == (int(after.argmax()) != int(before.argmax()))
    assert row["new_rank_after"] == int((after > after[new_id]).sum()) + 1
    assert row["success_at_k"] == (row["new_rank_after"] <= 5)
    assert math.isclose(row["new_prob_after"], float(torch.softmax(after, -1)[new_id]), rel_tol=1e-4)

    def mean_nll(m, fact_list):
        values = [-float(torch.log_softmax(single_prompt_logits(m, tokenizer, p), -1)[ids[f.object]]) for f in fact_list for p in f.prompts]
        return sum(values) / len(values)

    intra = [facts["P1"][i] for i in plan.intra_facts]
    inter = [facts[r][i] for r, i in plan.inter_facts]
    assert math.isclose(row["nll_intra_before"], mean_nll(model, intra), rel_tol=1e-4)
    assert math.isclose(row["nll_intra_after"], mean_nll(edited, intra), rel_tol=1e-4)
    assert math.isclose(row["nll_inter_before"], mean_nll(model, inter), rel_tol=1e-4)
    assert math.isclose(row["nll_inter_after"], mean_nll(edited, inter), rel_tol=1e-4)
    paraphrase_tops = [int(single_prompt_logits(edited, tokenizer, p).argmax()) for p in facts["P1"][1].prompts[:2]]
    assert row["paraphrases"] == 2
    assert math.isclose(row["para_success_after"], sum(t == new_id for t in paraphrase_tops) / 2)


def test_mask_logits_equal_the_full_model_at_the_mask(tiny):
    model, tokenizer = tiny
    prompts = ["Einstein was born in [MASK] .", "the capital of Italy is [MASK] .", "[MASK] ."]
    batched = mask_logits(model, tokenizer, prompts, batch_size=2)
    for row, prompt in zip(batched, prompts):
        torch.testing.assert_close(row, single_prompt_logits(model, tokenizer, prompt), rtol=1e-5, atol=1e-5)


def test_erase_relation_matches_a_manually_erased_copy(tiny):
    model, tokenizer = tiny
    facts = tiny_facts(tokenizer)
    ids = {f.object: object_token_id(tokenizer, f.object) for fs in facts.values() for f in fs}
    scorer = PromptScorer(model, tokenizer, ids, batch_size=4)
    neurons = [(1, 5), (0, 8), (1, 33)]
    original = checksum(model)
    before, left_out = score_facts(scorer, facts)
    row = erase_relation(scorer, facts, "P2", neurons, "zero", before)
    assert checksum(model) == original and left_out == 0

    erased = copy.deepcopy(model)
    with torch.no_grad():
        for layer, unit in neurons:
            value_projections(erased)[layer].weight[:, unit] = 0.0

    def acc_ppl(m, fact_list):
        hits, nlls = [], []
        for f in fact_list:
            for p in f.prompts:
                logits = single_prompt_logits(m, tokenizer, p)
                hits.append(int(logits.argmax()) == ids[f.object])
                nlls.append(-float(torch.log_softmax(logits, -1)[ids[f.object]]))
        return sum(hits) / len(hits), math.exp(sum(nlls) / len(nlls))

    acc, ppl = acc_ppl(model, facts["P2"])
    acc_new, ppl_new = acc_ppl(erased, facts["P2"])
    other_acc_new, other_ppl_new = acc_ppl(erased, facts["P1"])
    assert row["prompts"] == 15 and row["other_prompts"] == 15
    assert row["acc_before"] == acc and row["acc_after"] == acc_new and row["other_acc_after"] == other_acc_new
    assert math.isclose(row["ppl_before"], ppl, rel_tol=1e-4) and math.isclose(row["ppl_after"], ppl_new, rel_tol=1e-4)
    assert math.isclose(row["other_ppl_after"], other_ppl_new, rel_tol=1e-4)
    assert math.isclose(row["ppl_change"], (row["ppl_after"] - row["ppl_before"]) / row["ppl_before"])
