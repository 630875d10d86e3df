"""The probe (SPEC §1): gold probability, rank and top-1 against an independent per-prompt computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kn.models.load import load_masked_lm
from kn.tables import PROBE
from kn.probe import (
    accuracy_summary,
    overall_row,
    probe_relation,
    relation_use,
    score_prompts,
    train_template_ids,
)

PROMPTS = [
    "Paris is the capital of [MASK].",
    "[MASK] is located in France .",
    "Alan Turing works in the field of [MASK] .",
    "Einstein was born in [MASK] , a city .",
    "Rome is the capital of [MASK].",
]


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    return load_masked_lm(tiny_bert_dir)


def reference(model, tokenizer, prompt: str, gold: int) -> tuple[float, int, int]:
    """One prompt at a time, no padding: softmax over the full vocabulary at the first [MASK]."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    position = ids[0].tolist().index(tokenizer.mask_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, position].double()
    probs = torch.exp(logits - torch.logsumexp(logits, dim=0))
    order = torch.argsort(logits, descending=True).tolist()
    return float(probs[gold]), order.index(gold) + 1, int(logits.argmax())


def prompt_rows(objects: list[str], relation: str = "P1") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "relation": relation,
            "fact_id": np.arange(len(PROMPTS), dtype="int32") // 2,
            "template_id": np.arange(len(PROMPTS), dtype="int32") % 2,
            "prompt": PROMPTS,
            "object": objects,
        }
    )


def test_scores_match_a_per_prompt_softmax(tiny):
    model, tokenizer = tiny
    vocab = tokenizer.get_vocab()
    golds = [vocab[w] for w in ("France", "Paris", "logic", "Berlin", "Italy")]
    scores = score_prompts(model, tokenizer, PROMPTS, golds, batch_size=2)  # batches mix lengths: padding
    for row, (prompt, gold) in enumerate(zip(PROMPTS, golds)):
        prob, rank, pred = reference(model, tokenizer, prompt, gold)
        assert scores.loc[row, "gold_prob"] == pytest.approx(prob, rel=1e-4)
        assert scores.loc[row, "gold_rank"] == rank
        assert scores.loc[row, "pred_id"] == pred


def test_probe_table_follows_the_contract(tiny):
    model, tokenizer = tiny
    preds = [reference(model, tokenizer, p, 0)[2] for p in PROMPTS]
    objects = [tokenizer.convert_ids_to_tokens(preds[0]), "Paris", "Atlantis", "Berlin", "Italy"]
    table = probe_relation(model, tokenizer, prompt_rows(objects), heldout_templates=[1])
    assert list(table.columns) == PROBE.columns
    assert table["gold_id"].dtype == np.int32 and table["heldout"].dtype == bool
    assert table["heldout"].tolist() == [t == 1 for t in prompt_rows(objects)["template_id"]]
    assert table["pred_token"].tolist() == tokenizer.convert_ids_to_tokens(preds)
    # "Atlantis" is several wordpieces: skipped, counted, never scored
    skipped = table.iloc[2]
    assert skipped["skipped"] and skipped["gold_id"] == -1 and np.isnan(skipped["gold_prob"])
    assert skipped["gold_rank"] == -1 and not skipped["correct"]
    assert table["skipped"].tolist() == [False, False, True, False, False]
    # row 0's object is the model's own top-1, so it is correct with rank 1
    assert table.loc[0, "correct"] and table.loc[0, "gold_rank"] == 1
    expected_correct = [p == tokenizer.convert_tokens_to_ids(o) for p, o in zip(preds, objects)]
    expected_correct[2] = False
    assert table["correct"].tolist() == expected_correct


