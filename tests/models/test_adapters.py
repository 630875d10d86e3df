"""Every architecture adapter keeps the contract the pipeline relies on (kn.models.adapters).

One parametrized test per clause, run for every supported architecture: adding an
architecture means adding its adapter and its tiny model to ``tests/tiny_models.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kn.hooks import attention_output_hooks, capture_activations, edited_value_slots, ffn_hooks
from kn.models.adapters import adapter_for, supported_architectures
from kn.models.blocks import attention_bias

from ..tiny_models import MASKED_KINDS, tiny


@pytest.fixture(params=MASKED_KINDS)
def model(request) -> nn.Module:
    return tiny(request.param, layers=2)


def batch(model: nn.Module, length: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, model.config.vocab_size, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # the second row is padded
    return {"input_ids": ids, "attention_mask": mask}


def test_every_tiny_model_has_an_adapter() -> None:
    assert {tiny(kind).config.model_type for kind in MASKED_KINDS} <= set(supported_architectures())


def test_value_projection_input_is_the_post_activation_ffn_vector(model: nn.Module) -> None:
    """The hooked vector is act(W1 h + b1) of each block, recomputed here from the block's own FFN input."""
    adapter = adapter_for(model)
    ffn_inputs: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(adapter.blocks()):
        first = block.intermediate.dense if hasattr(block, "intermediate") else block.ffn.lin1
        handles.append(first.register_forward_hook(lambda m, i, o, layer=layer: ffn_inputs.__setitem__(layer, o)))
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
        act = block.intermediate.intermediate_act_fn if hasattr(block, "intermediate") else block.ffn.activation
        expected = act(ffn_inputs[layer])[torch.arange(2), positions]
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
    other["input_ids"][0, 5] = (other["input_ids"][0, 5] + 1) % model.config.vocab_size
    with torch.no_grad(), attention_output_hooks(model, zero):
        a, b = model(**inputs).logits, model(**other).logits
    torch.testing.assert_close(a[0, :5], b[0, :5])  # the change at position 5 reaches no other position
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[0, :5], model(**other).logits[0, :5])
    assert not adapter.attention_output(0)._forward_hooks  # the hooks removed themselves


def test_lm_head_applied_to_the_last_hidden_state_gives_the_models_logits(model: nn.Module) -> None:
    adapter = adapter_for(model)
    inputs = batch(model)
    with torch.no_grad():
        (hidden,) = adapter.hidden_states(inputs["input_ids"], inputs["attention_mask"])
        torch.testing.assert_close(adapter.lm_head()(hidden), model(**inputs).logits)


def test_functional_blocks_reproduce_the_hf_blocks(model: nn.Module) -> None:
    adapter = adapter_for(model)
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


def test_position_limit_accounts_for_roberta_offsets() -> None:
    assert adapter_for(tiny("roberta")).position_limit() == 130 - 2  # positions start after padding_idx = 1
    assert adapter_for(tiny("bert")).position_limit() == 128


def test_unknown_architecture_is_rejected_by_name() -> None:
    model = nn.Module()
    model.config = SimpleNamespace(model_type="t5")
    with pytest.raises(ValueError, match="'t5' has no adapter; supported: .*bert"):
        adapter_for(model)
