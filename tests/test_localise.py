"""The localisation diagnostic: ablations against an independent plain-torch forward pass, subject
positions from offsets (masked and causal), hooks that always go away, the ratio-of-averages summary."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from kn.hooks import attention_output_hooks, ffn_hooks
from kn.localise import (
    ALL,
    Ablation,
    _filled_text,
    ablated_gold_probabilities,
    ablation_name,
    ceiling_lines,
    ceiling_table,
    localise_relation,
    standard_ablations,
    subject_positions,
    summarise_localisation,
)
from kn.models.adapters import adapter_for
from kn.models.encoding import PromptCodec
from kn.models.load import load_lm
from kn.probe import score_prompts

from .standins import write_gpt2_standin

TEMPLATES = [
    "[X] is the capital of [Y] .",
    "The capital of [Y] is [X] .",  # [Y] before [X]
    "[X] was born in [Y] .",
    "[Y] , a country whose capital is [X] .",
    "Who works in the field of [Y] ? [X] .",
]
SUBJECTS = ["Paris", "Rome", "Alan Turing", "Madrid", "Einstein"]
GOLD = ["France", "Italy", "England", "Spain", "physics"]


def prompt_of(template: str, subject: str) -> str:
    return template.replace("[X]", subject).replace("[Y]", "[MASK]")


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    """The tiny random BERT with its encoder's linear weights scaled x25: at BERT's init (std 0.02)
    every sublayer's output is tiny next to the residual stream and ablations move P(gold) by
    float noise only, which would let wrong positions or layers pass unnoticed."""
    model, tokenizer = load_lm(tiny_bert_dir)
    with torch.no_grad():
        for module in model.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(25.0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def prompts(bert):
    _, tokenizer = bert
    templates = [t for t in TEMPLATES for _ in range(2)]
    subjects = [s for s in SUBJECTS for _ in range(2)]
    subjects[1::2] = ["Berlin", "London", "Xylophonist Quarkbert", "Alan Turing", "Berlin"]  # a made-up, split name
    codec = PromptCodec(tokenizer, causal=False)
    encoded = codec.encode([prompt_of(t, s) for t, s in zip(templates, subjects)])
    positions = subject_positions(codec, encoded, templates, subjects)
    gold = [tokenizer.convert_tokens_to_ids(g) for g in GOLD for _ in range(2)]
    return encoded, positions, gold, templates, subjects


def reference_gold_prob(model, ids: list[int], mask_pos: int, gold: int, zero: dict[str, dict[int, list[int]]]) -> float:
    """P(gold) from BERT's parameters with plain torch ops, one unpadded prompt. ``zero[component][layer]``
    lists positions whose FFN activation ("ffn") or attention output projection ("attn") is zeroed."""
    bert = model.bert
    x = bert.embeddings(input_ids=torch.tensor([ids]))[0]
    heads = model.config.num_attention_heads
    for layer_idx, layer in enumerate(bert.encoder.layer):
        att = layer.attention
        q, k, v = (F.linear(x, m.weight, m.bias) for m in (att.self.query, att.self.key, att.self.value))
        t, h = x.shape
        split = lambda z: z.view(t, heads, h // heads).transpose(0, 1)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / (h // heads) ** 0.5
        context = (torch.softmax(scores, -1) @ split(v)).transpose(0, 1).reshape(t, h)
        attn_out = F.linear(context, att.output.dense.weight, att.output.dense.bias)
        attn_out[zero.get("attn", {}).get(layer_idx, [])] = 0.0
        r = att.output.LayerNorm(attn_out + x)
        act = F.gelu(F.linear(r, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
        act[zero.get("ffn", {}).get(layer_idx, [])] = 0.0
        x = layer.output.LayerNorm(F.linear(act, layer.output.dense.weight, layer.output.dense.bias) + r)
    logits = model.cls(x[mask_pos])
    return float(torch.softmax(logits, -1)[gold])


def test_filled_text_matches_the_pipeline_prompt_and_spans():
    for template in TEMPLATES:
        text, spans = _filled_text(template, "Alan Turing", "<mask>")
        assert text == template.replace("[X]", "Alan Turing").replace("[Y]", "<mask>")
        assert [text[a:b] for a, b in spans] == ["Alan Turing"]
    # [Y] before [X]: the blank's length (6 here, 3 for "[Y]") shifts the subject
    text, spans = _filled_text("[Y] of [X]", "Rome", "[MASK]")
    assert text == "[MASK] of Rome" and spans == [(10, 14)]
    text, spans = _filled_text("[Y] of [X]", "Rome", "<extra_long_mask>")
    assert spans == [(21, 25)] and text[21:25] == "Rome"
    with pytest.raises(ValueError, match=r"\[X\] and \[Y\]"):
        _filled_text("no slot [Y]", "Rome", "[MASK]")


def test_subject_positions_cover_exactly_the_subject(bert, prompts):
    _, tokenizer = bert
    encoded, positions, _, templates, subjects = prompts
    for k, (ids, subject) in enumerate(zip(encoded.input_ids, subjects)):
        pieces = tokenizer.convert_ids_to_tokens([ids[p] for p in positions[k]])
        assert tokenizer.convert_tokens_to_string(pieces).replace(" ", "") == subject.replace(" ", "")
        assert positions[k] == list(range(positions[k][0], positions[k][-1] + 1))  # contiguous
        assert encoded.mask_positions[k] not in positions[k]
        assert 0 not in positions[k] and len(ids) - 1 not in positions[k]  # [CLS], [SEP]
    # a subject after the mask ([Y] first) is found after it; a split name gets several pieces
    assert positions[2][0] > encoded.mask_positions[2]
    assert len(positions[5]) > 2


def test_subject_positions_with_a_bpe_tokenizer(tiny_roberta_dir):
    _, tokenizer = load_lm(tiny_roberta_dir)
    codec = PromptCodec(tokenizer, causal=False)
    encoded = codec.encode([prompt_of(t, s) for t, s in zip(TEMPLATES, SUBJECTS)])
    positions = subject_positions(codec, encoded, TEMPLATES, SUBJECTS)
    for k, subject in enumerate(SUBJECTS):
        assert tokenizer.decode([encoded.input_ids[k][p] for p in positions[k]]).strip() == subject
        assert encoded.mask_positions[k] not in positions[k]


def test_subject_positions_of_a_causal_lm_index_its_cut_prompt(tmp_path):
    """GPT-2: the prompt cut before [Y]; the subject's tokens come before the last (target) token."""
    _, tokenizer = load_lm(write_gpt2_standin(tmp_path / "gpt2", ["P36"]))
    codec = PromptCodec(tokenizer, causal=True)
    usable = [(t, s) for t, s in zip(TEMPLATES, SUBJECTS) if codec.uses_template(t)]
    assert len(usable) == 2  # the three templates with [Y] before [X] are not read by a causal LM
    encoded = codec.encode([prompt_of(t, s) for t, s in usable])
    positions = subject_positions(codec, encoded, [t for t, _ in usable], [s for _, s in usable])
    for k, (_, subject) in enumerate(usable):
        assert tokenizer.decode([encoded.input_ids[k][p] for p in positions[k]]).strip() == subject
        assert max(positions[k]) < encoded.mask_positions[k] == len(encoded.input_ids[k]) - 1


