"""Random tiny models of every supported architecture, masked and causal, built from a config (no downloads)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
    RobertaForMaskedLM,
)

MASKED_KINDS = ("bert", "roberta", "electra", "distilbert")
CAUSAL_KINDS = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2")
KINDS = MASKED_KINDS + CAUSAL_KINDS


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients: what kn.models.load_masked_lm returns."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def tiny(kind: str, layers: int = 3, hidden: int = 32, ffn: int = 64, vocab: int = 60, heads: int = 2,
         init: float = 0.2) -> nn.Module:
    """Random tiny masked LMs with room for 128 positions (the reference pads to 128).

    ``init`` 0.2 (BERT uses 0.02) makes a narrow random network far from linear, so the
    gradients differ between alphas and the comparison has something to bite on. Wider
    networks get chaotic at 0.2 (fp32 itself is then off by ~5e-4 from float64 in both
    implementations), so the kn-tiny-shaped model uses 0.05.
    """
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, initializer_range=init)
    if kind == "bert":
        return frozen(BertForMaskedLM(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                                  intermediate_size=ffn, max_position_embeddings=128, **common)))
    if kind == "roberta":
        return frozen(RobertaForMaskedLM(RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                                        intermediate_size=ffn, max_position_embeddings=130, pad_token_id=1,
                                                        bos_token_id=0, eos_token_id=2, **common)))
    if kind == "electra":
        return frozen(ElectraForMaskedLM(ElectraConfig(hidden_size=hidden, embedding_size=hidden // 2, num_hidden_layers=layers,
                                                        num_attention_heads=heads, intermediate_size=ffn,
                                                        max_position_embeddings=128, **common)))
    if kind == "distilbert":
        return frozen(DistilBertForMaskedLM(DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                                                              max_position_embeddings=128, **common)))
    if kind in CAUSAL_KINDS:
        return frozen(AutoModelForCausalLM.from_config(causal_config(kind, layers, hidden, ffn, vocab, heads, init)))
    raise ValueError(kind)


def causal_config(kind: str, layers: int = 3, hidden: int = 32, ffn: int = 64, vocab: int = 60, heads: int = 2,
                  init: float = 0.2, positions: int = 128):
    """Configs of the causal architectures, each with the features its adapter must get right:
    GPT-2 (learned positions, Conv1D, tied unembedding), GPT-NeoX (partial rotary, parallel residual,
    untied), Llama (RMSNorm, rotary, grouped-query attention, gated MLP, untied), Mistral and Qwen2
    (Llama's layout; Qwen2 with q/k/v biases)."""
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=positions,
                          initializer_range=init, **ids)
    if kind == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=ffn, max_position_embeddings=positions, rotary_pct=0.5,
                             use_parallel_residual=True, initializer_range=init, tie_word_embeddings=False, **ids)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2 * heads,
                  num_key_value_heads=heads, intermediate_size=ffn, max_position_embeddings=positions,
                  initializer_range=init, tie_word_embeddings=False, **ids)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(kind)
