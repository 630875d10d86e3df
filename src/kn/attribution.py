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

Causal LMs (docs/causal.md) are attributed at the last prompt token, and an intervention there
changes no earlier position. So the prefix is computed once per prompt (one plain pass gives
every layer's keys and values and every block's input), and for layer l only the rows the
target is read from (the last prompt token; with the ``sequence`` target also the object's
tokens after it) go through blocks l..top, the final norm and the unembedding, against the
cached prefix keys and values (kn.models.adapters.KeyValuePrefix). The blocks are the HF
modules themselves; a pre-hook puts the scaled vector in place of layer l's FFN vector at the
last prompt token. Prompts x steps are batched, each prompt's prefix masked to its own length.
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

from transformers import PreTrainedTokenizerBase

from kn.hooks import capture_activations, ffn_hooks
from kn.models.adapters import CausalAdapter, KeyValuePrefix, adapter_for, model_device
from kn.models.blocks import EncoderBlock, attention_bias
from kn.models.encoding import EncodedPrompts, PromptCodec, encode_prompts, object_token_id, pad_sequences
from kn.models.forward import length_sorted_batches, pad_token_id, score_continuations, target_passes
from kn.tables import SCORES

log = logging.getLogger("kn.attribution")

# Riemann rules: alpha_k = (k + offset) / m, k = 0..m-1, weight 1/m each
ALPHA_OFFSETS = {"left": 0.0, "right": 1.0, "midpoint": 0.5}  # left: authors' code; right: paper formula
ALPHA_RULES = (*ALPHA_OFFSETS, "gauss_legendre")


@dataclass
class PlainPass:
    """What one unmodified forward pass gives per prompt (the activation baseline and the probe values)."""

    activations: Tensor  # [n, n_layers, ffn] float32: FFN activations at [MASK] (the "base" scores)
    target_prob: Tensor  # [n] float32: P(target | prompt), full-vocabulary softmax at [MASK]
    pred_ids: Tensor  # [n] int64: argmax over the full vocabulary at [MASK]


@dataclass(frozen=True)
class Quadrature:
    """IG = a ⊙ Σ_k w_k ∂P/∂a (α_k a), written as step = a / divisor, point k = step · multiplier_k and
    score = step ⊙ Σ_k weight_k g_k, so the authors' left sum keeps their exact arithmetic (divisor m,
    multipliers 0..m-1, weights 1)."""

    divisor: float
    multipliers: Tensor  # [m] float32
    weights: Tensor  # [m] float32


def quadrature(m: int, alpha_rule: str) -> Quadrature:
    """The m points of ``alpha_rule`` on [0, 1].

    ``left`` (the authors' code), ``right`` (the paper's formula) and ``midpoint`` are Riemann
    sums with equal weights; ``gauss_legendre`` uses the m-point Gauss-Legendre nodes and
    weights mapped to [0, 1], exact for polynomials of degree 2m - 1 in alpha, so far fewer
    points reach the same integral when the gradient varies smoothly along the path.
    """
    if alpha_rule not in ALPHA_RULES:
        raise ValueError(f"alpha_rule {alpha_rule!r}; expected one of {sorted(ALPHA_RULES)}")
    if m < 1:
        raise ValueError(f"m = {m}; expected >= 1 integration steps")
    if alpha_rule == "gauss_legendre":
        nodes, weights = np.polynomial.legendre.leggauss(m)
        return Quadrature(1.0, torch.tensor((nodes + 1) / 2, dtype=torch.float32),
                          torch.tensor(weights / 2, dtype=torch.float32))
    multipliers = torch.arange(m, dtype=torch.float32) + ALPHA_OFFSETS[alpha_rule]
    return Quadrature(float(m), multipliers, torch.ones(m, dtype=torch.float32))


