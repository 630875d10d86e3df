"""Every architecture adapter keeps the contract the pipeline relies on (kn.models.adapters).

One parametrized test per clause, run for every supported architecture: adding an
architecture means adding its adapter and its tiny model to ``tests/tiny_models.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from torch import nn

from kn.hooks import attention_output_hooks, capture_activations, edited_value_slots, ffn_hooks
from kn.models.adapters import KeyValuePrefix, adapter_for, is_causal_type, supported_architectures
from kn.models.blocks import attention_bias

from ..tiny_models import CAUSAL_KINDS, KINDS, MASKED_KINDS, tiny


@pytest.fixture(params=KINDS)
def model(request) -> nn.Module:
    return tiny(request.param, layers=2)


def batch(model: nn.Module, length: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, model.config.vocab_size, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # the second row is padded
    return {"input_ids": ids, "attention_mask": mask}


def test_every_tiny_model_has_an_adapter_and_its_kind() -> None:
    assert {tiny(kind).config.model_type for kind in KINDS} <= set(supported_architectures())
    for kind in KINDS:
        model = tiny(kind, layers=1)
        assert adapter_for(model).causal is (kind in CAUSAL_KINDS) is is_causal_type(model.config.model_type)


def ffn_vector_parts(block: nn.Module) -> tuple[list[nn.Module], Callable[[list[torch.Tensor]], torch.Tensor]]:
    """The modules whose outputs make a block's FFN neuron vector, and how (computed here, not by the adapter)."""
    if hasattr(block, "intermediate"):  # BERT family
        return [block.intermediate.dense], lambda outs: block.intermediate.intermediate_act_fn(outs[0])
    if hasattr(block, "ffn"):  # DistilBERT
        return [block.ffn.lin1], lambda outs: block.ffn.activation(outs[0])
    mlp = block.mlp
    if hasattr(mlp, "c_fc"):  # GPT-2: the activation output of c_fc
        return [mlp.c_fc], lambda outs: mlp.act(outs[0])
    if hasattr(mlp, "dense_h_to_4h"):  # GPT-NeoX: the activation output before dense_4h_to_h
        return [mlp.dense_h_to_4h], lambda outs: mlp.act(outs[0])
    return [mlp.gate_proj, mlp.up_proj], lambda outs: mlp.act_fn(outs[0]) * outs[1]  # gated: act(gate) * up


def test_value_projection_input_is_the_post_activation_ffn_vector(model: nn.Module) -> None:
    """The hooked vector is act(W1 h + b1) (gated: act(W_gate h) * W_up h) of each block, recomputed here from
    the outputs of the block's own FFN input projections."""
    adapter = adapter_for(model)
    ffn_inputs: dict[int, list[torch.Tensor]] = {}
    handles = []
    for layer, block in enumerate(adapter.blocks()):
        parts, _ = ffn_vector_parts(block)
        ffn_inputs[layer] = [None] * len(parts)  # type: ignore[list-item]
        for k, part in enumerate(parts):
            handles.append(part.register_forward_hook(lambda m, i, o, layer=layer, k=k: ffn_inputs[layer].__setitem__(k, o)))
    inputs = batch(model)
    positions = torch.tensor([3, 1])
    try:
        with torch.no_grad(), capture_activations(model, positions) as captured:
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(captured) == list(range(adapter.n_layers))
    for layer, block in enumerate(adapter.blocks()):
        _, combine = ffn_vector_parts(block)
        expected = combine(ffn_inputs[layer])[torch.arange(2), positions]
        torch.testing.assert_close(captured[layer], expected)
        assert captured[layer].shape[-1] == adapter.ffn_size


def test_value_slot_i_is_what_unit_i_adds(model: nn.Module) -> None:
    adapter = adapter_for(model)
    for layer in range(adapter.n_layers):
        projection = adapter.value_projection(layer)
        unit = torch.zeros(adapter.ffn_size)
        unit[5] = 1.0
        with torch.no_grad():
            torch.testing.assert_close(projection(unit) - projection(torch.zeros_like(unit)), adapter.value_slots(layer)[5])
        assert adapter.value_slots(layer).shape == (adapter.ffn_size, adapter.hidden_size)


def test_value_slots_are_writable_views_and_edits_restore_exactly(model: nn.Module) -> None:
    adapter = adapter_for(model)
    before = [p.clone() for p in model.parameters()]
    inputs = batch(model)
    with torch.no_grad():
        plain = model(**inputs).logits
    with edited_value_slots(model, {(1, 4): torch.zeros(adapter.hidden_size)}):
        assert torch.count_nonzero(adapter.value_slots(1)[4]) == 0
        with torch.no_grad():
            assert not torch.equal(model(**inputs).logits, plain)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_zeroing_the_attention_output_removes_attention_only(model: nn.Module) -> None:
    """With every layer's attention output zeroed, each position's output depends on its own token only."""
    adapter = adapter_for(model)
    zero = {layer: (lambda out: torch.zeros_like(out)) for layer in range(adapter.n_layers)}
    inputs = batch(model)
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][0, 1] = (other["input_ids"][0, 1] + 1) % model.config.vocab_size
    others = [0, *range(2, inputs["input_ids"].shape[1])]  # every position but the changed one (before and after it)
    with torch.no_grad(), attention_output_hooks(model, zero):
        a, b = model(**inputs).logits, model(**other).logits
    torch.testing.assert_close(a[0, others], b[0, others])  # the change at position 1 reaches no other position
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[0, others], model(**other).logits[0, others])
    assert not adapter.attention_output(0)._forward_hooks  # the hooks removed themselves


