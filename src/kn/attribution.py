"""Knowledge attribution (SPEC §3): integrated gradients over FFN neurons, and the activation baseline.

Semantics (the authors' code): for each prompt and each layer l independently, the whole
FFN activation vector a of layer l at the [MASK] position is replaced by alpha·a (zero
baseline); every other position of layer l and every layer below are unchanged, every
layer above is recomputed. g_k is the gradient of the full-vocabulary softmax
probability of the target token with respect to that replaced vector, and
IG = (a / m) ⊙ Σ_k g_k.

The fast path computes exactly that, but only what depends on the replaced vector:

* one plain forward pass per prompt (prefix caching) gives every layer's input and
  output; layer l's attention sublayer is unchanged, so its output row at [MASK] is
  LN(W2·(alpha·a) + b2 + r) with r cached, and the other rows are the cached output;
* block l+1 reuses the cached query/key/value projections of the unchanged rows;
  blocks l+2 .. L-2 run on all positions; the top block and the MLM head only on the
  [MASK] row (nothing else reaches the target probability);
* prompts × steps are batched per forward, padded only to the chunk's longest prompt
  (prompts are processed shortest first);
* gradients are taken with ``torch.autograd.grad`` with respect to the replaced vector
  only; the block parameters are detached, so no parameter gradient is ever formed.

``tests/naive_ig.py`` holds the authors'-style reference (one prompt at a time, padded
to 128, full forward/backward through the unmodified HF model); the tests hold the two
equal to 1e-4 relative error in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kn.hooks import capture_activations
from kn.models.arch import num_ffn_layers
from kn.models.blocks import EncoderBlock, attention_bias, encoder_blocks, mlm_head
from kn.models.encoding import EncodedPrompts

log = logging.getLogger("kn.attribution")

# alpha_k = (k + offset) / m, k = 0..m-1
ALPHA_OFFSETS = {"left": 0.0, "right": 1.0, "midpoint": 0.5}  # left: authors' code; right: paper formula


@dataclass
class PlainPass:
    """What one unmodified forward pass gives per prompt (the activation baseline and the probe values)."""

    activations: Tensor  # [n, n_layers, ffn] float32: FFN activations at [MASK] (the "base" scores)
    target_prob: Tensor  # [n] float32: P(target | prompt), full-vocabulary softmax at [MASK]
    pred_ids: Tensor  # [n] int64: argmax over the full vocabulary at [MASK]


def alpha_steps(m: int, alpha_rule: str) -> Tensor:
    """The multipliers k + offset (k = 0..m-1) of the step a/m, so that alpha_k·a = (a/m)·(k + offset).

    The authors build the scaled points as step·k with step = a/m; multiplying in that
    order keeps their rounding.
    """
    if alpha_rule not in ALPHA_OFFSETS:
        raise ValueError(f"alpha_rule {alpha_rule!r}; expected one of {sorted(ALPHA_OFFSETS)}")
    if m < 1:
        raise ValueError(f"m = {m}; expected >= 1 integration steps")
    return torch.arange(m, dtype=torch.float32) + ALPHA_OFFSETS[alpha_rule]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _layer_list(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    n_layers = num_ffn_layers(model)
    chosen = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} FFN layers (0-based)")
    return chosen


def _check_targets(encoded: EncodedPrompts, target_ids: Tensor, vocab_size: int) -> Tensor:
    target_ids = torch.as_tensor(target_ids, dtype=torch.long).cpu()
    if target_ids.shape != (len(encoded),):
        raise ValueError(f"target_ids has shape {tuple(target_ids.shape)}; expected ({len(encoded)},), one per prompt")
    bad = ((target_ids < 0) | (target_ids >= vocab_size)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"target ids out of the vocabulary [0, {vocab_size}) for prompts {bad[:5]}: {target_ids[bad[:5]].tolist()}"
        )
    return target_ids


def _chunks_by_length(encoded: EncodedPrompts, size: int) -> list[list[int]]:
    """Prompt indices, shortest first (stable), in chunks of ``size``: padding stays minimal."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    return [order[start : start + size] for start in range(0, len(order), size)]


def _pad(model: nn.Module, encoded: EncodedPrompts, chunk: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids [B, T], attention mask [B, T], [MASK] positions [B]) for a chunk, on the model's device."""
    pad_id = getattr(model.config, "pad_token_id", None)
    sub = EncodedPrompts([encoded.input_ids[i] for i in chunk], [encoded.mask_positions[i] for i in chunk])
    ids, mask = sub.padded(0 if pad_id is None else int(pad_id), _device(model))
    return ids, mask, torch.tensor(sub.mask_positions, dtype=torch.long, device=ids.device)


