"""Prompt encoding (SPEC §1): [CLS] + pieces + [SEP], the first [MASK], gold ids by vocab lookup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

MASK_LITERAL = "[MASK]"


@dataclass
class EncodedPrompts:
    """Unpadded token ids per prompt and the index of the first mask token (counting [CLS] as 0)."""

    input_ids: list[list[int]]
    mask_positions: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def padded(
        self, pad_id: int, device: torch.device | str = "cpu", rows: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad the prompts ``rows`` (default all, in order) to their longest: (input_ids, attention_mask)."""
        seqs = self.input_ids if rows is None else [self.input_ids[k] for k in rows]
        return pad_sequences(seqs, pad_id, device)


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists to the longest one: (input_ids, attention_mask), both [B, T] long."""
    width = max(len(ids) for ids in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_len: int = 128) -> EncodedPrompts:
    """Tokenise prompts whose blank is the literal ``[MASK]`` (mapped to the tokenizer's mask token)."""
    mask_token = tokenizer.mask_token
    if mask_token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token; a masked LM is required")
    texts = [p.replace(MASK_LITERAL, mask_token) for p in prompts]
    batch = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len)
    positions: list[int] = []
    for text, ids in zip(prompts, batch["input_ids"]):
        try:
            positions.append(ids.index(tokenizer.mask_token_id))
        except ValueError:
            raise ValueError(f"prompt has no mask token within {max_len} pieces: {text!r}") from None
    return EncodedPrompts(input_ids=[list(ids) for ids in batch["input_ids"]], mask_positions=positions)


def object_token_id(tokenizer: PreTrainedTokenizerBase, obj: str) -> int | None:
    """The single vocabulary id of ``obj``, or None when it is not one token for this tokenizer.

    SPEC §1 looks the whole string up in the vocabulary; BPE vocabularies store a word
    after a space with a marker (``Ġ``), so a one-piece tokenisation of `` obj`` also counts.
    """
    vocab = tokenizer.get_vocab()
    if obj in vocab and obj not in tokenizer.all_special_tokens:
        return int(vocab[obj])
    pieces = tokenizer.tokenize(" " + obj)
    if len(pieces) == 1 and pieces[0] != tokenizer.unk_token:
        return int(tokenizer.convert_tokens_to_ids(pieces[0]))
    return None