def test_ablations_match_a_plain_torch_forward(bert, prompts):
    model, _ = bert
    encoded, positions, gold, _, _ = prompts
    n_layers = model.config.num_hidden_layers
    ablations = standard_ablations(
        n_layers,
        per_layer=[("ffn", "mask"), ("attn", "mask"), ("ffn", "subject"), ("attn", "all")],
        all_layers=[("ffn", "mask"), ("ffn", "subject"), ("ffn", "all"), ("attn", "mask"), ("attn", "subject")],
    )
    probs = ablated_gold_probabilities(model, encoded, gold, positions, ablations, batch_size=4)
    for k in range(len(encoded)):
        ids, m = encoded.input_ids[k], encoded.mask_positions[k]
        where = {"mask": [m], "subject": positions[k], "all": list(range(len(ids)))}
        with torch.no_grad():
            assert probs["p0"][k] == pytest.approx(reference_gold_prob(model, ids, m, gold[k], {}), rel=1e-5, abs=1e-9)
            for ablation in ablations:
                zero = {ablation.component: {layer: where[ablation.positions] for layer in ablation.layers}}
                expected = reference_gold_prob(model, ids, m, gold[k], zero)
                assert probs[ablation.name][k] == pytest.approx(expected, rel=1e-5, abs=1e-9), (ablation.name, k)
    # the ablations do something, and different ones do different things
    for name in probs:
        if name not in ("p0", f"ffn_subject_layer_{n_layers - 1}"):  # the top layer's subject rows never reach [MASK]
            assert (np.abs(probs[name] - probs["p0"]) / probs["p0"]).max() > 1e-2, name
    assert not np.allclose(probs["ffn_mask_layer_0"], probs["ffn_subject_layer_0"], rtol=1e-2)