def _plain_forward(
    model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, layers: Sequence[int]
) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """Unmodified HF forward: (hidden states: embeddings + every block's output, activations at
    [MASK] [B, len(layers), F], logits at [MASK] [B, V]). The MLM head runs on the [MASK] rows only."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    with torch.no_grad(), capture_activations(model, positions, layers) as captured:
        out = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        logits = mlm_head(model)(out.hidden_states[-1][rows, positions])
    activations = torch.stack([captured[layer] for layer in layers], dim=1)
    return out.hidden_states, activations, logits


def activation_scores(
    model: nn.Module,
    encoded: EncodedPrompts,
    target_ids: Tensor | None = None,
    *,
    batch_size: int = 64,
    layers: Sequence[int] | None = None,
) -> PlainPass:
    """The "base" method (SPEC §3): FFN activations at [MASK] from the plain forward pass,
    with that same pass's target probability and argmax prediction."""
    chosen = _layer_list(model, layers)
    vocab = int(model.config.vocab_size)
    targets = None if target_ids is None else _check_targets(encoded, target_ids, vocab)
    n, ffn = len(encoded), None
    activations: Tensor | None = None
    target_prob = torch.full((n,), float("nan"))
    pred_ids = torch.empty(n, dtype=torch.long)
    for chunk in _chunks_by_length(encoded, max(1, batch_size)):
        ids, mask, positions = _pad(model, encoded, chunk)
        _, acts, logits = _plain_forward(model, ids, mask, positions, chosen)
        if activations is None:
            ffn = acts.shape[-1]
            activations = torch.empty((n, len(chosen), ffn), dtype=torch.float32)
        index = torch.tensor(chunk)
        activations[index] = acts.float().cpu()
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        pred_ids[index] = probs.argmax(dim=-1)
        if targets is not None:
            target_prob[index] = probs[torch.arange(len(chunk)), targets[index]]
    if activations is None:
        raise ValueError("no prompts to score")
    return PlainPass(activations, target_prob, pred_ids)


@contextlib.contextmanager
def _precision(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """fp32 as is; bf16 through autocast (matmuls in bf16; norms/softmax as autocast decides)."""
    if dtype == torch.float32:
        yield
    elif dtype == torch.bfloat16:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        raise ValueError(f"dtype {dtype}; expected torch.float32 or torch.bfloat16")


@dataclass
class _LayerCache:
    """Plain-pass values around layer l for a chunk of prompts, shared by all m steps (prefix caching)."""

    residual: Tensor  # [B, H]: layer l's attention-sublayer output at [MASK] (the edit leaves it unchanged)
    output: Tensor  # [B, T, H]: layer l's plain output = block l+1's input
    next_qkv: tuple[Tensor, Tensor, Tensor] | None  # block l+1's q, k, v of ``output``; None for the top layer

    def rows(self, index: Tensor) -> "_LayerCache":
        """The cache of rows ``index`` (a tensor: advanced indexing copies, so callers may write)."""
        qkv = None if self.next_qkv is None else tuple(t[index] for t in self.next_qkv)
        return _LayerCache(self.residual[index], self.output[index], qkv)  # type: ignore[arg-type]


def _layer_cache(blocks: list[EncoderBlock], layer: int, hidden: tuple[Tensor, ...], positions: Tensor,
                 key_bias: Tensor) -> _LayerCache:
    """``hidden`` are the plain pass's hidden states (embeddings, then each block's output)."""
    with torch.no_grad():
        rows = torch.arange(positions.shape[0], device=positions.device)
        picked = hidden[layer][rows, positions][:, None, :]
        residual = blocks[layer].attention(picked, hidden[layer], key_bias)[:, 0]
        output = hidden[layer + 1]
        next_qkv = blocks[layer + 1].qkv(output) if layer + 1 < len(blocks) else None
    return _LayerCache(residual, output, next_qkv)


def _target_prob_from_layer(
    blocks: list[EncoderBlock],
    head: Callable[[Tensor], Tensor],
    layer: int,
    scaled: Tensor,
    cache: _LayerCache,
    key_bias: Tensor,
    positions: Tensor,
    targets: Tensor,
) -> Tensor:
    """P(target) per row [R] when layer ``layer``'s FFN activation at [MASK] is ``scaled`` [R, F].

    ``cache`` holds this batch's own copies of the cached tensors (they are written into);
    ``key_bias`` [R, 1, 1, T] is the additive attention mask (see ``attention_bias``).

    Only the [MASK] row of layer l's output changes. Block l+1 reuses the cached q, k, v
    of every other row (their inputs are unchanged); blocks l+2 .. L-2 run on all rows;
    the top block and the head run on the [MASK] row alone.
    """
    mask_row = blocks[layer].ffn_from_activation(scaled, cache.residual)  # [R, H]
    top = len(blocks) - 1
    if layer == top:
        return _prob(head(mask_row), targets)
    assert cache.next_qkv is not None
    following = blocks[layer + 1]
    rows = torch.arange(positions.shape[0], device=positions.device)
    q_row, k_row, v_row = following.qkv(mask_row)
    q_all, k_all, v_all = cache.next_qkv  # per-row copies: writing the [MASK] row into them is safe
    # in-place writes of the [MASK] row: its gradient is a gather, not a masked pass over [R, T, H]
    # (.to: under bf16 autocast the new rows are bf16, the cached tensors fp32)
    k_all[rows, positions] = k_row.to(k_all.dtype)
    v_all[rows, positions] = v_row.to(v_all.dtype)
    if layer + 1 == top:
        final = following.ffn(following.attend(mask_row[:, None, :], q_row[:, None, :], k_all, v_all, key_bias))[:, 0]
        return _prob(head(final), targets)
    inputs = cache.output
    inputs[rows, positions] = mask_row.to(inputs.dtype)
    q_all[rows, positions] = q_row.to(q_all.dtype)
    hidden = following.ffn(following.attend(inputs, q_all, k_all, v_all, key_bias))
    for block in blocks[layer + 2 : top]:
        hidden = block(hidden, key_bias)
    return _prob(head(blocks[top].rows(hidden, positions, key_bias)), targets)


def _prob(logits: Tensor, targets: Tensor) -> Tensor:
    """Full-vocabulary softmax probability of each row's target (SPEC §0: a probability, not a log)."""
    return torch.softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]


