"""A 2-layer BERT whose knowledge neurons are known by construction (used by the end-to-end tests).

Attention in the last layer copies "Paris is in the prompt" (resp. Berlin) to every
position, unit PARIS_UNIT fires on it, and its value slot writes the direction that the
(untied) decoder reads as "France" (resp. BERLIN_UNIT -> "Germany"). Every other unit
of that layer has small random weights; the first layer is the identity.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import build_tiny_bert

HIDDEN, FFN, LAST = 16, 32, 1
MASK_DIM, PARIS_DIM, BERLIN_DIM, FILLER_DIM = 0, 1, 2, 3  # token identity directions in the embeddings
PARIS_SEEN, BERLIN_SEEN = 6, 7  # written by the last layer's attention at every position
FRANCE_DIM, GERMANY_DIM = 8, 9  # written by the knowledge neurons' value slots, read by the decoder
PARIS_UNIT, BERLIN_UNIT = 5, 17
TEMPLATES = ["[X] is the capital of [Y] .", "[X] is located in [Y] .", "[X] is a city of [Y] .", "[X] , a city in [Y] ."]
FACTS = [("Paris", "France"), ("Berlin", "Germany")]


def build_fact_model(directory: Path) -> Path:
    """Save the hand-wired BERT described in the module docstring; returns ``directory``."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    build_tiny_bert(directory)  # for its vocabulary and tokenizer files
    tokenizer = BertTokenizerFast.from_pretrained(directory)
    vocab = tokenizer.get_vocab()
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=1, intermediate_size=FFN,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    root = 1 / (HIDDEN - 1) ** 0.5  # a normalised one-hot has -root off its own dimension
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.zero_()
            if "LayerNorm.weight" in name:
                param.fill_(1.0)
        embeddings = model.bert.embeddings.word_embeddings.weight
        embeddings[:, FILLER_DIM] = 1.0
        for token, dim in (("[MASK]", MASK_DIM), ("Paris", PARIS_DIM), ("Berlin", BERLIN_DIM)):
            embeddings[vocab[token]] = 0.0
            embeddings[vocab[token], dim] = 1.0
        last = model.bert.encoder.layer[LAST]
        # Uniform attention (Q = K = 0); the value copies "Paris"/"Berlin" into the *_SEEN dims, cancelling the
        # -root every other token has there, so only the subject contributes.
        value = last.attention.self.value
        for src, dst in ((PARIS_DIM, PARIS_SEEN), (BERLIN_DIM, BERLIN_SEEN)):
            value.weight[dst, src] = 4.0
            value.bias[dst] = 4.0 * root
        last.attention.output.dense.weight.copy_(torch.eye(HIDDEN))
        # FFN: small random units everywhere, plus the two knowledge neurons.
        last.intermediate.dense.weight.normal_(0.0, 0.3)
        last.output.dense.weight.normal_(0.0, 0.05)
        for unit, seen, out in ((PARIS_UNIT, PARIS_SEEN, FRANCE_DIM), (BERLIN_UNIT, BERLIN_SEEN, GERMANY_DIM)):
            last.intermediate.dense.weight[unit] = 0.0
            last.intermediate.dense.weight[unit, seen] = 3.0
            last.intermediate.dense.bias[unit] = -1.5
            last.output.dense.weight[:, unit] = 0.0
            last.output.dense.weight[out, unit] = 2.0
        head = model.cls.predictions
        head.transform.dense.weight.copy_(torch.eye(HIDDEN))
        head.decoder.weight[vocab["France"], FRANCE_DIM] = 1.5
        head.decoder.weight[vocab["Germany"], GERMANY_DIM] = 1.5
    model.save_pretrained(directory)
    return directory