def test_ffn_at_all_positions_equals_zeroed_value_weights(bert, prompts):
    """Zeroing every FFN activation = zeroing every FFN down projection's weight (bias kept);
    zeroing every attention output = zeroing that projection's weight and bias."""
    model, tokenizer = bert
    encoded, positions, gold, templates, subjects = prompts
    n_layers = model.config.num_hidden_layers
    ablations = [Ablation("ffn", "all", tuple(range(n_layers)), "ffn_all_positions"),
                 Ablation("attn", "all", tuple(range(n_layers)), "attn_all_positions")]
    probs = ablated_gold_probabilities(model, encoded, gold, positions, ablations)
    texts = [prompt_of(t, s) for t, s in zip(templates, subjects)]
    for name, zero_bias, module in (("ffn_all_positions", False, "value_projection"),
                                    ("attn_all_positions", True, "attention_output")):
        edited = copy.deepcopy(model)
        adapter = adapter_for(edited)
        with torch.no_grad():
            for layer in range(n_layers):
                projection = getattr(adapter, module)(layer)
                projection.weight.zero_()
                if zero_bias:
                    projection.bias.zero_()
        by_weights = score_prompts(edited, tokenizer, texts, gold)["gold_prob"].to_numpy()
        np.testing.assert_allclose(probs[name], by_weights, rtol=1e-5)


def test_top_layer_position_logic(bert, prompts):
    """In the top layer only the [MASK] row reaches the head: [MASK]-only = all positions, and the
    subject's tokens have no effect at all; in a lower layer the subject's tokens do."""
    model, _ = bert
    encoded, positions, gold, _, _ = prompts
    top = model.config.num_hidden_layers - 1
    ablations = [Ablation(component, where, (layer,), f"{component}_{where}_{layer}")
                 for component in ("ffn", "attn") for where in ("mask", "subject", "all") for layer in (0, top)]
    probs = ablated_gold_probabilities(model, encoded, gold, positions, ablations)
    for component in ("ffn", "attn"):
        np.testing.assert_allclose(probs[f"{component}_mask_{top}"], probs[f"{component}_all_{top}"], rtol=1e-5)
        np.testing.assert_array_equal(probs[f"{component}_subject_{top}"], probs["p0"])
        assert (np.abs(probs[f"{component}_subject_0"] - probs["p0"]) / probs["p0"]).max() > 1e-2


def test_nothing_ablated_is_p0_and_p0_is_the_probe(bert, prompts):
    model, tokenizer = bert
    encoded, positions, gold, templates, subjects = prompts
    nothing = [Ablation("ffn", "all", (), "ffn_nothing"), Ablation("attn", "mask", (), "attn_nothing")]
    probs = ablated_gold_probabilities(model, encoded, gold, positions, nothing, batch_size=3)
    np.testing.assert_array_equal(probs["ffn_nothing"], probs["p0"])
    np.testing.assert_array_equal(probs["attn_nothing"], probs["p0"])
    texts = [prompt_of(t, s) for t, s in zip(templates, subjects)]
    np.testing.assert_allclose(probs["p0"], score_prompts(model, tokenizer, texts, gold)["gold_prob"], rtol=1e-5)
    # batching, padding and how many prompts' unedited passes are held at once do not change the numbers
    # beyond float noise (chunks of 3 prompts: the subject positions must follow each chunk's prompts)
    one = ablated_gold_probabilities(model, encoded, gold, positions, standard_ablations(2), batch_size=1)
    many = ablated_gold_probabilities(model, encoded, gold, positions, standard_ablations(2), batch_size=64)
    chunked = ablated_gold_probabilities(model, encoded, gold, positions, standard_ablations(2), batch_size=4,
                                         max_resumed_prompts=3)
    for name in one:
        np.testing.assert_allclose(one[name], many[name], rtol=1e-5)
        np.testing.assert_allclose(chunked[name], many[name], rtol=1e-5)
    assert not np.allclose(many["ffn_subject_all"], many["p0"])  # the subject ablation moved something to compare


