"""Causal-LM semantics (docs/causal.md), held to independent per-prompt computations on stand-in checkpoints.

Prompt: the template with [X] filled, cut just before [Y], trailing whitespace stripped, the tokenizer's BOS
first where it adds one; position: the last prompt token; target: the object's tokens as the tokenizer writes
them after the prompt (first token by default, all of them with the sequence target); templates whose [X]
comes after [Y] are not used; with causal.templates_ending_in_y only templates ending in [Y] are.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kn.data.pararel import build_bags
from kn.distant import encode_sentences
from kn.editing import PromptScorer, UpdatePlan, edit_embeddings, run_update, score_facts
from kn.models.adapters import adapter_for
from kn.models.encoding import (
    TEMPLATE_ENDS_IN_Y,
    TEMPLATE_SUBJECT_AFTER_Y,
    TEMPLATE_TEXT_AFTER_Y,
    PromptCodec,
    cut_before_mask,
    template_use,
)
from kn.models.forward import score_continuations
from kn.models.load import load_lm
from kn.probe import accuracy_summary, probe_relation
from kn.tables import PROBE_CAUSAL, Fact

from .conftest import RESOURCES
from .standins import write_gpt2_standin, write_llama_standin

RELATIONS = ["P19", "P937"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory):
    return load_lm(write_gpt2_standin(tmp_path_factory.mktemp("gpt2"), RELATIONS))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    return load_lm(write_llama_standin(tmp_path_factory.mktemp("llama"), RELATIONS))


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_template_use_and_the_cut() -> None:
    assert template_use("[X] was born in [Y].") == TEMPLATE_ENDS_IN_Y
    assert template_use("[X] used to work in [Y] .") == TEMPLATE_ENDS_IN_Y
    assert template_use("[X] is a [Y] by profession.") == TEMPLATE_TEXT_AFTER_Y
    assert template_use("The capital of [Y] is [X].") == TEMPLATE_SUBJECT_AFTER_Y
    assert cut_before_mask("Alan Turing was born in [MASK] .") == ("Alan Turing was born in", " ")
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        cut_before_mask("no blank here")


def test_the_key_keeps_only_templates_ending_in_y(gpt2) -> None:
    model, tokenizer = gpt2
    prompts, _ = build_bags(RESOURCES, ["P19", "P1376"], 2)
    uses = prompts["template"].map(template_use)
    default = PromptCodec.of(model, tokenizer).usable_rows(prompts)
    strict = PromptCodec.of(model, tokenizer, {"templates_ending_in_y": True}).usable_rows(prompts)
    assert set(default.index) == set(prompts.index[uses != TEMPLATE_SUBJECT_AFTER_Y])
    assert set(strict.index) == set(prompts.index[uses == TEMPLATE_ENDS_IN_Y])
    assert (uses == TEMPLATE_SUBJECT_AFTER_Y).sum() > 0 and (uses == TEMPLATE_TEXT_AFTER_Y).sum() > 0


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prompts_are_cut_before_y_and_read_at_their_last_token(kind, gpt2, llama) -> None:
    model, tokenizer = {"gpt2": gpt2, "llama": llama}[kind]
    codec = PromptCodec.of(model, tokenizer)
    assert codec.causal
    prompts = ["Alan Turing was born in [MASK] .", "Einstein is a [MASK] by profession."]
    encoded = codec.encode(prompts)
    for prompt, ids, position in zip(prompts, encoded.input_ids, encoded.mask_positions):
        cut = prompt[: prompt.index("[MASK]")].rstrip()
        body = tokenizer(cut, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if kind == "llama" else []  # Llama's tokenizer adds <s>; GPT-2's adds nothing
        assert ids == bos + body and position == len(ids) - 1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_target_is_the_object_as_the_tokenizer_writes_it_after_the_prompt(kind, gpt2, llama) -> None:
    model, tokenizer = {"gpt2": gpt2, "llama": llama}[kind]
    codec = PromptCodec.of(model, tokenizer)
    prompt = "Alan Turing was born in [MASK] ."
    head = tokenizer("Alan Turing was born in", add_special_tokens=False)["input_ids"]
    for obj in ("London", "Ouagadougou"):
        tokens = codec.object_tokens(prompt, obj)
        full = tokenizer("Alan Turing was born in " + obj, add_special_tokens=False)["input_ids"]
        assert list(tokens) == full[len(head):] and codec.target_id(prompt, obj) == tokens[0]
        assert tokenizer.decode(list(tokens)).strip() == obj
    assert len(codec.object_tokens(prompt, "London")) == 1  # a frequent object: one token, with its leading space
    assert len(codec.object_tokens(prompt, "Ouagadougou")) > 1  # a rare one: several
    first = tokenizer.convert_ids_to_tokens(codec.target_id(prompt, "London"))
    assert first == ("ĠLondon" if kind == "gpt2" else "▁London")


def test_causal_probe_against_per_prompt_computations(gpt2) -> None:
    model, tokenizer = gpt2
    prompts, _ = build_bags(RESOURCES, ["P19"], 3)
    table = probe_relation(model, tokenizer, prompts, heldout_templates=[2])
    assert list(table.columns) == PROBE_CAUSAL.columns
    codec = PromptCodec.of(model, tokenizer)
    assert table["template_use"].tolist() == prompts["template"].map(template_use).tolist()
    assert not table["skipped"].any()  # P19 puts the subject before [Y] in every template
    for row, prompt_row in zip(table.itertuples(index=False), prompts.itertuples(index=False)):
        ids = codec.encode([prompt_row.prompt]).input_ids[0]
        tokens = list(codec.object_tokens(prompt_row.prompt, prompt_row.object))
        logits = full_logits(model, ids + tokens[:-1])
        logp = torch.log_softmax(logits[len(ids) - 1:], dim=-1)
        probs = torch.softmax(logits[len(ids) - 1], dim=-1)
        assert row.gold_id == tokens[0] and row.object_tokens == len(tokens)
        assert row.gold_prob == pytest.approx(float(probs[tokens[0]]), rel=1e-4)
        assert row.gold_rank == int((logits[len(ids) - 1] > logits[len(ids) - 1, tokens[0]]).sum()) + 1
        assert row.object_logprob == pytest.approx(float(sum(logp[s, t] for s, t in enumerate(tokens))), rel=1e-4)
        greedy, seq = [], list(ids)
        for _ in tokens:  # greedy decoding from the prompt, one token at a time
            greedy.append(int(full_logits(model, seq)[-1].argmax()))
            seq.append(greedy[-1])
        assert row.greedy_match == (greedy == tokens)
        assert row.correct == (greedy[0] == tokens[0])
    summary = accuracy_summary(table, prompts).set_index("relation").loc["P19"]
    assert summary["templates"] == 13 and summary["templates_used"] == 13
    assert summary["templates_text_after_y"] + summary["templates_ending_in_y"] == 13
    assert summary["prompts_text_dropped"] == 3 * summary["templates_text_after_y"]
    multi = {f for f, n in zip(table["fact_id"], table["object_tokens"]) if n > 1}
    assert summary["multi_token_facts"] == len(multi)


def test_a_subject_after_y_template_is_listed_but_never_scored(gpt2) -> None:
    model, tokenizer = gpt2
    prompts, _ = build_bags(RESOURCES, ["P1376"], 1)
    table = probe_relation(model, tokenizer, prompts)
    subject_after = (table["template_use"] == TEMPLATE_SUBJECT_AFTER_Y).to_numpy()
    assert subject_after.any()
    assert table.loc[subject_after, "skipped"].all() and (table.loc[subject_after, "gold_id"] == -1).all()
    assert table.loc[subject_after, "gold_prob"].isna().all() and not table.loc[~subject_after, "skipped"].any()


def test_teacher_forced_sequence_scores_and_the_first_token(llama) -> None:
    model, tokenizer = llama
    codec = PromptCodec.of(model, tokenizer, {"target": "sequence"})
    prompts = ["Alan Turing was born in [MASK] .", "Einstein died in [MASK]."]
    objects = ["Ouagadougou", "London"]
    encoded = codec.encode(prompts)
    continuations = codec.continuations(prompts, objects)
    assert continuations == [codec.object_tokens(p, o) for p, o in zip(prompts, objects)]
    scores = score_continuations(model, encoded, continuations, batch_size=2)
    for k, (ids, cont) in enumerate(zip(encoded.input_ids, continuations)):
        logp = torch.log_softmax(full_logits(model, ids + list(cont[:-1]))[len(ids) - 1:], dim=-1)
        expected = float(sum(logp[s, t] for s, t in enumerate(cont)))
        assert scores.logprob[k] == pytest.approx(expected, rel=1e-5)
        assert scores.prob[k] == pytest.approx(math.exp(expected), rel=1e-5)
        assert scores.first.prob[k] == pytest.approx(math.exp(float(logp[0, cont[0]])), rel=1e-4)


def test_update_writes_unembedding_rows_of_first_tokens_when_untied(llama) -> None:
    """Llama's output layer is untied: the update adds/subtracts the unembedding rows of the first tokens of the
    old and new objects after the prompt (SPEC §7 with the causal target), into the down projection's columns."""
    model, tokenizer = llama
    vectors, which = edit_embeddings(model)
    assert "untied" in which and vectors.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    codec = PromptCodec.of(model, tokenizer)
    templates = ["[X] was born in [MASK] .", "[X] is originally from [MASK] .", "[X] was native to [MASK] ."]
    subjects, objects = ["Alan Turing", "Einstein", "Ada Lovelace"], ["London", "Paris", "Rome"]
    facts = {"P1": [Fact("P1", i, s, o, (0, 1, 2), tuple(t.replace("[X]", s) for t in templates))
                    for i, (s, o) in enumerate(zip(subjects, objects))]}
    scorer = PromptScorer(model, tokenizer, {}, batch_size=4, codec=codec)
    plan = UpdatePlan("P1", 0, 1, "Rome", ((0, 3), (1, 17)), 2, (0, 2), ())
    unedited, _ = score_facts(scorer, facts)
    before_weights = [p.clone() for p in model.parameters()]
    row = run_update(scorer, facts, plan, unedited, lambda1=1, lambda2=8, success_k=5)
    assert all(torch.equal(a, b) for a, b in zip(before_weights, model.parameters()))  # restored exactly

    edited = copy.deepcopy(model)
    prompt = facts["P1"][1].prompts[2]
    old_id, new_id = codec.target_id(prompt, "Paris"), codec.target_id(prompt, "Rome")
    unembed = model.get_output_embeddings().weight
    with torch.no_grad():
        for layer, unit in plan.neurons:
            w = edited.model.layers[layer].mlp.down_proj.weight  # [hidden, units]: column = value slot
            v = w[:, unit].clone()
            w[:, unit] = v - torch.norm(v) / torch.norm(unembed[old_id]) * unembed[old_id] \
                + 8 * torch.norm(v) / torch.norm(unembed[new_id]) * unembed[new_id]
    ids = codec.encode([prompt]).input_ids[0]
    after = full_logits(edited, ids)[-1]
    assert row["success"] == (int(after.argmax()) == new_id)
    assert row["new_rank_after"] == int((after > after[new_id]).sum()) + 1
    assert math.isclose(row["new_prob_after"], float(torch.softmax(after, -1)[new_id]), rel_tol=1e-4)


