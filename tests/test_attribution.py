"""The IG fast path against the naive authors'-style reference, completeness, the plain pass, sparsify."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kn.attribution as attribution
from kn.attribution import activation_scores, ig_attribution, quadrature, sparsify
from kn.hooks import capture_activations, scale_neurons
from kn.models.encoding import EncodedPrompts

from .naive_ig import naive_causal_ig, naive_ig
from .tiny_models import CAUSAL_KINDS, frozen, tiny

TOLERANCE = 1e-4  # max |fast - naive| / max |naive|, per prompt and layer (fp32)


def prompts(vocab: int, lengths=(7, 12, 5, 9), seed: int = 1) -> tuple[EncodedPrompts, torch.Tensor]:
    """Random prompts of different lengths, the mask at different places, random targets."""
    gen = torch.Generator().manual_seed(seed)
    ids, positions = [], []
    for n, length in enumerate(lengths):
        seq = torch.randint(5, vocab, (length,), generator=gen).tolist()
        position = 1 + n % (length - 2)
        seq[0], seq[-1], seq[position] = 2, 3, 4
        ids.append(seq)
        positions.append(position)
    return EncodedPrompts(ids, positions), torch.randint(5, vocab, (len(lengths),), generator=gen)


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((fast - reference).abs().amax(-1) / reference.abs().amax(-1)).max())


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny("bert")


@pytest.fixture(scope="module")
def roberta() -> nn.Module:
    return tiny("roberta")


@pytest.mark.parametrize("rule", ["left", "right", "midpoint"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_fast_path_equals_naive_reference(kind, rule, bert, roberta):
    model = {"bert": bert, "roberta": roberta}[kind]
    encoded, targets = prompts(model.config.vocab_size)
    reference = naive_ig(model, encoded, targets, m=6, alpha_rule=rule)
    # batch 4 < m: one prompt per chunk, steps split over two forward passes;
    # batch 64: all prompts in one chunk, padded to the longest
    for batch_size in (4, 64):
        fast = ig_attribution(model, encoded, targets, m=6, alpha_rule=rule, batch_size=batch_size, progress=False)
        assert fast.shape == reference.shape == (4, 3, 64) and fast.dtype == torch.float32
        assert relative_error(fast, reference) <= TOLERANCE


@pytest.mark.parametrize("kind", ["electra", "distilbert"])
def test_fast_path_other_architectures(kind):
    model = tiny(kind, layers=2)
    encoded, targets = prompts(model.config.vocab_size, lengths=(6, 10))
    reference = naive_ig(model, encoded, targets, m=4)
    fast = ig_attribution(model, encoded, targets, m=4, progress=False)
    assert relative_error(fast, reference) <= TOLERANCE


def test_fast_path_on_kn_tiny_shape():
    """6 layers, 256 hidden, 1024 FFN (kn-tiny's shape), small vocabulary, random init."""
    model = tiny("bert", layers=6, hidden=256, ffn=1024, vocab=300, heads=4, init=0.05)
    encoded, targets = prompts(300, lengths=(15, 11))
    reference = naive_ig(model, encoded, targets, m=3)
    fast = ig_attribution(model, encoded, targets, m=3, batch_size=64, progress=False)
    assert relative_error(fast, reference) <= TOLERANCE


def causal_prompts(vocab: int, lengths=(7, 12, 5, 9), seed: int = 1) -> tuple[EncodedPrompts, torch.Tensor]:
    """Random causal prompts of different lengths (read at their last token), random targets."""
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, vocab, (length,), generator=gen).tolist() for length in lengths]
    return EncodedPrompts(ids, [length - 1 for length in lengths]), torch.randint(3, vocab, (len(lengths),), generator=gen)


