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
  resume after a replaced FFN activation (masked LMs), or how to run one decoder block of the
  HF model on a few rows against cached keys and values (causal LMs, ``CausalAdapter``).

The model's kind is decided here and nowhere else: ``Adapter.causal`` (a class attribute,
looked up by ``config.model_type`` before any weight is loaded: :func:`is_causal_type`). Which
AutoModel class loads a checkpoint, how a prompt is encoded, which token ids are its target and
at which position it is read all key off it (kn.models.load, kn.models.encoding).

Adding an architecture means adding one subclass here (registered by its ``model_types``)
and its test in tests/models/test_adapters.py.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from kn.models.blocks import Dense, EncoderBlock, Norm, attention_bias


class Adapter:
    """Base class; subclasses fill in the module paths of one architecture family."""

    model_types: ClassVar[tuple[str, ...]] = ()
    causal: ClassVar[bool] = False
    registry: ClassVar[dict[str, type["Adapter"]]] = {}

    blocks_path: ClassVar[str]  # from the *ForMaskedLM / *ForCausalLM model to the ModuleList of blocks
    value_projection_path: ClassVar[str]  # inside a block: the down projection (input = the neuron vector)
    # inside a block: the up projection whose output, through the FFN activation, is the neuron vector; None for
    # gated FFNs (act(gate x) * up x), whose units have no single key
    key_projection_path: ClassVar[str | None] = None
    activation_path: ClassVar[str | None] = None  # inside a block: the FFN activation module
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

    def key_projection(self, layer: int) -> nn.Module:
        """Layer ``layer``'s up projection: unit i's key is row i of its weight, with bias i."""
        if self.key_projection_path is None:
            raise NotImplementedError(
                f"{type(self).__name__}: the FFN is gated (act(gate x) * up x), so a unit has no single key to write"
            )
        return self.blocks()[layer].get_submodule(self.key_projection_path)

    def keys(self, layer: int) -> tuple[Tensor, Tensor]:
        """Writable ``[units, hidden]`` view of layer ``layer``'s key weights and its ``[units]`` bias."""
        projection = self.key_projection(layer)
        if not isinstance(projection, nn.Linear) or projection.bias is None:
            raise TypeError(f"layer {layer}: {self.key_projection_path} is {type(projection).__name__} without a "
                            "bias; expected nn.Linear with bias")
        return projection.weight, projection.bias

    def ffn_activation(self, layer: int) -> Callable[[Tensor], Tensor]:
        """The function from a unit's pre-activation (key . x + bias) to its activation."""
        if self.activation_path is None:
            raise NotImplementedError(f"{type(self).__name__} names no FFN activation")
        return self.blocks()[layer].get_submodule(self.activation_path)  # type: ignore[return-value]

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

    resumable: ClassVar[bool] = False  # whether run_blocks_from can re-enter the blocks (kn.models.forward)

    def run_blocks_from(self, layer: int, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Blocks ``layer`` .. top of the HF model on ``hidden`` (block ``layer``'s input ``[B, T, H]``,
        ``attention_mask`` ``[B, T]`` 0/1): the last hidden state. The HF modules run, so hooks on them fire."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume a pass at a block")

    # ------------------------------------------------------------------------------ integrated gradients
    def functional_blocks(self) -> list[EncoderBlock]:
        """The blocks as functions for prefix-cached integrated gradients (kn.attribution)."""
        raise NotImplementedError(f"{type(self).__name__} has no functional blocks for the fast IG path")