def _layer_list(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    n_layers = adapter_for(model).n_layers
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
    n = len(encoded)
    if not n:
        raise ValueError("no prompts to score")
    activations: Tensor | None = None
    target_prob = torch.full((n,), float("nan"))
    pred_ids = torch.empty(n, dtype=torch.long)
    for batch in target_passes(model, encoded, batch_size=max(1, batch_size), capture=chosen):
        assert batch.activations is not None and batch.logits is not None
        if activations is None:
            activations = torch.empty((n, len(chosen), batch.activations.shape[-1]), dtype=torch.float32)
        index = torch.tensor(batch.items)
        activations[index] = batch.activations.float().cpu()
        probs = torch.softmax(batch.logits, dim=-1).cpu()
        pred_ids[index] = probs.argmax(dim=-1)
        if targets is not None:
            target_prob[index] = probs[torch.arange(len(batch.items)), targets[index]]
    assert activations is not None
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
    continuations: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """Integrated-gradients scores [n_prompts, len(layers), ffn] (float32, CPU), SPEC §3.

    ``alpha_rule`` picks the quadrature (:func:`quadrature`; ``left`` is the authors').
    ``batch_size`` bounds the prompts × steps rows per forward pass; ``dtype=torch.bfloat16``
    runs the recomputed layers under bf16 autocast (the plain pass stays fp32).
    ``continuations`` (causal LMs, the ``sequence`` target): per prompt the object's tokens;
    the attributed quantity is then P(all of them | prompt), teacher-forced, instead of
    P(target_ids | prompt) (``target_ids`` must be their first tokens).
    """
    chosen = _layer_list(model, layers)
    targets_all = _check_targets(encoded, target_ids, int(model.config.vocab_size))
    rule = quadrature(m, alpha_rule)
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}; expected >= 1")
    device = model_device(model)
    adapter = adapter_for(model)
    if isinstance(adapter, CausalAdapter):
        return _causal_ig(adapter, encoded, targets_all, continuations, chosen, rule, m=m, batch_size=batch_size,
                          dtype=dtype, progress=progress)
    if continuations is not None:
        raise ValueError("continuations (the sequence target) are for causal LMs; a masked LM reads one [MASK]")
    blocks, head = adapter.functional_blocks(), adapter.lm_head()
    prompts_per_chunk = max(1, batch_size // m)
    scores: Tensor | None = None
    started = time.perf_counter()
    bar = tqdm(total=len(encoded), desc="integrated gradients", unit="prompt", disable=not progress)
    for plain in target_passes(model, encoded, batch_size=prompts_per_chunk, capture=chosen, all_hidden=True):
        assert plain.hidden_states is not None and plain.activations is not None
        chunk, hidden, acts, positions = plain.items, plain.hidden_states, plain.activations, plain.positions
        key_bias = attention_bias(plain.attention_mask)
        if scores is None:
            scores = torch.empty((len(encoded), len(chosen), acts.shape[-1]), dtype=torch.float32)
        targets = targets_all[chunk].to(device)
        n_rows = len(chunk) * m
        row_prompt = torch.arange(n_rows, device=device) // m
        row_point = torch.arange(n_rows, device=device) % m
        row_alpha, row_weight = rule.multipliers.to(device)[row_point], rule.weights.to(device)[row_point]
        for slot, layer in enumerate(chosen):
            cache = _layer_cache(blocks, layer, hidden, positions, key_bias)
            step = acts[:, slot] / rule.divisor  # [B, F]: the authors' step (a - baseline) / m for Riemann sums
            grad_sum = torch.zeros_like(step, dtype=torch.float32)
            for start in range(0, n_rows, batch_size):
                p = row_prompt[start : start + batch_size]
                scaled = (step[p] * row_alpha[start : start + batch_size, None]).requires_grad_(True)
                with torch.enable_grad(), _precision(device, dtype):
                    prob = _target_prob_from_layer(
                        blocks, head, layer, scaled, cache.rows(p), key_bias[p], positions[p], targets[p]
                    )
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
                _add_weighted_steps(grad_sum, p, grad, row_weight[start : start + batch_size])
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


def _add_weighted_steps(grad_sum: Tensor, prompts: Tensor, grad: Tensor, weights: Tensor) -> None:
    """``grad_sum[p] += sum of prompt p's rows of grad x weight`` (rows grouped by prompt, ``prompts`` sorted).

    The weight is 1 for Riemann sums (exact); each prompt's steps are summed in row order, which,
    unlike ``index_add_``, is deterministic on CUDA too.
    """
    weighted = grad.float() * weights[:, None]
    batch_prompts, counts = torch.unique_consecutive(prompts, return_counts=True)
    grad_sum[batch_prompts] += torch.stack([g.sum(0) for g in weighted.split(counts.tolist())])


def _causal_ig(
    adapter: CausalAdapter,
    encoded: EncodedPrompts,
    targets: Tensor,
    continuations: Sequence[Sequence[int]] | None,
    chosen: list[int],
    rule: Quadrature,
    *,
    m: int,
    batch_size: int,
    dtype: torch.dtype,
    progress: bool,
) -> Tensor:
    """:func:`ig_attribution` for a causal LM (see the module doc): scores [n_prompts, len(chosen), ffn]."""
    model = adapter.model
    device = model_device(model)
    head = adapter.lm_head()
    if continuations is None:
        conts = [[int(t)] for t in targets.tolist()]
    else:
        conts = [[int(t) for t in c] for c in continuations]
        if len(conts) != len(encoded) or any(not c or c[0] != int(t) for c, t in zip(conts, targets.tolist())):
            raise ValueError("continuations must be one non-empty token list per prompt, starting with its target id")
    sequences = [list(ids) + c[:-1] for ids, c in zip(encoded.input_ids, conts)]
    pad = pad_token_id(model)
    scores: Tensor | None = None
    started = time.perf_counter()
    bar = tqdm(total=len(encoded), desc="integrated gradients", unit="prompt", disable=not progress)
    for chunk in length_sorted_batches([len(seq) for seq in sequences], max(1, batch_size // m)):
        ids, attention = pad_sequences([sequences[i] for i in chunk], pad, device)
        positions = torch.tensor([encoded.mask_positions[i] for i in chunk], dtype=torch.long, device=device)
        lengths = torch.tensor([len(conts[i]) for i in chunk], dtype=torch.long, device=device)
        with torch.no_grad(), capture_activations(model, positions, chosen) as captured:
            hidden, keys, values = adapter.hidden_states_and_prefix(ids, attention)
        acts = torch.stack([captured[layer] for layer in chosen], dim=1)  # [B, layers, F]
        if scores is None:
            scores = torch.empty((len(encoded), len(chosen), acts.shape[-1]), dtype=torch.float32)
        rows = _SuffixRows.build(positions, lengths, [conts[i] for i in chunk], ids.shape[1])
        n_rows = len(chunk) * m
        row_prompt = torch.arange(n_rows, device=device) // m
        row_point = torch.arange(n_rows, device=device) % m
        row_alpha, row_weight = rule.multipliers.to(device)[row_point], rule.weights.to(device)[row_point]
        for slot, layer in enumerate(chosen):
            inputs = hidden[layer][rows.batch_index, rows.index]  # [B, S, H]: block l's input at the recomputed rows
            step = acts[:, slot] / rule.divisor
            grad_sum = torch.zeros_like(step, dtype=torch.float32)
            for start in range(0, n_rows, batch_size):
                p = row_prompt[start : start + batch_size]
                scaled = (step[p] * row_alpha[start : start + batch_size, None]).requires_grad_(True)
                prefix = KeyValuePrefix({j: keys[j][p, :, : rows.prefix] for j in range(layer, adapter.n_layers)},
                                        {j: values[j][p, :, : rows.prefix] for j in range(layer, adapter.n_layers)})

                def replace(act: Tensor, scaled: Tensor = scaled) -> Tensor:
                    act = act.clone()
                    act[:, 0, :] = scaled.to(act.dtype)  # row 0 of the recomputed rows: the last prompt token
                    return act

                with torch.enable_grad(), _precision(device, dtype), ffn_hooks(model, {layer: replace}):
                    final = adapter.run_from(layer, inputs[p], None if rows.mask is None else rows.mask[p], prefix,
                                             rows.position_ids[p])
                    prob = rows.probability(head(final), p)
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
                _add_weighted_steps(grad_sum, p, grad, row_weight[start : start + batch_size])
            scores[torch.tensor(chunk), slot] = (step * grad_sum).float().cpu()
        bar.update(len(chunk))
    bar.close()
    if scores is None:
        raise ValueError("no prompts to attribute")
    elapsed = time.perf_counter() - started
    log.info("IG (causal, %s target): %d prompts x %d layers x m=%d (%s, batch %d) in %.1f s (%.2f prompts/s)",
             "first-token" if continuations is None else "sequence", len(encoded), len(chosen), m, dtype, batch_size,
             elapsed, len(encoded) / max(elapsed, 1e-9))
    return scores


@dataclass
class _SuffixRows:
    """The rows a causal intervention at each prompt's last token reaches, for a chunk of prompts.

    Row s of prompt b is position ``positions[b] + s`` (s < its continuation length; the rest
    pad to the longest). The prefix is the first ``prefix`` positions (the longest prompt's,
    without its last token); prompt b sees its own first ``positions[b]`` of them.
    """

    batch_index: Tensor  # [B, 1]
    index: Tensor  # [B, S] positions in the plain pass (padding rows clipped into range)
    position_ids: Tensor  # [B, S] their positions (rotary embeddings)
    valid: Tensor  # [B, S] bool: a real continuation row
    gold: Tensor  # [B, S] the token each row predicts (0 on padding rows)
    prefix: int
    mask: Tensor | None  # [B, 1, S, prefix + S] additive; None when every key is visible to the one row

    @classmethod
    def build(cls, positions: Tensor, lengths: Tensor, continuations: Sequence[Sequence[int]], width: int) -> "_SuffixRows":
        device = positions.device
        span = int(lengths.max())
        prefix = int(positions.max())
        offsets = torch.arange(span, device=device)
        position_ids = positions[:, None] + offsets[None, :]
        valid = offsets[None, :] < lengths[:, None]
        gold = torch.zeros(valid.shape, dtype=torch.long, device=device)
        for b, cont in enumerate(continuations):
            gold[b, : len(cont)] = torch.tensor([int(t) for t in cont], dtype=torch.long, device=device)
        key_abs = torch.cat([torch.arange(prefix, device=device).expand(len(positions), -1), position_ids], dim=1)
        in_prefix = torch.arange(prefix + span, device=device) < prefix
        visible = torch.where(in_prefix[None, None, :], key_abs[:, None, :] < positions[:, None, None],
                              key_abs[:, None, :] <= position_ids[:, :, None])  # [B, S, prefix + S]
        mask = None
        if not bool(visible.all()):
            mask = torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill(~visible, float("-inf"))[:, None]
        return cls(torch.arange(len(positions), device=device)[:, None], position_ids.clamp(max=width - 1), position_ids,
                   valid, gold, prefix, mask)

    def probability(self, logits: Tensor, rows: Tensor) -> Tensor:
        """P(target | prompt) per row: one token's softmax probability, or the product over a continuation."""
        if logits.shape[1] == 1:
            return _prob(logits[:, 0], self.gold[rows, 0])
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, self.gold[rows][..., None])[..., 0]
        return torch.exp((logp * self.valid[rows]).sum(dim=1))


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


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def long_scores(sparse: pd.DataFrame, prompts: pd.DataFrame, relation: str, method: str) -> pd.DataFrame:
    """:func:`sparsify` rows (whose ``prompt`` indexes ``prompts``) as SCORES table rows."""
    keys = prompts.iloc[sparse["prompt"].to_numpy()]
    return pd.DataFrame(
        {
            "relation": relation,
            "fact_id": keys["fact_id"].to_numpy(np.int32),
            "template_id": keys["template_id"].to_numpy(np.int32),
            "method": method,
            "layer": sparse["layer"].to_numpy(np.int16),
            "neuron": sparse["neuron"].to_numpy(np.int32),
            "score": sparse["score"].to_numpy(np.float32),
        }
    )


def attribute_prompts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: pd.DataFrame,
    relation: str,
    *,
    m: int,
    alpha_rule: str,
    target: str,
    batch_size: int,
    dtype: str,
    storage_ratio: float,
    codec: PromptCodec | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Integrated gradients and the activation baseline for prompt rows of one relation (SPEC §3).

    Returns (the stored scores, one row per prompt: gold / prediction / maxima), as the
    SCORES and SHARD_PROMPTS tables. Prompts whose object is not one token of the vocabulary
    are listed with gold_id -1 and not attributed. A causal LM (``codec``, default: the model's
    kind) is attributed at each prompt's last token; prompts of templates it does not use (or
    whose object cannot be separated from the prompt's tokens) are listed with gold_id -1;
    gold_id is the object's first token, gold_prob the probability IG attributes (the first
    token's, or with the ``sequence`` target the whole object's).
    """
    codec = codec or PromptCodec.of(model, tokenizer)
    if codec.causal:
        used = codec.usable_rows(prompts).index
        tokens = {k: codec.object_tokens(str(prompts.at[k, "prompt"]), str(prompts.at[k, "object"])) for k in used}
        usable = np.array([bool(tokens.get(k)) for k in prompts.index], dtype=bool)
        if not usable.all():
            log.warning("%d of %d prompts not attributed: template not used by a causal LM or object not separable "
                        "from the prompt", int((~usable).sum()), len(prompts))
    else:
        gold = {obj: object_token_id(tokenizer, obj) for obj in prompts["object"].unique()}
        usable = prompts["object"].map(gold).notna().to_numpy()
        if not usable.all():
            skipped = sorted(obj for obj, token in gold.items() if token is None)
            log.warning("%d prompts skipped: object(s) not one token of this vocabulary: %s", int((~usable).sum()), skipped[:10])
    studied = prompts[usable].reset_index(drop=True)
    table = prompts[["relation", "fact_id", "template_id"]].assign(
        gold_id=-1, gold_prob=np.nan, pred_id=-1, pred_token=None, correct=False, ig_max=np.nan, base_max=np.nan
    )
    frames = []
    if len(studied):
        if codec.causal:
            encoded = codec.encode(studied["prompt"].tolist())
            gold_ids = torch.tensor(codec.target_ids(studied["prompt"].tolist(), studied["object"].tolist()), dtype=torch.long)
            continuations = codec.continuations(studied["prompt"].tolist(), studied["object"].tolist())
        else:
            encoded = encode_prompts(tokenizer, studied["prompt"].tolist())
            gold_ids = torch.tensor([gold[obj] for obj in studied["object"]], dtype=torch.long)
            continuations = None
        plain = activation_scores(model, encoded, gold_ids, batch_size=batch_size)
        if continuations is not None:  # the sequence target: P(all object tokens | prompt), teacher-forced
            plain.target_prob = torch.from_numpy(
                score_continuations(model, encoded, continuations, batch_size=batch_size).prob.astype(np.float32))
        targets = gold_ids if target == "gold" else plain.pred_ids
        ig_scores = ig_attribution(model, encoded, targets, m=m, alpha_rule=alpha_rule, batch_size=batch_size,
                                   dtype=TORCH_DTYPES[dtype], continuations=continuations if target == "gold" else None)
        for method, scores in (("ig", ig_scores), ("base", plain.activations)):
            frames.append(long_scores(sparsify(scores, storage_ratio), studied, relation, method))
        index = np.flatnonzero(usable)
        table.loc[index, "gold_id"] = gold_ids.numpy()
        table.loc[index, "gold_prob"] = plain.target_prob.numpy()
        table.loc[index, "pred_id"] = plain.pred_ids.numpy()
        table.loc[index, "pred_token"] = tokenizer.convert_ids_to_tokens(plain.pred_ids.tolist())
        table.loc[index, "correct"] = (plain.pred_ids == gold_ids).numpy()  # same id <=> same vocabulary string
        table.loc[index, "ig_max"] = ig_scores.flatten(1).amax(dim=1).numpy()
        table.loc[index, "base_max"] = plain.activations.flatten(1).amax(dim=1).numpy()
    scores = pd.concat(frames, ignore_index=True) if frames else SCORES.empty()
    return scores, table
