"""One adapter per architecture: everything the pipeline needs to know about a model's layout.

A knowledge neuron (l, i) is unit i of the FFN "intermediate" vector of layer l: the input
of that layer's down (value) projection, whose weight holds the neuron's value slot (SPEC
§0). Every architecture keeps that vector in the same place, so the pipeline reaches it
in one way: a forward pre-hook on the value projection (kn.hooks). An adapter names, for
one family of Hugging Face models:

* the transformer blocks, and in each the value projection (its input is the neuron
  vector; :meth:`Adapter.value_slots` is a writable ``[units, hidden]`` view of its weight)
  and the attention sublayer's output projection (its output is what attention adds to
  the residual stream, used by the localisation diagnostic);
* the LM head as a function of final hidden states, and the base-model forward pass;
* the longest input the position embeddings take;
* for integrated gradients, the blocks as functions (``kn.models.blocks``) that can
  resume after a replaced FFN activation.

Adding an architecture means adding one subclass here (registered by its ``model_types``)
and its test in tests/models/test_adapters.py.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from kn.models.blocks import Dense, EncoderBlock, Norm


class Adapter:
    """Base class; subclasses fill in the module paths of one architecture family."""

    model_types: ClassVar[tuple[str, ...]] = ()
    causal: ClassVar[bool] = False
    registry: ClassVar[dict[str, type["Adapter"]]] = {}

    blocks_path: ClassVar[str]  # from the *ForMaskedLM / *ForCausalLM model to the ModuleList of blocks
    value_projection_path: ClassVar[str]  # inside a block: the down projection (input = the neuron vector)
    attention_output_path: ClassVar[str]  # inside a block: the attention output projection

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for model_type in cls.model_types:
            Adapter.registry[model_type] = cls

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ------------------------------------------------------------------------------ structure
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)  # type: ignore[return-value]

    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    def value_projection(self, layer: int) -> nn.Module:
        """Layer ``layer``'s down projection: its input is the FFN neuron vector."""
        return self.blocks()[layer].get_submodule(self.value_projection_path)

    def value_slots(self, layer: int) -> Tensor:
        """``[units, hidden]`` view of the down projection's weight: row i is neuron i's value slot.

        A view, so writes (under ``torch.no_grad()``) change the model. ``nn.Linear`` stores
        ``[hidden, units]``, hence the transpose.
        """
        projection = self.value_projection(layer)
        if not isinstance(projection, nn.Linear):
            raise TypeError(f"layer {layer}: {self.value_projection_path} is {type(projection).__name__}, expected nn.Linear")
        return projection.weight.T

    @property
    def ffn_size(self) -> int:
        return int(self.value_slots(0).shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.value_slots(0).shape[1])

    def attention_output(self, layer: int) -> nn.Module:
        """Layer ``layer``'s attention output projection: its output is the attention sublayer's contribution."""
        return self.blocks()[layer].get_submodule(self.attention_output_path)

    def input_embeddings(self) -> Tensor:
        return self.model.get_input_embeddings().weight

    def output_embeddings(self) -> Tensor:
        """The unembedding matrix ``[vocab, hidden]`` (the input embeddings when tied)."""
        return self.model.get_output_embeddings().weight

    # ------------------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, all_layers: bool = False) -> tuple[Tensor, ...]:
        """The base model's hidden states: the last one, or (``all_layers``) embeddings then every block's output."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=all_layers)
        return tuple(out.hidden_states) if all_layers else (out.last_hidden_state,)

    def lm_head(self) -> Callable[[Tensor], Tensor]:
        """The LM head as a function of final hidden states ``[..., H] -> [..., V]``."""
        raise NotImplementedError

    def position_limit(self) -> int:
        """The longest input (special tokens included) the position embeddings take."""
        return int(getattr(self.config, "max_position_embeddings", 512))

    # ------------------------------------------------------------------------------ integrated gradients
    def functional_blocks(self) -> list[EncoderBlock]:
        """The blocks as functions for prefix-cached integrated gradients (kn.attribution)."""
        raise NotImplementedError(f"{type(self).__name__} has no functional blocks for the fast IG path")


class BertFamily(Adapter):
    """BERT and the models that keep its block layout: RoBERTa, XLM-R, CamemBERT, ELECTRA."""

    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
    value_projection_path = "output.dense"
    attention_output_path = "attention.output.dense"

    @property
    def blocks_path(self) -> str:  # type: ignore[override]
        return f"{self.model.base_model_prefix}.encoder.layer"

    def lm_head(self) -> Callable[[Tensor], Tensor]:
        model = self.model
        if self.config.model_type == "bert":
            return model.cls
        if self.config.model_type == "electra":
            return lambda hidden: model.generator_lm_head(model.generator_predictions(hidden))
        return model.lm_head

    def position_limit(self) -> int:
        limit = super().position_limit()
        if self.config.model_type in ("roberta", "xlm-roberta", "camembert"):
            limit -= int(self.config.pad_token_id) + 1  # positions start after padding_idx
        return limit

    def functional_blocks(self) -> list[EncoderBlock]:
        if getattr(self.config, "is_decoder", False):
            raise ValueError(f"{self.config.model_type} configured as a decoder (causal attention); "
                             "IG over masked-LM blocks expects a bidirectional encoder")
        blocks = []
        for layer in self.blocks():
            attn = layer.attention
            blocks.append(EncoderBlock(
                Dense.of(attn.self.query), Dense.of(attn.self.key), Dense.of(attn.self.value),
                Dense.of(attn.output.dense), Norm.of(attn.output.LayerNorm), Dense.of(layer.intermediate.dense),
                layer.intermediate.intermediate_act_fn, Dense.of(layer.output.dense),
                Norm.of(layer.output.LayerNorm), int(attn.self.num_attention_heads),
            ))
        return blocks


class DistilBert(Adapter):
    model_types = ("distilbert",)
    blocks_path = "distilbert.transformer.layer"
    value_projection_path = "ffn.lin2"
    attention_output_path = "attention.out_lin"

    def lm_head(self) -> Callable[[Tensor], Tensor]:
        model = self.model
        return lambda hidden: model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(hidden))))

    def functional_blocks(self) -> list[EncoderBlock]:
        blocks = []
        for layer in self.blocks():
            attn = layer.attention
            blocks.append(EncoderBlock(
                Dense.of(attn.q_lin), Dense.of(attn.k_lin), Dense.of(attn.v_lin), Dense.of(attn.out_lin),
                Norm.of(layer.sa_layer_norm), Dense.of(layer.ffn.lin1), layer.ffn.activation, Dense.of(layer.ffn.lin2),
                Norm.of(layer.output_layer_norm), int(attn.n_heads),
            ))
        return blocks


def supported_architectures() -> list[str]:
    return sorted(Adapter.registry)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s architecture (``config.model_type``); a clear error if there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in Adapter.registry:
        raise ValueError(
            f"architecture {model_type!r} has no adapter; supported: {supported_architectures()}. "
            "Add a subclass of kn.models.adapters.Adapter naming its blocks, value projection, attention "
            "output and LM head (and a test in tests/models/test_adapters.py)."
        )
    return Adapter.registry[model_type](model)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live: every tensor a stage builds for it goes there."""
    return next(model.parameters()).device
