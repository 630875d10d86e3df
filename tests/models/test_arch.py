"""The FFN map points at the post-GELU activation and at the value projection, for BERT and RoBERTa."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kn.models.arch import ffn_activation_modules, ffn_layout, num_ffn_layers, value_projections
from kn.models.load import load_masked_lm


@pytest.fixture(params=["tiny_bert_dir", "tiny_roberta_dir"])
def tiny_model(request):
    return load_masked_lm(request.getfixturevalue(request.param))


def test_activation_output_is_the_value_projection_input(tiny_model):
    model, tokenizer = tiny_model
    activations, projection_inputs, dense_inputs = {}, {}, {}
    handles = []
    for layer, (act, proj) in enumerate(zip(ffn_activation_modules(model), value_projections(model))):
        handles.append(act.register_forward_hook(lambda m, i, o, layer=layer: activations.__setitem__(layer, o)))
        handles.append(act.register_forward_hook(lambda m, i, o, layer=layer: dense_inputs.__setitem__(layer, i[0])))
        handles.append(proj.register_forward_hook(lambda m, i, o, layer=layer: projection_inputs.__setitem__(layer, i[0])))
    batch = tokenizer(["Paris is the capital of France ."], return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    assert sorted(activations) == list(range(model.config.num_hidden_layers))
    for layer, act in activations.items():
        assert torch.equal(act, projection_inputs[layer])
        # post-GELU: recompute the intermediate vector from its input independently
        block = ffn_activation_modules(model)[layer]
        expected = F.gelu(F.linear(dense_inputs[layer], block.dense.weight, block.dense.bias))
        torch.testing.assert_close(act, expected)
        assert act.shape[-1] == model.config.intermediate_size


def test_value_projection_columns_are_value_slots(tiny_model):
    model, _ = tiny_model
    projections = value_projections(model)
    assert len(projections) == num_ffn_layers(model) == model.config.num_hidden_layers
    for proj in projections:
        assert tuple(proj.weight.shape) == (model.config.hidden_size, model.config.intermediate_size)
        # y = W a + b: unit i of the activation contributes exactly column i
        unit = torch.zeros(model.config.intermediate_size)
        unit[3] = 1.0
        with torch.no_grad():
            torch.testing.assert_close(proj(unit) - proj.bias, proj.weight[:, 3])


def test_unknown_architecture_is_rejected_by_name():
    model = nn.Module()
    model.config = SimpleNamespace(model_type="gpt2")
    with pytest.raises(ValueError, match="'gpt2' has no FFN map"):
        ffn_layout(model)
