"""kn.distant: masking rules, draw order, tokenisation counts, activations, aggregation."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kn.distant import (
    TYPES,
    encode_sentences,
    fact_means,
    mask_fact_sentences,
    mask_random_word,
    mask_tail,
    overall_means,
    position_limit,
    read_activations,
    relation_means,
    trigger_ranking,
    usability_table,
    usable_sentences,
)

# ----------------------------------------------------------------------------- T1 masking


@pytest.mark.parametrize(
    ("sentence", "head", "tail", "expected"),
    [
        ("Alan Turing worked in Paris.", "Alan Turing", "Paris", "Alan Turing worked in [MASK]."),
        # only the first acceptable occurrence is masked
        ("Paris, then Paris again", "X", "Paris", "[MASK], then Paris again"),
        # an occurrence touching an ASCII letter is skipped ...
        ("Parisian food from Paris", "X", "Paris", "Parisian food from [MASK]"),
        ("the aParis and Paris", "X", "Paris", "the aParis and [MASK]"),
        # ... but digits, punctuation and non-ASCII letters do not block it
        ("Paris2024 in Paris", "X", "Paris", "[MASK]2024 in Paris"),
        ("éParis is odd", "X", "Paris", "é[MASK] is odd"),
        # the head is protected: the tail inside the head is never masked, and the head is restored
        ("Paris Hilton visited Paris", "Paris Hilton", "Paris", "Paris Hilton visited [MASK]"),
        ("Paris Hilton, Paris Hilton and Paris.", "Paris Hilton", "Paris", "Paris Hilton, Paris Hilton and [MASK]."),
        # regex characters in the tail are literal
        ("St. Louis and St  Louis", "X", "St. Louis", "[MASK] and St  Louis"),
        ("Born in Mexico (city) today", "X", "Mexico (city)", "Born in [MASK] today"),
    ],
)
def test_mask_tail(sentence: str, head: str, tail: str, expected: str) -> None:
    assert mask_tail(sentence, head, tail) == expected


@pytest.mark.parametrize(
    ("sentence", "head", "tail"),
    [
        ("Parisian weather", "X", "Paris"),  # only inside a longer word
        ("paris is lower case", "X", "Paris"),  # case-sensitive
        ("Paris Hilton only", "Paris Hilton", "Paris"),  # only inside the head
        ("St  Louis", "X", "St. Louis"),  # '.' is not a wildcard
    ],
)
def test_mask_tail_not_found(sentence: str, head: str, tail: str) -> None:
    assert mask_tail(sentence, head, tail) is None


# ----------------------------------------------------------------------------- T2 / T3 masking


class ScriptedRandom(random.Random):
    """randint returns scripted values and records its arguments."""

    def __init__(self, values: list[int]) -> None:
        super().__init__(0)
        self.values, self.calls = list(values), []

    def randint(self, a: int, b: int) -> int:  # type: ignore[override]
        self.calls.append((a, b))
        return self.values.pop(0)


def test_mask_random_word_masks_the_drawn_word_with_its_punctuation() -> None:
    rng = ScriptedRandom([3])
    masked, word = mask_random_word("one two three, four five", rng, max_mask_word=50)
    assert masked == "one two [MASK] four five"
    assert word == "three,"
    assert rng.calls == [(1, 5)]


def test_mask_random_word_draws_among_the_first_max_mask_word_words() -> None:
    rng = ScriptedRandom([2])
    mask_random_word(" ".join(["w"] * 80), rng, max_mask_word=50)
    assert rng.calls == [(1, 50)]


def test_head_is_redrawn_then_accepted_after_the_last_redraw() -> None:
    sentence = "Alan Turing studied logic"  # words after the placeholder: [@@@@@@@@@@@, studied, logic]
    # first draw hits the head, the redraw hits "logic"
    rng = ScriptedRandom([1, 3])
    masked, word = mask_random_word(sentence, rng, 50, head="Alan Turing", head_redraws=4)
    assert (masked, word, len(rng.calls)) == ("Alan Turing studied [MASK]", "logic", 2)
    # every draw hits the head: 1 draw + 4 redraws, the last one kept
    rng = ScriptedRandom([1] * 5)
    masked, word = mask_random_word(sentence, rng, 50, head="Alan Turing", head_redraws=4)
    assert (masked, word, len(rng.calls)) == ("[MASK] studied logic", "Alan Turing", 5)
    # a word that merely contains the head (attached punctuation) is not the placeholder: no redraw
    rng = ScriptedRandom([1])
    masked, _ = mask_random_word("Alan Turing, studied", rng, 50, head="Alan Turing", head_redraws=4)
    assert masked == "[MASK] studied" and len(rng.calls) == 1


def _authors_mask_h(bag_h: list[str], h: str, rng: random.Random) -> list[str]:
    """SPEC §6 T2 step by step, written independently of kn.distant (regex substitution, while loop)."""
    out = []
    for sent in bag_h:
        sent = re.sub(re.escape(h), "@" * len(h), sent)
        words = sent.split(" ")
        pos = rng.randint(1, min(len(words), 50)) - 1
        repeat = 0
        while words[pos] == "@" * len(h):
            pos = rng.randint(1, min(len(words), 50)) - 1
            repeat += 1
            if repeat > 3:
                break
        words[pos] = "[MASK]"
        out.append(re.sub("@" * len(h), h, " ".join(words)))
    return out


def _authors_mask_rd(bag: list[str], rng: random.Random) -> list[str]:
    out = []
    for sent in bag:
        words = sent.split(" ")
        words[rng.randint(1, min(len(words), 50)) - 1] = "[MASK]"
        out.append(" ".join(words))
    return out


def test_fact_sentences_follow_the_authors_draw_order() -> None:
    head, tail = "Ada", "London"
    th = ["Ada lived in London .", "In London , Ada wrote ."]
    h = ["Ada Ada Ada", "Ada wrote notes on the engine", "Ada"]  # heads everywhere force redraws
    pool = [f"pool sentence number {k} with some words" for k in range(500)]
    masked = mask_fact_sentences(head, tail, th, h, pool, random.Random(7), 50, 4)

    reference = random.Random(7)
    expected_t2 = _authors_mask_h(h, head, reference)
    expected_t3 = _authors_mask_rd(reference.sample(pool, len(th)), reference)
    by_type = {kind: [m for m in masked if m.type == kind] for kind in TYPES}
    assert [m.text for m in by_type["T1"]] == ["Ada lived in [MASK] .", "In [MASK] , Ada wrote ."]
    assert [m.text for m in by_type["T2"]] == expected_t2
    assert [m.text for m in by_type["T3"]] == expected_t3
    assert [m.sentence_idx for m in by_type["T3"]] == [0, 1]
    assert [pool[m.source_idx] for m in by_type["T3"]] == [t.replace("[MASK]", m.masked_word) for t, m in zip(expected_t3, by_type["T3"])]


# ----------------------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def tiny_model(tiny_bert_dir: Path):
    from kn.models import load_masked_lm

    return load_masked_lm(tiny_bert_dir)


def test_encode_counts_unknown_pieces_truncation_and_lost_masks(tiny_model) -> None:
    _model, tokenizer = tiny_model
    texts = [
        "Paris is the capital of [MASK] .",
        "Paris is the capital of France , [MASK] .",
        "Paris ☃ ☃ [MASK]",  # ☃ is not in the vocabulary (nor are its characters)
    ]
    encoded = encode_sentences(tokenizer, texts, max_len=9)
    pieces = [tokenizer.tokenize(t) for t in texts]
    assert encoded.n_pieces == [len(p) for p in pieces]
    assert encoded.n_unk == [p.count(tokenizer.unk_token) for p in pieces]
    assert encoded.n_unk[2] == 2
    assert encoded.truncated == [len(p) + 2 > 9 for p in pieces]
    for ids, p, pos in zip(encoded.input_ids, pieces, encoded.mask_positions):
        kept = p[:7]
        assert tokenizer.convert_ids_to_tokens(ids) == [tokenizer.cls_token, *kept, tokenizer.sep_token]
        assert pos == (kept.index(tokenizer.mask_token) + 1 if tokenizer.mask_token in kept else -1)
    assert encoded.readable == [True, False, True]


def test_position_limit_respects_the_model_window(tiny_model) -> None:
    model, tokenizer = tiny_model
    assert position_limit(model, tokenizer, 512) == model.config.max_position_embeddings
    assert position_limit(model, tokenizer, 16) == 16


# ----------------------------------------------------------------------------- activations


def _manual_ffn_activations(model, ids: list[int], position: int) -> list[np.ndarray]:
    """Per layer, the post-GELU FFN vector at ``position``, recomputed from the weights and the
    hidden states the model reports (no hooks): self-attention, add & norm, intermediate, GELU."""
    import torch

    with torch.no_grad():
        hidden_states = model.bert(torch.tensor([ids]), output_hidden_states=True).hidden_states
        out = []
        for layer, x in zip(model.bert.encoder.layer, hidden_states):
            att = layer.attention
            n_heads = model.config.num_attention_heads
            d = x.shape[-1] // n_heads

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.view(1, -1, n_heads, d).transpose(1, 2)

            q, k, v = heads(att.self.query(x)), heads(att.self.key(x)), heads(att.self.value(x))
            context = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
            context = context.transpose(1, 2).reshape(1, -1, n_heads * d)
            attended = att.output.LayerNorm(att.output.dense(context) + x)
            pre = attended[0, position] @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias
            out.append(torch.nn.functional.gelu(pre).numpy())
    return out


def test_read_activations_match_a_hook_free_computation(tiny_model) -> None:
    model, tokenizer = tiny_model
    texts = [
        "Paris is the capital of [MASK] .",
        "[MASK] is located in Germany , a country",
        "Alan Turing was born in [MASK]",
        "the [MASK]",
    ]
    encoded = encode_sentences(tokenizer, texts, max_len=64)
    neurons = [[(1, 5), (0, 7)], [(0, 0)], [], [(1, 63), (1, 5), (0, 2)]]
    values = read_activations(model, encoded, neurons, batch_size=3)  # padded batches of mixed length
    for ids, pos, wanted, got in zip(encoded.input_ids, encoded.mask_positions, neurons, values):
        manual = _manual_ffn_activations(model, ids, pos)
        expected = np.array([manual[layer][unit] for layer, unit in wanted], dtype=np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert got.dtype == np.float32


def test_read_activations_skips_unreadable_sentences(tiny_model) -> None:
    model, tokenizer = tiny_model
    encoded = encode_sentences(tokenizer, ["Paris Paris Paris Paris [MASK]"], max_len=4)
    assert read_activations(model, encoded, [[(0, 1)]], batch_size=2)[0].size == 0


# ----------------------------------------------------------------------------- aggregation


def _activation_rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    # P1: fact 0 has 2 ig KNs and 1 base KN; fact 1 has 1 ig KN; P2: fact 0 has 3 ig KNs
    for relation, fact_id, method, n_kn in [("P1", 0, "ig", 2), ("P1", 0, "base", 1), ("P1", 1, "ig", 1), ("P2", 0, "ig", 3)]:
        for order in range(n_kn):
            for kind, n_sent in zip(TYPES, (2, 3, 2)):
                for idx in range(n_sent):
                    rows.append((relation, method, fact_id, 1, 10 * fact_id + order, order, kind, idx, float(rng.normal())))
    return pd.DataFrame(rows, columns=["relation", "method", "fact_id", "layer", "neuron", "order", "type", "sentence_idx", "activation"])


def _sentence_rows(activations: pd.DataFrame) -> pd.DataFrame:
    keys = activations[["relation", "fact_id", "type", "sentence_idx"]].drop_duplicates().reset_index(drop=True)
    return keys.assign(text="x [MASK]", readable=True, n_pieces=10, n_unk=0, truncated=False)


def test_means_pool_fact_neuron_values_then_average_relations() -> None:
    activations = _activation_rows()
    per_fact = fact_means(activations, _sentence_rows(activations))
    # the mean over a fact's sentences of one type, per neuron, computed with plain loops
    for row in per_fact.itertuples(index=False):
        for kind in TYPES:
            values = [
                a.activation for a in activations.itertuples(index=False)
                if (a.relation, a.method, a.fact_id, a.order, a.type) == (row.relation, row.method, row.fact_id, row.order, kind)
            ]  # fmt: skip
            assert getattr(row, kind) == pytest.approx(sum(values) / len(values))
    per_relation = relation_means(per_fact)
    p1_ig = per_fact[(per_fact["relation"] == "P1") & (per_fact["method"] == "ig")]
    got = per_relation.set_index(["relation", "method"]).loc[("P1", "ig")]
    assert got["n_values"] == 3 and got["n_facts"] == 2  # fact 0 weighs twice: it has two KNs
    assert got["T1"] == pytest.approx(p1_ig["T1"].sum() / 3)
    overall = overall_means(per_fact).set_index("method")
    p2_t2 = per_relation.set_index(["relation", "method"]).loc[("P2", "ig"), "T2"]
    assert overall.loc["ig", "T2"] == pytest.approx((got["T2"] + p2_t2) / 2)  # unweighted over relations
    assert overall.loc["base", "n_relations"] == 1
    assert overall.loc["ig", "n_facts"] == per_relation.loc[per_relation["method"] == "ig", "n_facts"].sum()
    assert overall[["T1_ci_low", "T3_ci_high"]].isna().all().all()  # no resamples, no intervals


def test_overall_intervals_resample_facts_within_each_relation() -> None:
    """The vectorised intervals equal a plain loop that redraws each relation's facts with the same
    generator, pools the drawn facts' (fact, neuron) values and averages the relations; the paired
    contrasts (T1 - T2, T1 - T3) come from the same draws."""
    activations = _activation_rows()
    per_fact = fact_means(activations, _sentence_rows(activations))
    resamples, seed = 200, 7
    overall = overall_means(per_fact, resamples, seed).set_index("method")
    rng = np.random.default_rng(seed)
    draws = {}
    for relation, rel in per_fact.groupby("relation", sort=True):
        facts = np.sort(rel["fact_id"].unique())
        draws[relation] = (facts, rng.integers(0, len(facts), size=(resamples, len(facts))))
    for method in ("ig", "base"):
        means = {kind: [] for kind in TYPES}  # per resample: the mean over relations
        for b in range(resamples):
            relation_values = {kind: [] for kind in TYPES}
            for relation, (facts, idx) in draws.items():
                rows = per_fact[(per_fact["relation"] == relation) & (per_fact["method"] == method)]
                if rows.empty:
                    continue
                for kind in TYPES:
                    pooled = [v for f in facts[idx[b]] for v in rows.loc[rows["fact_id"] == f, kind]]
                    relation_values[kind].append(np.mean(pooled) if pooled else np.nan)
            for kind in TYPES:
                means[kind].append(np.array(relation_values[kind]))
        measures = {kind: np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in means[kind]])
                    for kind in TYPES}
        for first, second in (("T1", "T2"), ("T1", "T3")):
            measures[f"{first}_minus_{second}"] = np.array(
                [np.nanmean(a - c) if np.isfinite(a - c).any() else np.nan for a, c in zip(means[first], means[second])])
        for name, values in measures.items():
            low, high = np.percentile(values[np.isfinite(values)], [2.5, 97.5])
            assert overall.loc[method, f"{name}_ci_low"] == pytest.approx(low)
            assert overall.loc[method, f"{name}_ci_high"] == pytest.approx(high)
            assert low <= overall.loc[method, name] <= high
    by_relation = relation_means(per_fact).set_index(["relation", "method"])
    difference = [by_relation.loc[(rel, "ig"), "T1"] - by_relation.loc[(rel, "ig"), "T3"] for rel in ("P1", "P2")]
    assert overall.loc["ig", "T1_minus_T3"] == pytest.approx(np.mean(difference))


def test_fact_means_drop_facts_missing_a_type() -> None:
    activations = _activation_rows()
    sentences = _sentence_rows(activations)
    counted = sentences[~((sentences["relation"] == "P1") & (sentences["fact_id"] == 1) & (sentences["type"] == "T3"))]
    per_fact = fact_means(activations, counted)
    assert not ((per_fact["relation"] == "P1") & (per_fact["fact_id"] == 1)).any()
    assert ((per_fact["relation"] == "P1") & (per_fact["fact_id"] == 0)).sum() == 3


def test_usable_sentences_and_usability_counts() -> None:
    facts = pd.DataFrame(
        {
            "relation": ["P1", "P1", "P2"], "fact_id": [0, 1, 0], "tail_single_token": [True, False, True],
            "status_ig": ["ok", "ok", "no_exmp"], "n_kn_ig": [2, 1, 0], "n_kn_base": [1, 0, 0],
        }
    )  # fmt: skip
    sentences = pd.DataFrame(
        [
            # relation, fact, type, idx, text, readable, n_pieces, n_unk, truncated
            ("P1", 0, "T1", 0, "a [MASK]", True, 10, 0, False),  # usable
            ("P1", 0, "T1", 1, None, False, 0, 0, False),  # tail not found
            ("P1", 0, "T2", 0, "b [MASK]", False, 600, 3, True),  # [MASK] cut off
            ("P1", 0, "T3", 0, "c [MASK]", True, 10, 6, False),  # mostly unknown pieces
            ("P1", 1, "T1", 0, "d [MASK]", True, 10, 0, False),  # multi-piece tail
            ("P1", 1, "T2", 0, "e [MASK]", True, 10, 5, True),  # exactly max share: usable
        ],
        columns=["relation", "fact_id", "type", "sentence_idx", "text", "readable", "n_pieces", "n_unk", "truncated"],
    )
    assert usable_sentences(sentences, facts, 0.5).tolist() == [True, False, False, False, False, True]
    table = usability_table(facts, sentences, 0.5).set_index("relation")
    p1 = table.loc["P1"]
    assert (p1["facts"], p1["facts_kn_ig"], p1["facts_kn_base"], p1["tails_single_token"]) == (2, 2, 1, 1)
    assert (p1["T1_sentences"], p1["T1_tail_not_found"], p1["T1_usable"]) == (3, 1, 1)
    assert (p1["T2_mask_cut_off"], p1["T2_truncated"], p1["T2_usable"]) == (1, 2, 1)
    assert (p1["T3_mostly_unk"], p1["T3_usable"]) == (1, 0)
    assert p1["unk_piece_share"] == pytest.approx((3 + 6 + 5) / (10 + 600 + 10 + 10 + 10))
    assert p1["pieces_per_word"] == pytest.approx((10 + 600 + 10 + 10 + 10) / (2 * 5))  # texts of two words; tail not found left out
    assert table.loc["P2", "facts_no_exmp"] == 1 and table.loc["all", "facts"] == 3


def test_trigger_ranking_sums_kn_activations_of_t1_sentences() -> None:
    activations = _activation_rows()
    ranking = trigger_ranking(activations, "ig")
    assert set(ranking["relation"] + ranking["fact_id"].astype(str)) == {"P10", "P11", "P20"}
    p1f0 = ranking[(ranking["relation"] == "P1") & (ranking["fact_id"] == 0)]
    rows = activations[(activations["relation"] == "P1") & (activations["fact_id"] == 0) & (activations["method"] == "ig") & (activations["type"] == "T1")]
    expected = rows.groupby("sentence_idx")["activation"].sum().sort_values(ascending=False)
    assert p1f0["sentence_idx"].tolist() == expected.index.tolist()
    np.testing.assert_allclose(p1f0["score"], expected.to_numpy())