def test_hooks_are_removed_and_the_model_is_unchanged(bert, prompts):
    model, _ = bert
    encoded, positions, gold, _, _ = prompts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ablated_gold_probabilities(model, encoded, gold, positions, standard_ablations(2))
    # the unedited pass asks for every hidden state, and transformers then installs its own (inert)
    # output-capturing hooks for good; every hook of ours is gone, and a second call adds none
    hooks = [(name, hook) for name, m in model.named_modules() for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert all(hook.__module__.startswith("transformers.") for _, hook in hooks), hooks
    ablated_gold_probabilities(model, encoded, gold, positions, standard_ablations(2))
    assert [(name, hook) for name, m in model.named_modules()
            for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())] == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"):
        with attention_output_hooks(model, {0: lambda out: out * 0}), ffn_hooks(model, {1: lambda act: None}):
            raise RuntimeError("boom")
    assert [(name, hook) for name, m in model.named_modules()
            for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())] == hooks
    with pytest.raises(IndexError, match="out of range"):
        ablated_gold_probabilities(model, encoded, gold, positions, [Ablation("ffn", "mask", (2,), "x")])


def test_standard_ablations_names():
    names = [a.name for a in standard_ablations(3, all_layers=[("ffn", "mask"), ("ffn", "subject"), ("ffn", "all"),
                                                                ("attn", "mask")])]
    assert names == [
        "ffn_mask_layer_0", "ffn_mask_layer_1", "ffn_mask_layer_2",
        "attn_mask_layer_0", "attn_mask_layer_1", "attn_mask_layer_2",
        "ffn_mask_all", "ffn_subject_all", "ffn_all_positions", "attn_mask_all",
    ]
    assert ablation_name("attn", "all", None) == "attn_all_positions"
    assert ablation_name("ffn", "subject", 4) == "ffn_subject_layer_4"
    with pytest.raises(ValueError, match="component"):
        Ablation("mlp", "mask", (0,), "x")