def ig_attribution(
    model: nn.Module,
    encoded: EncodedPrompts,
    target_ids: Tensor,
    *,
    m: int = 20,
    alpha_rule: str = "left",
    batch_size: int = 64,
    layers: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Tensor:
    """Integrated-gradients scores [n_prompts, len(layers), ffn] (float32, CPU), SPEC §3.

    ``batch_size`` bounds the prompts × steps rows per forward pass; ``dtype=torch.bfloat16``
    runs the recomputed layers under bf16 autocast (the plain pass stays fp32).
    """
    chosen = _layer_list(model, layers)
    targets_all = _check_targets(encoded, target_ids, int(model.config.vocab_size))
    steps = alpha_steps(m, alpha_rule)
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}; expected >= 1")
    device = _device(model)
    blocks, head = encoder_blocks(model), mlm_head(model)
    prompts_per_chunk = max(1, batch_size // m)
    scores: Tensor | None = None
    started = time.perf_counter()
    bar = tqdm(total=len(encoded), desc="integrated gradients", unit="prompt", disable=not progress)
    for chunk in _chunks_by_length(encoded, prompts_per_chunk):
        ids, mask, positions = _pad(model, encoded, chunk)
        hidden, acts, _ = _plain_forward(model, ids, mask, positions, chosen)
        key_bias = attention_bias(mask)
        if scores is None:
            scores = torch.empty((len(encoded), len(chosen), acts.shape[-1]), dtype=torch.float32)
        targets = targets_all[chunk].to(device)
        n_rows = len(chunk) * m
        row_prompt = torch.arange(n_rows, device=device) // m
        row_alpha = steps.to(device)[torch.arange(n_rows, device=device) % m]
        for slot, layer in enumerate(chosen):
            cache = _layer_cache(blocks, layer, hidden, positions, key_bias)
            step = acts[:, slot] / m  # [B, F]: the authors' step (a - baseline) / m
            grad_sum = torch.zeros_like(step, dtype=torch.float32)
            for start in range(0, n_rows, batch_size):
                p = row_prompt[start : start + batch_size]
                scaled = (step[p] * row_alpha[start : start + batch_size, None]).requires_grad_(True)
                with torch.enable_grad(), _precision(device, dtype):
                    prob = _target_prob_from_layer(
                        blocks, head, layer, scaled, cache.rows(p), key_bias[p], positions[p], targets[p]
                    )
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
                # sum each prompt's steps in row order (p is sorted); unlike index_add_, this is
                # deterministic on CUDA too
                batch_prompts, counts = torch.unique_consecutive(p, return_counts=True)
                grad_sum[batch_prompts] += torch.stack([g.sum(0) for g in grad.float().split(counts.tolist())])
            scores[torch.tensor(chunk), slot] = (step * grad_sum).float().cpu()
        bar.update(len(chunk))
    bar.close()
    if scores is None:
        raise ValueError("no prompts to attribute")
    elapsed = time.perf_counter() - started
    log.info(
        "IG: %d prompts x %d layers x m=%d (%s, %s, batch %d) in %.1f s (%.2f prompts/s)",
        len(encoded), len(chosen), m, alpha_rule, dtype, batch_size, elapsed, len(encoded) / max(elapsed, 1e-9),
    )
    return scores


def sparsify(scores: Tensor, ratio: float) -> pd.DataFrame:
    """Storage filter (SPEC §3): per prompt, the (layer, neuron, score) with score >= ratio × that prompt's max.

    Rows come ordered by (prompt, layer, neuron), the order refinement's first-appearance
    rule relies on. A prompt whose max is <= 0 keeps only entries >= ratio·max, exactly
    as the authors' filter does.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected [n_prompts, n_layers, ffn]")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio = {ratio}; expected 0 < ratio <= 1")
    scores = scores.float()
    # the authors compare Python floats: threshold ratio * max in float64
    threshold = ratio * scores.flatten(1).amax(dim=1).double()
    prompt, layer, neuron = (scores.double() >= threshold[:, None, None]).nonzero(as_tuple=True)
    return pd.DataFrame(
        {
            "prompt": prompt.numpy().astype(np.int64),
            "layer": layer.numpy().astype(np.int16),
            "neuron": neuron.numpy().astype(np.int32),
            "score": scores[prompt, layer, neuron].numpy().astype(np.float32),
        }
    )