def test_lm_head_applied_to_the_last_hidden_state_gives_the_models_logits(model: nn.Module) -> None:
    adapter = adapter_for(model)
    inputs = batch(model)
    with torch.no_grad():
        (hidden,) = adapter.hidden_states(inputs["input_ids"], inputs["attention_mask"])
        torch.testing.assert_close(adapter.lm_head()(hidden), model(**inputs).logits)


def test_functional_blocks_reproduce_the_hf_blocks(model: nn.Module) -> None:
    adapter = adapter_for(model)
    if adapter.causal:
        pytest.skip("causal adapters run the HF blocks themselves (test_decoder_blocks_resume_from_a_cached_prefix)")
    inputs = batch(model)
    with torch.no_grad():
        hidden = adapter.hidden_states(inputs["input_ids"], inputs["attention_mask"], all_layers=True)
        bias = attention_bias(inputs["attention_mask"])
        for layer, block in enumerate(adapter.functional_blocks()):
            out = block(hidden[layer], bias)
            real = inputs["attention_mask"].bool()
            torch.testing.assert_close(out[real], hidden[layer + 1][real])


def test_ffn_hooks_replace_the_vector_and_always_remove_themselves(model: nn.Module) -> None:
    adapter = adapter_for(model)
    inputs = batch(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ffn_hooks(model, {0: lambda act: torch.zeros_like(act)}):
            raise RuntimeError("boom")
    assert not adapter.value_projection(0)._forward_pre_hooks
    with torch.no_grad(), ffn_hooks(model, {layer: (lambda act: torch.zeros_like(act)) for layer in range(adapter.n_layers)}):
        zeroed = model(**inputs).logits
    with torch.no_grad(), edited_value_slots(model, {(layer, unit): torch.zeros(adapter.hidden_size)
                                                      for layer in range(adapter.n_layers) for unit in range(adapter.ffn_size)}):
        without_slots = model(**inputs).logits  # zero value slots: the FFN adds only its output bias
    torch.testing.assert_close(zeroed, without_slots)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_decoder_blocks_resume_from_a_cached_prefix(kind: str) -> None:
    """Blocks l..top run on the last rows alone, against the plain pass's keys and values of the rows
    before them, give the model's own final hidden states there (padding-free and padded batches)."""
    model = tiny(kind, layers=3)
    adapter = adapter_for(model)
    inputs = batch(model, length=8)
    lengths = inputs["attention_mask"].sum(1)  # 8 and 6: the second row is right-padded
    with torch.no_grad():
        hidden, keys, values = adapter.hidden_states_and_prefix(inputs["input_ids"], inputs["attention_mask"])
        final = hidden[-1]
        for suffix in (1, 2):
            prefix_len = int(lengths.max()) - suffix
            start = lengths - suffix  # each row's first recomputed position
            rows = torch.arange(2)
            offsets = torch.arange(suffix)
            index = start[:, None] + offsets[None, :]
            key_pos = torch.arange(prefix_len + suffix)
            visible = torch.where(key_pos[None, None, :] < prefix_len,
                                  key_pos[None, None, :] < start[:, None, None],
                                  (key_pos[None, None, :] - prefix_len) <= offsets[None, :, None])
            mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[:, None]
            for layer in range(adapter.n_layers):
                prefix = KeyValuePrefix({j: keys[j][:, :, :prefix_len] for j in range(layer, adapter.n_layers)},
                                        {j: values[j][:, :, :prefix_len] for j in range(layer, adapter.n_layers)})
                out = adapter.run_from(layer, hidden[layer][rows[:, None], index], mask, prefix, index)
                torch.testing.assert_close(out, final[rows[:, None], index], rtol=1e-5, atol=1e-5)


def test_position_limit_accounts_for_roberta_offsets() -> None:
    assert adapter_for(tiny("roberta")).position_limit() == 130 - 2  # positions start after padding_idx = 1
    assert adapter_for(tiny("bert")).position_limit() == 128
    assert adapter_for(tiny("gpt2")).position_limit() == 128  # GPT-2's n_positions


def test_unknown_architecture_is_rejected_by_name() -> None:
    model = nn.Module()
    model.config = SimpleNamespace(model_type="t5")
    with pytest.raises(ValueError, match="'t5' has no adapter; supported: .*bert"):
        adapter_for(model)