def test_summary_is_the_ratio_of_averages_with_paired_bootstrap_cis():
    rows = []
    # relation A: 2 facts, 2 prompts each; B: 3 facts, one prompt each
    for fact, (p0s, ps) in enumerate([([0.8, 0.6], [0.4, 0.3]), ([0.5, 0.5], [0.5, 0.25])]):
        rows += [("A", fact, p0, p, p) for p0, p in zip(p0s, ps)]
    for fact, (p0, p) in enumerate([(0.9, 0.9), (0.2, 0.0), (0.4, 0.2)]):
        rows.append(("B", fact, p0, p, p))
    table = pd.DataFrame(rows, columns=["relation", "fact_id", "p0", "x", "y"])
    summary = summarise_localisation(table, ["x", "y"], resamples=500, seed=3).set_index("relation")
    ratio_a = ((0.4 + 0.3 + 0.5 + 0.25) - (0.8 + 0.6 + 0.5 + 0.5)) / (0.8 + 0.6 + 0.5 + 0.5)
    ratio_b = (1.1 - 1.5) / 1.5
    assert summary.loc["A", "x"] == pytest.approx(ratio_a)
    assert summary.loc["B", "x"] == pytest.approx(ratio_b)
    assert summary.loc[ALL, "x"] == pytest.approx((ratio_a + ratio_b) / 2)
    assert summary.loc["A", "p0"] == pytest.approx(0.6) and summary.loc[ALL, "p0"] == pytest.approx((0.6 + 0.5) / 2)
    assert summary.loc[ALL, "n_facts"] == 5 and summary.loc[ALL, "n_prompts"] == 7
    for rel in ("A", "B", ALL):
        assert summary.loc[rel, "x_ci_low"] <= summary.loc[rel, "x"] <= summary.loc[rel, "x_ci_high"]
        assert summary.loc[rel, "x_ci_low"] < summary.loc[rel, "x_ci_high"]
    # identical columns get identical CIs (one resampling shared by all columns)
    pd.testing.assert_series_equal(summary["x_ci_low"], summary["y_ci_low"], check_names=False)
    pd.testing.assert_frame_equal(summary, summarise_localisation(table, ["x", "y"], resamples=500, seed=3).set_index("relation"))
    # a relation with one fact resamples to itself: its CI collapses onto its value
    single = pd.concat([table, pd.DataFrame([("C", 0, 0.5, 0.1, 0.1)] * 2, columns=table.columns)])
    with_c = summarise_localisation(single, ["x"], resamples=200, seed=3).set_index("relation")
    assert with_c.loc["C", "x"] == pytest.approx(-0.8)
    assert with_c.loc["C", "x_ci_low"] == pytest.approx(-0.8) and with_c.loc["C", "x_ci_high"] == pytest.approx(-0.8)
    bare = summarise_localisation(table, ["x"], resamples=0).set_index("relation")
    assert np.isnan(bare.loc[ALL, "x_ci_low"]) and bare.loc[ALL, "x"] == pytest.approx(summary.loc[ALL, "x"])
    with pytest.raises(ValueError, match="lacks columns"):
        summarise_localisation(table, ["z"])


def test_relation_rows_in_long_form_give_the_wide_summary(bert):
    """localise_relation on ingested-style rows (a multi-piece object left out), then ceiling_table."""
    model, tokenizer = bert
    rows = pd.DataFrame({
        "relation": "P1", "fact_id": [0, 0, 1, 1, 2], "template_id": [0, 1, 0, 1, 0],
        "template": [TEMPLATES[0], TEMPLATES[2], TEMPLATES[0], TEMPLATES[2], TEMPLATES[0]],
        "subject": ["Paris", "Paris", "Rome", "Rome", "Madrid"],
        "object": ["France", "France", "Italy", "Italy", "Xylophonist Quarkbert"],
    })
    rows["prompt"] = [prompt_of(t, s) for t, s in zip(rows["template"], rows["subject"])]
    long = localise_relation(model, PromptCodec(tokenizer, causal=False), rows, batch_size=2)
    names = [a.name for a in standard_ablations(model.config.num_hidden_layers)]
    assert list(dict.fromkeys(long["ablation"])) == names
    assert len(long) == 4 * len(names) and set(long["fact_id"]) == {0, 1}  # fact 2's object is not one token
    ceiling = ceiling_table(long, resamples=50, seed=0)
    overall = ceiling_lines(ceiling)
    first = long[long["ablation"] == "ffn_mask_all"]
    assert overall["ffn_mask_all"] == pytest.approx(float((first.p_ablated - first.p0).sum() / first.p0.sum()))
    assert set(names) <= set(overall) and overall["n_facts"] == 2



def test_a_relation_with_nothing_to_score_gives_an_empty_table(bert):
    model, tokenizer = bert
    rows = pd.DataFrame({"relation": "P1", "fact_id": [0], "template_id": [0], "template": [TEMPLATES[0]],
                         "subject": ["Paris"], "object": ["Xylophonist Quarkbert"]})
    rows["prompt"] = [prompt_of(TEMPLATES[0], "Paris")]
    long = localise_relation(model, PromptCodec(tokenizer, causal=False), rows)
    assert long.empty and list(long.columns) == ["relation", "fact_id", "template_id", "n_subject_tokens", "ablation",
                                                 "p0", "p_ablated"]
    with pytest.raises(ValueError, match="nothing to summarise"):
        ceiling_table(long, resamples=10, seed=0)
