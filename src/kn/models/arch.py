"""Where each architecture keeps its FFN neurons.

A knowledge neuron (l, i) is unit i of the post-activation FFN vector in layer l; its
value slot is column i of that layer's FFN output projection (SPEC §0). The map below
names, per ``config.model_type``, the module whose *output* is that activation vector
and the ``nn.Linear`` whose weight columns are the value slots.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FFNLayout:
    layers: str  # dotted path from the MLM model to the ModuleList of transformer blocks
    activation: str  # dotted path inside a block: module whose output is the post-GELU FFN vector
    value_proj: str  # dotted path inside a block: Linear(ffn -> hidden), weight [hidden, ffn]


ARCHITECTURES: dict[str, FFNLayout] = {
    "bert": FFNLayout("bert.encoder.layer", "intermediate", "output.dense"),
    "roberta": FFNLayout("roberta.encoder.layer", "intermediate", "output.dense"),
    "xlm-roberta": FFNLayout("roberta.encoder.layer", "intermediate", "output.dense"),
    "camembert": FFNLayout("roberta.encoder.layer", "intermediate", "output.dense"),
    "electra": FFNLayout("electra.encoder.layer", "intermediate", "output.dense"),
    "distilbert": FFNLayout("distilbert.transformer.layer", "ffn.activation", "ffn.lin2"),
}


def ffn_layout(model: nn.Module) -> FFNLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"architecture {model_type!r} has no FFN map; supported: {sorted(ARCHITECTURES)}. "
            "Add an entry to kn.models.arch.ARCHITECTURES naming its FFN activation and output projection."
        )
    return ARCHITECTURES[model_type]


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(ffn_layout(model).layers)  # type: ignore[return-value]


def num_ffn_layers(model: nn.Module) -> int:
    return len(_blocks(model))


def ffn_activation_modules(model: nn.Module) -> list[nn.Module]:
    """Per layer, the module whose forward output is the FFN activation vector."""
    layout = ffn_layout(model)
    return [block.get_submodule(layout.activation) for block in _blocks(model)]


def value_projections(model: nn.Module) -> list[nn.Linear]:
    """Per layer, the FFN output projection; ``weight[:, i]`` is neuron i's value slot."""
    layout = ffn_layout(model)
    projections = [block.get_submodule(layout.value_proj) for block in _blocks(model)]
    for layer, proj in enumerate(projections):
        if not isinstance(proj, nn.Linear):
            raise TypeError(f"layer {layer}: {layout.value_proj} is {type(proj).__name__}, expected nn.Linear")
    return projections  # type: ignore[return-value]
