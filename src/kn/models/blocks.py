"""A functional view of post-LayerNorm encoder blocks (BERT's layout).

Integrated gradients (SPEC §3) perturbs one position of one layer's FFN activation and
must recompute only what depends on it: resume a block *after* its FFN activation, run
the top block for the [MASK] row alone, apply the MLM head to that row alone. The HF
modules cannot do that, so the architecture adapters (kn.models.adapters) read each
block's parameters once into an :class:`EncoderBlock` (detached: no parameter ever enters
an autograd graph), which reimplements the block's forward pass with the same operations
as HF's eager path. Tests compare it with the unmodified HF model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Dense:
    weight: Tensor
    bias: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def of(cls, linear: nn.Module) -> "Dense":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())


@dataclass(frozen=True)
class Norm:
    weight: Tensor
    bias: Tensor
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    @classmethod
    def of(cls, norm: nn.Module) -> "Norm":
        if not isinstance(norm, nn.LayerNorm):
            raise TypeError(f"expected nn.LayerNorm, got {type(norm).__name__}")
        return cls(norm.weight.detach(), norm.bias.detach(), float(norm.eps))


@dataclass(frozen=True)
class EncoderBlock:
    """One post-LN block: r = LN(x + O·attn(x)); out = LN(r + W2·act(W1·r))."""

    query: Dense
    key: Dense
    value: Dense
    attn_out: Dense
    attn_norm: Norm
    ffn_in: Dense
    act: Callable[[Tensor], Tensor]
    ffn_out: Dense
    ffn_norm: Norm
    num_heads: int

    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, H] -> [B, heads, T, H / heads]."""
        batch, length, hidden = x.shape
        return x.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def qkv(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value projections of ``hidden`` [..., H]."""
        return self.query(hidden), self.key(hidden), self.value(hidden)

    def attend(self, queries: Tensor, q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor) -> Tensor:
        """Attention sublayer output (after its residual LayerNorm) for the ``queries`` rows [B, Tq, H].

        ``q`` [B, Tq, H] are their query projections; ``k``, ``v`` [B, T, H] the projections of
        every position; ``key_bias`` [B, 1, 1, T] from :func:`attention_bias`. Plain matmul +
        softmax in HF's eager order: for prompt-length sequences it is faster on CPU than
        ``scaled_dot_product_attention``'s kernels, forward and backward.
        """
        batch, q_len, hidden = queries.shape
        scale = (hidden // self.num_heads) ** -0.5
        scores = torch.matmul(self._heads(q), self._heads(k).transpose(-1, -2)) * scale + key_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), self._heads(v))
        context = context.transpose(1, 2).reshape(batch, q_len, hidden)
        return self.attn_norm(self.attn_out(context) + queries)

    def attention(self, queries: Tensor, keys: Tensor, key_bias: Tensor) -> Tensor:
        """:meth:`attend` with the projections computed here (``queries`` are rows of ``keys``)."""
        return self.attend(queries, self.query(queries), self.key(keys), self.value(keys), key_bias)

    def ffn_from_activation(self, activation: Tensor, residual: Tensor) -> Tensor:
        """Block output from a (possibly replaced) FFN activation and the attention sublayer output."""
        return self.ffn_norm(self.ffn_out(activation) + residual)

    def ffn(self, residual: Tensor) -> Tensor:
        """Block output from the attention sublayer output."""
        return self.ffn_from_activation(self.act(self.ffn_in(residual)), residual)

    def __call__(self, hidden: Tensor, key_bias: Tensor) -> Tensor:
        return self.ffn(self.attention(hidden, hidden, key_bias))

    def rows(self, hidden: Tensor, positions: Tensor, key_bias: Tensor) -> Tensor:
        """Block output at one position per sequence ([B, H]); every position still serves as key."""
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions][:, None, :]
        return self.ffn(self.attention(picked, hidden, key_bias))[:, 0]


def attention_bias(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive key mask [B, 1, 1, T] from a 0/1 attention mask [B, T]: 0 on real tokens, -inf on padding.

    -inf gives padded keys probability exactly 0 (SPEC §1: padding has no numerical effect).
    """
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(attention_mask == 0, float("-inf"))[:, None, None, :]