def test_tied_gpt2_updates_with_its_input_embeddings(gpt2) -> None:
    model, _ = gpt2
    vectors, which = edit_embeddings(model)
    assert "tied" in which and "untied" not in which
    assert vectors.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert adapter_for(model).value_slots(0).data_ptr() == model.transformer.h[0].mlp.c_proj.weight.data_ptr()


def test_web_sentences_are_cut_before_the_masked_word(llama) -> None:
    _, tokenizer = llama
    texts = ["Alan Turing was born in [MASK] in 1912 .", "[MASK] is a city .", "word " * 40 + "in [MASK] ."]
    encoded = encode_sentences(tokenizer, texts, max_len=16, causal=True)
    bos = tokenizer.bos_token_id
    first = tokenizer("Alan Turing was born in", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[0] == [bos, *first] and encoded.mask_positions[0] == len(first)
    assert encoded.mask_positions[1] == -1 and not encoded.readable[1]  # no token before the masked word
    long = tokenizer(("word " * 40 + "in").strip(), add_special_tokens=False)["input_ids"]
    assert encoded.truncated[2] and encoded.input_ids[2] == [bos, *long[-15:]]  # the last tokens before it are kept
    assert encoded.mask_positions[2] == 15 and encoded.n_pieces[2] == len(long)
