"""Prompt encoding (SPEC §1): [CLS] + pieces + [SEP], first [MASK] position, single-token objects."""

from __future__ import annotations

import pytest
import torch

from kn.models.encoding import encode_prompts, object_token_id
from kn.models.load import load_masked_lm


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert_dir):
    return load_masked_lm(tiny_bert_dir)[1]


@pytest.fixture(scope="module")
def roberta_tokenizer(tiny_roberta_dir):
    return load_masked_lm(tiny_roberta_dir)[1]


def test_mask_position_counts_cls_and_survives_punctuation(bert_tokenizer):
    encoded = encode_prompts(bert_tokenizer, ["Paris is the capital of [MASK].", "[MASK] is located in France ."])
    for ids, position in zip(encoded.input_ids, encoded.mask_positions):
        tokens = bert_tokenizer.convert_ids_to_tokens(ids)
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        assert tokens[position] == "[MASK]" and tokens.index("[MASK]") == position
    assert encoded.mask_positions == [6, 1]
    assert bert_tokenizer.convert_ids_to_tokens(encoded.input_ids[0])[6:8] == ["[MASK]", "."]


def test_first_mask_wins(bert_tokenizer):
    encoded = encode_prompts(bert_tokenizer, ["the [MASK] of [MASK]"])
    assert encoded.mask_positions == [2]


def test_prompt_without_mask_is_an_error(bert_tokenizer):
    with pytest.raises(ValueError, match="no mask token"):
        encode_prompts(bert_tokenizer, ["Paris is the capital of France."])


def test_roberta_mask_literal_is_mapped_to_its_mask_token(roberta_tokenizer):
    encoded = encode_prompts(roberta_tokenizer, ["Paris is the capital of [MASK]."])
    ids = encoded.input_ids[0]
    assert ids[encoded.mask_positions[0]] == roberta_tokenizer.mask_token_id
    assert ids.count(roberta_tokenizer.mask_token_id) == 1


def test_padding_and_attention_mask(bert_tokenizer):
    encoded = encode_prompts(bert_tokenizer, ["Paris is the capital of [MASK].", "[MASK] ."])
    ids, attention = encoded.padded(pad_id=bert_tokenizer.pad_token_id)
    lengths = [len(x) for x in encoded.input_ids]
    assert ids.shape == (2, max(lengths))
    assert attention.sum(dim=1).tolist() == lengths
    assert torch.all(ids[1, lengths[1]:] == bert_tokenizer.pad_token_id)


def test_single_token_object_lookup(bert_tokenizer, roberta_tokenizer):
    vocab = bert_tokenizer.get_vocab()
    assert object_token_id(bert_tokenizer, "France") == vocab["France"]
    assert object_token_id(bert_tokenizer, "Atlantis") is None  # several wordpieces, not one entry
    paris = object_token_id(roberta_tokenizer, "Paris")
    assert paris is not None
    assert roberta_tokenizer.decode([paris]).strip() == "Paris"
    assert object_token_id(roberta_tokenizer, "Atlantisland") is None
