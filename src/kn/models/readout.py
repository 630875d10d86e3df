"""The embedding readout: can a vector the paper's update writes reach the model's output?

The paper's fact update (SPEC §7) adds a token's vector e(t) to value slots, so through the FFN
output it adds a multiple of e(t) to the residual stream. That can only make t the prediction
if the output head reads e(t) as t. This module measures it directly: add e(t)
(:func:`kn.editing.edit_embeddings`, the vectors the update writes) to the final hidden state at
the target position, scaled to ``s`` times that state's norm, and read t's rank under the LM head
(1 = top-1). A head whose transform scrambles token directions leaves t near a random rank at any
scale, and no value-slot edit can land.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from kn.editing import edit_embeddings
from kn.models.adapters import adapter_for
from kn.models.encoding import EncodedPrompts
from kn.models.forward import target_passes

READOUT_SCALES = (1.0, 4.0, 16.0)  # multiples of the hidden state's norm


def embedding_readout_ranks(model: nn.Module, encoded: EncodedPrompts, token_ids: Sequence[int],
                            scales: Sequence[float] = READOUT_SCALES, batch_size: int = 128) -> np.ndarray:
    """Rank of ``token_ids[i]`` at prompt i's target position after adding its unit token vector times
    ``s`` x the final hidden state's norm, for each ``s`` in ``scales``: an int array [prompts, scales]."""
    if len(token_ids) != len(encoded):
        raise ValueError(f"{len(token_ids)} token ids for {len(encoded)} prompts; expected one per prompt")
    head = adapter_for(model).lm_head()
    vectors, _ = edit_embeddings(model)
    ranks = np.zeros((len(encoded), len(scales)), dtype=np.int64)
    for batch in target_passes(model, encoded, batch_size=batch_size, logits=False, all_hidden=True):
        assert batch.hidden_states is not None
        rows = torch.arange(len(batch.items), device=batch.positions.device)
        hidden = batch.hidden_states[-1][rows, batch.positions].float()
        targets = torch.tensor([int(token_ids[p]) for p in batch.prompts], device=hidden.device)
        direction = vectors[targets].detach().float()
        direction = direction / direction.norm(dim=-1, keepdim=True)
        norms = hidden.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            for k, scale in enumerate(scales):
                logits = head(hidden + float(scale) * norms * direction).float()
                gold = logits.gather(1, targets[:, None])
                ranks[batch.prompts, k] = ((logits > gold).sum(-1) + 1).cpu().numpy()
    return ranks