def test_accuracy_summary_against_hand_counts():
    prompts = pd.DataFrame(
        {
            "relation": ["P1"] * 8 + ["P2"] * 2,
            "fact_id": [0, 0, 1, 1, 2, 2, 3, 3, 0, 0],
            "template_id": [0, 1] * 5,
            "object": ["A", "A", "A", "A", "B", "B", "C", "C", "X", "X"],
        }
    )
    probe = prompts[["relation", "fact_id", "template_id"]].copy()
    probe["heldout"] = [False, True] * 4 + [False, False]
    probe["skipped"] = [False] * 6 + [True, True] + [False, False]
    probe["correct"] = [True, False, True, True, False, False, False, False, True, False]
    probe["gold_prob"] = [0.9, 0.1, 0.8, 0.6, 0.2, 0.3, np.nan, np.nan, 0.7, 0.5]
    summary = accuracy_summary(probe, prompts).set_index("relation")
    p1 = summary.loc["P1"]
    assert (p1["facts"], p1["skipped_facts"], p1["train_prompts"], p1["heldout_prompts"]) == (4, 1, 3, 3)
    assert p1["train_accuracy"] == pytest.approx(2 / 3) and p1["heldout_accuracy"] == pytest.approx(1 / 3)
    assert p1["train_gold_prob"] == pytest.approx((0.9 + 0.8 + 0.2) / 3)
    assert p1["majority_baseline"] == pytest.approx(2 / 3)  # A, A, B among the scored facts
    p2 = summary.loc["P2"]
    assert p2["train_accuracy"] == 0.5 and np.isnan(p2["heldout_accuracy"]) and p2["majority_baseline"] == 1.0


def test_relation_use_with_two_relations(tiny):
    model, tokenizer = tiny
    templates = {"P1": ["[X] is the capital of [Y] .", "[X] is in [Y] ."], "P2": ["[X] was born in [Y] .", "[X] works in [Y] ."]}
    heldout = {"P2": [1]}
    train_templates = train_template_ids(templates, heldout)
    assert train_templates == {"P1": [0, 1], "P2": [0]}
    facts = pd.DataFrame(
        {"relation": ["P1", "P1", "P2"], "fact_id": [0, 1, 0], "subject": ["Paris", "Rome", "Einstein"],
         "object": ["France", "Italy", "Germany"]}
    )
    objects = {"P1": {"France", "Italy"}, "P2": {"Germany", "France"}}
    use = relation_use(model, tokenizer, facts, templates, train_templates, objects, seed=0).set_index("relation")
    vocab = tokenizer.get_vocab()
    # with two relations the other one is forced: P1 subjects go through P2's training template, and back
    cases = {
        "P1": [("Paris was born in [MASK] .", "France"), ("Rome was born in [MASK] .", "Italy")],
        "P2": [("Einstein is the capital of [MASK] .", "Germany"), ("Einstein is in [MASK] .", "Germany")],
    }
    for rel, rows in cases.items():
        other = "P2" if rel == "P1" else "P1"
        preds = [reference(model, tokenizer, p, 0)[2] for p, _ in rows]
        eligible = [(pred, obj) for pred, (_, obj) in zip(preds, rows) if obj not in objects[other]]
        own = np.mean([pred == vocab[obj] for pred, obj in eligible]) if eligible else np.nan
        other_type = np.mean([pred in {vocab[o] for o in objects[other]} for pred in preds])
        assert use.loc[rel, "xrel_prompts"] == len(rows)
        assert use.loc[rel, "xrel_other_type"] == pytest.approx(other_type)
        if np.isnan(own):
            assert np.isnan(use.loc[rel, "xrel_own_object"])
        else:
            assert use.loc[rel, "xrel_own_object"] == pytest.approx(own)
    # "France" is a valid P2 answer, so Paris's P2 prompt is not counted as a subject-only answer
    assert "France" in objects["P2"]


def test_mismatched_lengths_are_rejected(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="2 prompts but 1 gold ids"):
        score_prompts(model, tokenizer, PROMPTS[:2], [0])


def test_overall_row_sums_counts_and_averages_rates():
    table = pd.DataFrame({"relation": ["P1", "P2", "P3"], "facts": [4, 6, 5], "train_prompts": [10, 30, 20],
                          "train_accuracy": [1.0, 0.5, 0.6], "heldout_accuracy": [0.4, np.nan, 0.2]})
    row = overall_row(table)
    assert row["facts"] == 15 and row["train_prompts"] == 60
    assert row["train_accuracy"] == pytest.approx((1.0 + 0.5 + 0.6) / 3)
    assert row["heldout_accuracy"] == pytest.approx(0.3)  # relations without held-out templates do not count
    assert "relation" not in row