@pytest.mark.parametrize("rule", ["left", "midpoint", "gauss_legendre"])
@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_causal_fast_path_equals_naive_reference(kind, rule):
    """GPT-2 (learned positions, Conv1D), GPT-NeoX (partial rotary, parallel residual), Llama (RMSNorm, rotary,
    grouped-query attention, gated MLP), Mistral and Qwen2: the last-row fast path against full forward/backward
    passes of the unmodified model, one prompt at a time."""
    model = tiny(kind)
    encoded, targets = causal_prompts(model.config.vocab_size)
    reference = naive_causal_ig(model, encoded, targets, m=6, alpha_rule=rule)
    # batch 4 < m: one prompt per chunk, steps over two passes; batch 64: all prompts in one chunk, prefixes padded
    for batch_size in (4, 64):
        fast = ig_attribution(model, encoded, targets, m=6, alpha_rule=rule, batch_size=batch_size, progress=False)
        assert fast.shape == reference.shape == (4, 3, 64) and fast.dtype == torch.float32
        assert relative_error(fast, reference) <= TOLERANCE


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama"])
def test_causal_sequence_target_equals_naive_reference(kind):
    """The opt-in sequence target: P(all object tokens | prompt), teacher-forced; the recomputed rows are the
    last prompt token and the object's tokens after it (one to four of them here)."""
    model = tiny(kind)
    encoded, targets = causal_prompts(model.config.vocab_size)
    gen = torch.Generator().manual_seed(5)
    continuations = [[int(t)] + torch.randint(3, model.config.vocab_size, (k,), generator=gen).tolist()
                     for t, k in zip(targets.tolist(), (2, 0, 3, 1))]
    reference = naive_causal_ig(model, encoded, targets, m=5, continuations=continuations)
    for batch_size in (5, 64):
        fast = ig_attribution(model, encoded, targets, m=5, batch_size=batch_size, progress=False,
                              continuations=continuations)
        assert relative_error(fast, reference) <= TOLERANCE
    one_token = ig_attribution(model, encoded, targets, m=5, progress=False, continuations=[[t] for t in targets.tolist()])
    torch.testing.assert_close(one_token, ig_attribution(model, encoded, targets, m=5, progress=False))


def test_causal_fast_path_on_kn_tiny_gpt_shape():
    """6 layers, 256 wide, FFN 1024 (kn-tiny-gpt's shape), random init."""
    model = tiny("gpt2", layers=6, hidden=256, ffn=1024, vocab=300, heads=4, init=0.05)
    encoded, targets = causal_prompts(300, lengths=(15, 11))
    reference = naive_causal_ig(model, encoded, targets, m=3)
    fast = ig_attribution(model, encoded, targets, m=3, batch_size=64, progress=False)
    assert relative_error(fast, reference) <= TOLERANCE