class BertFamily(Adapter):
    """BERT and the models that keep its block layout: RoBERTa, XLM-R, CamemBERT, ELECTRA."""

    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
    value_projection_path = "output.dense"
    key_projection_path = "intermediate.dense"
    attention_output_path = "attention.output.dense"

    def ffn_activation(self, layer: int) -> Callable[[Tensor], Tensor]:
        return self.blocks()[layer].intermediate.intermediate_act_fn

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

    resumable = True

    def run_blocks_from(self, layer: int, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        bias = attention_bias(attention_mask, hidden.dtype)  # [B, 1, 1, T] additive: what HF's encoder layers take
        for block in list(self.blocks())[layer:]:
            hidden = block(hidden, bias)
        return hidden

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
    key_projection_path = "ffn.lin1"
    attention_output_path = "attention.out_lin"

    def ffn_activation(self, layer: int) -> Callable[[Tensor], Tensor]:
        return self.blocks()[layer].ffn.activation

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


class KeyValuePrefix:
    """Keys and values of a prompt prefix, per layer, handed to HF attention in place of its cache.

    HF's attention modules call ``cache.update(new_keys, new_values, layer_idx, ...)`` and attend
    over what it returns; this returns the cached prefix followed by the new rows without storing
    anything, so one prefix serves every forward pass (every layer and integration step) unchanged.
    ``keys[layer]`` / ``values[layer]`` are ``[rows, kv_heads, prefix, head_dim]`` (after rotary
    embedding, as HF's own cache holds them).
    """

    def __init__(self, keys: dict[int, Tensor], values: dict[int, Tensor]) -> None:
        self.keys, self.values = keys, values

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *_args: Any, **_kwargs: Any) -> tuple[Tensor, Tensor]:
        return (torch.cat([self.keys[layer_idx].to(key.dtype), key], dim=-2),
                torch.cat([self.values[layer_idx].to(value.dtype), value], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys[min(self.keys)].shape[-2]) if self.keys else 0


class CausalAdapter(Adapter):
    """Pre-LN decoder-only (causal) LMs loaded with AutoModelForCausalLM.

    The FFN neuron vector is the input of the down projection (GPT-2 ``mlp.c_proj``, GPT-NeoX
    ``mlp.dense_4h_to_h``, Llama-style ``mlp.down_proj``): the activation output of the up
    projection, or act(gate) * up for gated MLPs. Integrated gradients (kn.attribution) runs
    the HF decoder blocks themselves on the rows an intervention reaches, against the cached
    keys and values of the positions before them (:class:`KeyValuePrefix`), so no block is
    reimplemented.
    """

    causal = True
    final_norm_path: ClassVar[str]  # from the *ForCausalLM model to the norm after the last block
    rotary_path: ClassVar[str | None] = None  # from the *ForCausalLM model to the rotary embedding, if any

    def lm_head(self) -> Callable[[Tensor], Tensor]:
        """The unembedding applied to the base model's last hidden state (already after the final norm)."""
        return self.model.get_output_embeddings()

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.final_norm_path)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, all_layers: bool = False) -> tuple[Tensor, ...]:
        """As :meth:`Adapter.hidden_states`; entry l < n_layers of ``all_layers`` is block l's input.

        (HF's last entry is the final norm's output, not the last block's; nothing here reads
        the raw last block output.)
        """
        return super().hidden_states(input_ids, attention_mask, all_layers)

    def hidden_states_and_prefix(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[tuple[Tensor, ...], list[Tensor], list[Tensor]]:
        """Every block's input (plus the final normed state) and every layer's keys and values."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                    use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        short = [j for j, k in enumerate(keys) if k.shape[-2] != input_ids.shape[1]]
        if short:  # a sliding-window cache keeps only the window: prompts longer than it are not supported
            raise ValueError(
                f"layer {short[0]} keeps keys for {keys[short[0]].shape[-2]} of {input_ids.shape[1]} positions "
                f"(sliding window {getattr(self.config, 'sliding_window', None)}); prompts must fit the attention window"
            )
        return tuple(out.hidden_states), keys, values

    def position_embeddings(self, hidden: Tensor, position_ids: Tensor) -> Any:
        """What the blocks take as ``position_embeddings`` (rotary cos/sin), or None (learned absolute positions)."""
        if self.rotary_path is None:
            return None
        return self.model.get_submodule(self.rotary_path)(hidden, position_ids=position_ids)

    def run_block(self, layer: int, hidden: Tensor, attention_mask: Tensor | None, prefix: KeyValuePrefix,
                  position_embeddings: Any) -> Tensor:
        """Block ``layer`` of the HF model on ``hidden`` [R, S, H], attending over ``prefix`` then these rows.

        ``attention_mask`` is additive, [R, 1, S, prefix + S] (0 where a key is visible, -inf
        where not), or None when S = 1 and every key is visible.
        """
        raise NotImplementedError

    def run_from(self, layer: int, hidden: Tensor, attention_mask: Tensor | None, prefix: KeyValuePrefix,
                 position_ids: Tensor) -> Tensor:
        """Blocks ``layer`` .. top and the final norm on ``hidden`` (block ``layer``'s input rows)."""
        embeddings = self.position_embeddings(hidden, position_ids)
        for index in range(layer, self.n_layers):
            hidden = self.run_block(index, hidden, attention_mask, prefix, embeddings)
        return self.final_norm()(hidden)


class GPT2(CausalAdapter):
    """GPT-2: learned absolute positions, Conv1D projections ([in, out] weights), MLP c_fc -> act -> c_proj."""

    model_types = ("gpt2",)
    blocks_path = "transformer.h"
    value_projection_path = "mlp.c_proj"
    key_projection_path = "mlp.c_fc"
    activation_path = "mlp.act"
    attention_output_path = "attn.c_proj"
    final_norm_path = "transformer.ln_f"

    def keys(self, layer: int) -> tuple[Tensor, Tensor]:
        """Conv1D stores ``[hidden, units]``: the transpose is the ``[units, hidden]`` view of the keys."""
        from transformers.pytorch_utils import Conv1D

        projection = self.key_projection(layer)
        if not isinstance(projection, Conv1D):
            raise TypeError(f"layer {layer}: {self.key_projection_path} is {type(projection).__name__}, expected Conv1D")
        return projection.weight.T, projection.bias

    def value_slots(self, layer: int) -> Tensor:
        """Conv1D stores its weight as [in, out] = [units, hidden]: row i is neuron i's value slot, no transpose."""
        from transformers.pytorch_utils import Conv1D

        projection = self.value_projection(layer)
        if not isinstance(projection, Conv1D):
            raise TypeError(f"layer {layer}: {self.value_projection_path} is {type(projection).__name__}, expected Conv1D")
        return projection.weight

    def run_block(self, layer: int, hidden: Tensor, attention_mask: Tensor | None, prefix: KeyValuePrefix,
                  position_embeddings: Any) -> Tensor:
        return self.blocks()[layer](hidden, prefix, attention_mask)


class GPTNeoX(CausalAdapter):
    """GPT-NeoX / Pythia: rotary (possibly partial), parallel or sequential residual, MLP dense_h_to_4h -> act -> dense_4h_to_h."""

    model_types = ("gpt_neox",)
    blocks_path = "gpt_neox.layers"
    value_projection_path = "mlp.dense_4h_to_h"
    key_projection_path = "mlp.dense_h_to_4h"
    activation_path = "mlp.act"
    attention_output_path = "attention.dense"
    final_norm_path = "gpt_neox.final_layer_norm"
    rotary_path = "gpt_neox.rotary_emb"

    def run_block(self, layer: int, hidden: Tensor, attention_mask: Tensor | None, prefix: KeyValuePrefix,
                  position_embeddings: Any) -> Tensor:
        return self.blocks()[layer](hidden, attention_mask=attention_mask, layer_past=prefix,
                                    position_embeddings=position_embeddings)


class Llama(CausalAdapter):
    """Llama and the models that keep its layout (Mistral, Qwen2): RMSNorm, rotary, grouped-query
    attention, gated MLP down_proj(act(gate_proj x) * up_proj x). A sliding attention window
    (Mistral) must be longer than the prompts (4,096 in Mistral-7B; ParaRel prompts are ~15 tokens)."""

    model_types = ("llama", "mistral", "qwen2")
    blocks_path = "model.layers"
    value_projection_path = "mlp.down_proj"
    attention_output_path = "self_attn.o_proj"
    final_norm_path = "model.norm"
    rotary_path = "model.rotary_emb"

    def run_block(self, layer: int, hidden: Tensor, attention_mask: Tensor | None, prefix: KeyValuePrefix,
                  position_embeddings: Any) -> Tensor:
        return self.blocks()[layer](hidden, attention_mask=attention_mask, cache=prefix,
                                    position_embeddings=position_embeddings)


def is_causal_type(model_type: str) -> bool:
    """Whether checkpoints of ``config.model_type`` are causal LMs (decided by their adapter); a clear error if unsupported."""
    if model_type not in Adapter.registry:
        raise ValueError(
            f"architecture {model_type!r} has no adapter; supported: {supported_architectures()}. "
            "Add a subclass of kn.models.adapters.Adapter naming its blocks, value projection, attention "
            "output and LM head (and a test in tests/models/test_adapters.py)."
        )
    return Adapter.registry[model_type].causal


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