def test_causal_completeness_error_shrinks_with_m():
    """Sum over a layer's IG scores -> P(alpha=1) - P(alpha=0) at the last prompt token, as m grows."""
    model = tiny("llama")
    encoded, targets = causal_prompts(model.config.vocab_size, lengths=(9,))
    layer, ffn = 1, model.config.intermediate_size
    ids, position = torch.tensor(encoded.input_ids), torch.tensor(encoded.mask_positions)

    def target_prob() -> float:
        with torch.no_grad():
            return float(torch.softmax(model(input_ids=ids).logits[0, position[0]], -1)[targets[0]])

    full = target_prob()
    with scale_neurons(model, [(layer, i) for i in range(ffn)], 0.0, position):
        gap = full - target_prob()
    assert abs(gap) > 1e-4
    errors = [abs(float(ig_attribution(model, encoded, targets, m=m, alpha_rule="midpoint", layers=[layer],
                                       progress=False).sum()) - gap) for m in (2, 8, 32)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05 * abs(gap), errors


def test_layer_subset_and_batching_do_not_change_scores(bert):
    encoded, targets = prompts(bert.config.vocab_size)
    full = ig_attribution(bert, encoded, targets, m=5, batch_size=64, progress=False)
    again = ig_attribution(bert, encoded, targets, m=5, batch_size=64, progress=False)
    assert torch.equal(full, again)  # deterministic
    subset = ig_attribution(bert, encoded, targets, m=5, batch_size=3, layers=[2, 0], progress=False)
    assert relative_error(subset, full[:, [2, 0]]) <= 1e-5


def test_completeness_error_shrinks_with_m(bert):
    """Sum over a layer's IG scores -> P(alpha=1) - P(alpha=0) as m grows (Riemann-sum error ~ 1/m)."""
    encoded, targets = prompts(bert.config.vocab_size, lengths=(9,))
    layer, ffn = 1, bert.config.intermediate_size
    ids = torch.tensor(encoded.input_ids)
    position = torch.tensor(encoded.mask_positions)

    def target_prob() -> float:
        with torch.no_grad():
            logits = bert(input_ids=ids).logits[0, position[0]]
        return float(torch.softmax(logits, -1)[targets[0]])

    full = target_prob()
    with scale_neurons(bert, [(layer, i) for i in range(ffn)], 0.0, position):
        zeroed = target_prob()
    gap = full - zeroed
    assert abs(gap) > 1e-3  # the check is meaningful only if the layer matters
    errors = {}
    for rule in ("left", "midpoint"):
        errors[rule] = [
            abs(float(ig_attribution(bert, encoded, targets, m=m, alpha_rule=rule, layers=[layer], progress=False).sum()) - gap)
            for m in (2, 8, 32, 128)
        ]
        assert errors[rule] == sorted(errors[rule], reverse=True), errors
        assert errors[rule][-1] < 0.05 * abs(gap), errors
    assert errors["midpoint"][-1] < errors["left"][-1]  # second-order rule converges faster


def test_plain_pass_matches_hf_forward(bert):
    encoded, targets = prompts(bert.config.vocab_size)
    plain = activation_scores(bert, encoded, targets, batch_size=3)
    for row, (ids, position) in enumerate(zip(encoded.input_ids, encoded.mask_positions)):
        where = torch.tensor([position])
        with torch.no_grad(), capture_activations(bert, where) as captured:
            logits = bert(input_ids=torch.tensor([ids])).logits[0, position]
        expected = torch.stack([captured[layer][0] for layer in range(3)])
        torch.testing.assert_close(plain.activations[row], expected, rtol=1e-5, atol=1e-6)
        probs = torch.softmax(logits, -1)
        torch.testing.assert_close(plain.target_prob[row], probs[targets[row]], rtol=1e-5, atol=1e-8)
        assert int(plain.pred_ids[row]) == int(probs.argmax())


def _hook_counts(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def test_model_left_untouched_when_attribution_raises(bert, monkeypatch):
    encoded, targets = prompts(bert.config.vocab_size)
    with torch.no_grad():
        before = bert(input_ids=torch.tensor([encoded.input_ids[0]])).logits
    hooks = _hook_counts(bert)

    # 1) an error inside the hooked plain forward pass (the capture hooks are registered)
    def explode(*_args):
        raise RuntimeError("boom in forward")

    handle = bert.cls.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom in forward"):
            ig_attribution(bert, encoded, targets, m=3, progress=False)
    finally:
        handle.remove()
    assert _hook_counts(bert) == hooks

    # 2) an error in the middle of the gradient passes
    calls = {"n": 0}
    original = attribution._target_prob_from_layer

    def fail_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in IG")
        return original(*args, **kwargs)

    monkeypatch.setattr(attribution, "_target_prob_from_layer", fail_on_third)
    with pytest.raises(RuntimeError, match="boom in IG"):
        ig_attribution(bert, encoded, targets, m=3, progress=False)
    assert _hook_counts(bert) == hooks
    assert not any(param.requires_grad for param in bert.parameters())
    with torch.no_grad():
        assert torch.equal(bert(input_ids=torch.tensor([encoded.input_ids[0]])).logits, before)


def test_bfloat16_runs_and_stays_close(bert):
    encoded, targets = prompts(bert.config.vocab_size)
    fp32 = ig_attribution(bert, encoded, targets, m=4, progress=False)
    bf16 = ig_attribution(bert, encoded, targets, m=4, dtype=torch.bfloat16, progress=False)
    assert bf16.dtype == torch.float32
    error = relative_error(bf16, fp32)
    assert 0 < error < 0.1  # bf16 has ~3 significant digits: different from fp32, but close


def test_bad_arguments_are_named(bert):
    encoded, targets = prompts(bert.config.vocab_size)
    with pytest.raises(ValueError, match="alpha_rule 'trapezoid'"):
        ig_attribution(bert, encoded, targets, alpha_rule="trapezoid")
    with pytest.raises(ValueError, match="target ids out of the vocabulary"):
        ig_attribution(bert, encoded, torch.tensor([1, 2, 3, 10_000]))
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        ig_attribution(bert, encoded, targets[:2])
    with pytest.raises(ValueError, match=r"layers \[7\] out of range"):
        activation_scores(bert, encoded, layers=[7])


def alpha_steps(m: int, rule: str) -> torch.Tensor:
    """The multipliers k + offset of a Riemann rule (alpha = multiplier / m)."""
    return quadrature(m, rule).multipliers


def test_alpha_steps():
    m = 4
    assert (alpha_steps(m, "left") / m).tolist() == [0.0, 0.25, 0.5, 0.75]
    assert (alpha_steps(m, "right") / m).tolist() == [0.25, 0.5, 0.75, 1.0]
    assert (alpha_steps(m, "midpoint") / m).tolist() == [0.125, 0.375, 0.625, 0.875]
    assert quadrature(m, "left").weights.tolist() == [1.0] * 4 and quadrature(m, "left").divisor == 4


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_gauss_legendre_integrates_polynomials_of_degree_2m_minus_1_exactly(m: int) -> None:
    rule = quadrature(m, "gauss_legendre")
    alphas, weights = rule.multipliers.double() / rule.divisor, rule.weights.double()
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6) and bool(((alphas > 0) & (alphas < 1)).all())
    for degree in range(2 * m):
        assert float((weights * alphas**degree).sum()) == pytest.approx(1 / (degree + 1), rel=1e-5)
    if m > 1:  # and not one degree more
        assert float((weights * alphas ** (2 * m)).sum()) != pytest.approx(1 / (2 * m + 1), rel=1e-5)


def test_gauss_legendre_fast_path_equals_the_naive_reference():
    model = tiny("bert")
    encoded, targets = prompts(model.config.vocab_size)
    fast = ig_attribution(model, encoded, targets, m=4, alpha_rule="gauss_legendre", batch_size=7, progress=False)
    reference = naive_ig(model, encoded, targets, m=4, alpha_rule="gauss_legendre")
    assert relative_error(fast, reference) < TOLERANCE


def test_sparsify_keeps_exactly_entries_at_or_above_ratio_of_max():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn((3, 2, 5), generator=gen)
    scores[1] = -scores[1].abs() - 0.1  # all negative: ratio * max > max, nothing survives
    scores[2, 1, 3] = 0.5 * scores[2].max()  # exactly at the threshold for ratio 0.5 ...
    scores[2, 0, 0] = 0.5 * scores[2].max()
    kept = sparsify(scores, 0.5)
    expected = [
        (p, layer, neuron, float(scores[p, layer, neuron]))
        for p in range(3)
        for layer in range(2)
        for neuron in range(5)
        if float(scores[p, layer, neuron]) >= 0.5 * float(scores[p].max())
    ]
    assert (2, 0, 0, float(scores[2, 0, 0])) in expected  # ... so ">=" keeps them
    got = list(zip(kept["prompt"], kept["layer"], kept["neuron"], kept["score"].astype(float)))
    assert got == expected  # same entries, ordered by (prompt, layer, neuron)
    assert not (kept["prompt"] == 1).any()
    assert [str(t) for t in kept.dtypes] == ["int64", "int16", "int32", "float32"]
    with pytest.raises(ValueError, match="ratio = 0"):
        sparsify(scores, 0)
