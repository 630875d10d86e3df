"""The one batched forward pass over prompts, read at each prompt's target position.

Probe, attribution's plain pass, suppress/amplify, editing, the web-sentence study and the
localisation diagnostic all score prompts the same way, here: the items (prompt indices,
repeats allowed) are sorted by prompt length, shortest first with ties in input order;
each batch holds ``batch_size`` of them, right-padded to its longest prompt with the one
pad id (:func:`pad_token_id`); the base model runs on the batch (under an optional
per-batch edit such as scaled neurons), FFN activations can be captured at the target
position, and the LM head runs on the target rows only (the vocabulary projection would
otherwise dominate the cost). The target position is the [MASK] of a masked LM and the last
prompt token of a causal LM (kn.models.encoding). :func:`score_continuations` reads a causal LM
at every position of a teacher-forced continuation (the object's tokens after the prompt).

Padding never changes a result: padded keys get attention weight exactly 0 (SPEC §1); causal LMs
are right-padded, so every real token keeps its position.

Edits at the target position of layer l (scaled neurons, zeroed sublayers) leave every block below l
as it was, so a pass under such an edit can resume at block l from the prompt's unedited pass
(:class:`PlainStates`) instead of starting again from the embeddings; an item that no edit reaches
reads the unedited logits. Masked LMs whose adapter can re-enter its blocks (``Adapter.resumable``)
take this path when the caller says, per item, the first block its edit changes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Collection, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kn.hooks import capture_activations
from kn.models.adapters import Adapter, adapter_for, model_device
from kn.models.encoding import EncodedPrompts, pad_sequences

BatchEdit = Callable[[Sequence[int], Tensor], ContextManager]  # (items of the batch, positions) -> context


def pad_token_id(model: nn.Module) -> int:
    """The pad id of every batch: the model's own (RoBERTa derives positions from it), else 0.

    Which id pads does not change any result, since padded positions are masked out; it only
    has to be a valid token id.
    """
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices into ``lengths``, shortest first (ties in input order), in chunks of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}; expected >= 1")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass
class TargetBatch:
    """One forward pass: which items it held and what it gives at their target positions."""

    items: list[int]  # indices into the pass's item list
    prompts: list[int]  # the prompt (index into the encoded prompts) of each item
    positions: Tensor  # [B] target positions, on the model's device
    logits: Tensor | None  # [B, V] float32 at the target positions (None unless asked for)
    activations: Tensor | None  # [B, len(capture), units] FFN activations at the target positions
    hidden_states: tuple[Tensor, ...] | None  # embeddings then every block's output, [B, T, H] each
    attention_mask: Tensor  # [B, T]


@dataclass
class PlainStates:
    """Unedited passes of some prompts, kept for edited passes that resume part-way (see the module doc).

    ``blocks[layer][prompt]``: block ``layer``'s input for that prompt, unpadded ``[T_p, H]``;
    ``logits[prompt]``: the LM head at its target position (float32 ``[V]``).
    """

    blocks: dict[int, dict[int, Tensor]]
    logits: dict[int, Tensor]


RESUMED_PROMPTS = 256  # prompts whose unedited states one resumed scoring holds at once (bounds memory on wide models)


def prompt_chunks(prompts: Sequence[int], max_prompts: int) -> list[list[int]]:
    """Indices into ``prompts`` (one prompt per item) in groups that cover at most ``max_prompts``
    distinct prompts each, in ascending prompt order; all items of a prompt share a group."""
    if max_prompts < 1:
        raise ValueError(f"max_prompts = {max_prompts}; expected >= 1")
    by_prompt: dict[int, list[int]] = {}
    for k, prompt in enumerate(prompts):
        by_prompt.setdefault(int(prompt), []).append(k)
    ordered = sorted(by_prompt)
    return [[k for prompt in ordered[i : i + max_prompts] for k in by_prompt[prompt]]
            for i in range(0, len(ordered), max_prompts)]


def unedited_chunks(model: nn.Module, encoded: EncodedPrompts, prompts: Sequence[int], starts: Sequence[Collection[int]],
                    *, max_prompts: int, batch_size: int) -> Iterator[tuple[list[int], PlainStates | None]]:
    """Groups of items (indices into ``prompts``, one prompt each) with the unedited states their edited
    passes resume from; ``starts[k]``: the blocks item k's passes start at. Each group covers at most
    ``max_prompts`` prompts (:func:`prompt_chunks`). An adapter that cannot resume gets one group of every
    item and no states, so its passes run in full."""
    if len(starts) != len(prompts):
        raise ValueError(f"{len(starts)} start-block sets for {len(prompts)} items")
    if not adapter_for(model).resumable:
        yield list(range(len(prompts))), None
        return
    for indices in prompt_chunks(prompts, max_prompts):
        layers = {int(layer) for k in indices for layer in starts[k]}
        yield indices, plain_states(model, encoded, [prompts[k] for k in indices], sorted(layers), batch_size=batch_size)


def plain_states(model: nn.Module, encoded: EncodedPrompts, prompts: Sequence[int], layers: Sequence[int], *,
                 batch_size: int) -> PlainStates:
    """One unedited pass over ``prompts`` (indices into ``encoded``), keeping the inputs of ``layers``."""
    keep = sorted(set(int(layer) for layer in layers))
    n_layers = adapter_for(model).n_layers
    if any(not 0 <= layer < n_layers for layer in keep):
        raise IndexError(f"layers {keep}: the model has blocks 0..{n_layers - 1}")
    states = PlainStates({layer: {} for layer in keep}, {})
    unique = sorted(set(int(p) for p in prompts))
    for batch in target_passes(model, encoded, batch_size=batch_size, items=unique, all_hidden=bool(keep)):
        assert batch.logits is not None
        lengths = batch.attention_mask.sum(dim=1).tolist()
        for row, prompt in enumerate(batch.prompts):
            states.logits[prompt] = batch.logits[row]
            for layer in keep:
                assert batch.hidden_states is not None
                states.blocks[layer][prompt] = batch.hidden_states[layer][row, : lengths[row]].clone()
    return states


def target_passes(
    model: nn.Module,
    encoded: EncodedPrompts,
    *,
    batch_size: int,
    items: Sequence[int] | None = None,
    edit: BatchEdit | None = None,
    capture: Sequence[int] | None = None,
    logits: bool = True,
    all_hidden: bool = False,
    progress: str | None = None,
    resume: PlainStates | None = None,
    first_edited: Sequence[int | None] | None = None,
) -> Iterator[TargetBatch]:
    """Batched forward passes (no gradient) over ``items`` (default: every prompt once), see the module doc.

    With ``resume`` (the items' :func:`plain_states`) and ``first_edited`` (per item, the first block
    ``edit`` changes for it, or None where it changes nothing), each item resumes at that block, or
    reads its unedited logits; such passes capture nothing. Without ``resume``, ``first_edited`` is not
    read: every item runs in full (see :func:`unedited_chunks`).
    """
    adapter = adapter_for(model)
    device = model_device(model)
    prompt_of = list(range(len(encoded))) if items is None else [int(i) for i in items]
    if resume is not None:
        if first_edited is None or len(first_edited) != len(prompt_of):
            raise ValueError(f"resume needs first_edited for each of the {len(prompt_of)} items")
        if capture is not None or all_hidden or not logits:
            raise ValueError("a resumed pass gives logits only (no captured activations or hidden states)")
        yield from _resumed_passes(adapter, encoded, prompt_of, first_edited, resume, batch_size, edit, progress)
        return
    head = adapter.lm_head() if logits else None
    batches = length_sorted_batches([len(encoded.input_ids[p]) for p in prompt_of], batch_size)
    pad = pad_token_id(model)
    for batch in tqdm(batches, desc=progress, unit="batch", disable=progress is None, mininterval=5.0):
        prompts = [prompt_of[k] for k in batch]
        ids, mask = pad_sequences([encoded.input_ids[p] for p in prompts], pad, device)
        positions = torch.tensor([encoded.mask_positions[p] for p in prompts], dtype=torch.long, device=device)
        rows = torch.arange(len(batch), device=device)
        with torch.no_grad(), (edit(batch, positions) if edit else contextlib.nullcontext()), (
            capture_activations(model, positions, capture) if capture is not None else contextlib.nullcontext({})
        ) as captured:
            hidden = adapter.hidden_states(ids, mask, all_layers=all_hidden)
            out = head(hidden[-1][rows, positions]).float() if head is not None else None
        acts = torch.stack([captured[layer] for layer in capture], dim=1) if capture else None
        yield TargetBatch(batch, prompts, positions, out, acts, hidden if all_hidden else None, mask)


def _resumed_passes(adapter: Adapter, encoded: EncodedPrompts, prompt_of: list[int], first_edited: Sequence[int | None],
                    states: PlainStates, batch_size: int, edit: BatchEdit | None, progress: str | None) -> Iterator[TargetBatch]:
    """:func:`target_passes` for items that resume at their first edited block (grouped by that block)."""
    if not adapter.resumable:
        raise ValueError(f"{type(adapter).__name__} cannot resume a pass at a block; run full passes")
    device = model_device(adapter.model)
    head = adapter.lm_head()
    pad = pad_token_id(adapter.model)
    groups: dict[int | None, list[int]] = {}
    for k, layer in enumerate(first_edited):
        groups.setdefault(None if layer is None else int(layer), []).append(k)
    plan = []  # (first edited block or None, item indices of one batch)
    for layer in sorted(groups, key=lambda value: -1 if value is None else value):
        members = groups[layer]
        if layer is not None and layer not in states.blocks:
            raise KeyError(f"no unedited inputs of block {layer} were kept (plain_states layers {sorted(states.blocks)})")
        for batch in length_sorted_batches([len(encoded.input_ids[prompt_of[k]]) for k in members], batch_size):
            plan.append((layer, [members[i] for i in batch]))
    for layer, batch in tqdm(plan, desc=progress, unit="batch", disable=progress is None, mininterval=5.0):
        prompts = [prompt_of[k] for k in batch]
        missing = [p for p in prompts if p not in states.logits]
        if missing:
            raise KeyError(f"prompts {missing[:5]} have no unedited pass in the given PlainStates")
        ids, mask = pad_sequences([encoded.input_ids[p] for p in prompts], pad, device)
        positions = torch.tensor([encoded.mask_positions[p] for p in prompts], dtype=torch.long, device=device)
        if layer is None:
            out = torch.stack([states.logits[p] for p in prompts]).to(device)
        else:
            inputs = states.blocks[layer]
            hidden = torch.zeros((len(prompts), ids.shape[1], inputs[prompts[0]].shape[-1]), dtype=inputs[prompts[0]].dtype,
                                 device=device)
            for row, p in enumerate(prompts):
                hidden[row, : inputs[p].shape[0]] = inputs[p]
            rows = torch.arange(len(batch), device=device)
            with torch.no_grad(), (edit(batch, positions) if edit else contextlib.nullcontext()):
                out = head(adapter.run_blocks_from(layer, hidden, mask)[rows, positions]).float()
        yield TargetBatch(batch, prompts, positions, out, None, None, mask)


def target_logits(model: nn.Module, encoded: EncodedPrompts, *, batch_size: int, items: Sequence[int] | None = None,
                  edit: BatchEdit | None = None) -> Tensor:
    """Float32 logits ``[len(items), V]`` on the CPU, in item order."""
    n_items = len(encoded) if items is None else len(items)
    out: Tensor | None = None
    for batch in target_passes(model, encoded, batch_size=batch_size, items=items, edit=edit):
        assert batch.logits is not None
        if out is None:
            out = torch.empty((n_items, batch.logits.shape[1]), dtype=torch.float32)
        out[torch.tensor(batch.items)] = batch.logits.cpu()
    if out is None:
        return torch.empty((0, adapter_for(model).output_embeddings().shape[0]), dtype=torch.float32)
    return out


@dataclass
class TargetScores:
    """Per item: P(target) (full-vocabulary softmax), the target's rank (1 = top, ties in its favour) and the argmax."""

    prob: np.ndarray  # float32; NaN where the item has no target (negative id)
    rank: np.ndarray  # int32; -1 where the item has no target
    pred: np.ndarray  # int64


def score_targets(
    model: nn.Module,
    encoded: EncodedPrompts,
    targets: Sequence[int],
    *,
    batch_size: int,
    items: Sequence[int] | None = None,
    edit: BatchEdit | None = None,
    progress: str | None = None,
    resume: PlainStates | None = None,
    first_edited: Sequence[int | None] | None = None,
) -> TargetScores:
    """Probability, rank and argmax of each item's target token (one target id per item); ``resume`` and
    ``first_edited`` as in :func:`target_passes`."""
    n_items = len(encoded) if items is None else len(items)
    if len(targets) != n_items:
        raise ValueError(f"{len(targets)} target ids for {n_items} items")
    scores = TargetScores(np.full(n_items, np.nan, dtype=np.float32), np.full(n_items, -1, dtype=np.int32),
                          np.zeros(n_items, dtype=np.int64))
    for batch in target_passes(model, encoded, batch_size=batch_size, items=items, edit=edit, progress=progress,
                               resume=resume, first_edited=first_edited):
        assert batch.logits is not None
        probs = torch.softmax(batch.logits, dim=-1)
        gold = torch.tensor([max(0, int(targets[k])) for k in batch.items], device=probs.device)
        rows = torch.arange(len(batch.items), device=probs.device)
        target_logit = batch.logits[rows, gold]
        rank = (batch.logits > target_logit[:, None]).sum(dim=-1) + 1
        has = np.array([int(targets[k]) >= 0 for k in batch.items])
        index = np.array(batch.items)
        scores.pred[index] = batch.logits.argmax(dim=-1).cpu().numpy()
        scores.prob[index[has]] = probs[rows, gold].cpu().numpy()[has]
        scores.rank[index[has]] = rank.cpu().numpy().astype(np.int32)[has]
    return scores


@dataclass
class ContinuationScores:
    """Per item, a causal LM reading a continuation teacher-forced after the prompt.

    ``logprob``: log P(all continuation tokens | prompt) (sum over its tokens); ``prob`` its exp;
    ``greedy``: whether greedy decoding from the prompt writes exactly the continuation (every
    teacher-forced step's argmax is the next token); ``first``: the :class:`TargetScores` of
    its first token alone. NaN / -1 / False where an item has no continuation.
    """

    logprob: np.ndarray  # float64
    prob: np.ndarray  # float64
    greedy: np.ndarray  # bool
    first: TargetScores


def score_continuations(
    model: nn.Module,
    encoded: EncodedPrompts,
    continuations: Sequence[Sequence[int]],
    *,
    batch_size: int,
    items: Sequence[int] | None = None,
    edit: BatchEdit | None = None,
    progress: str | None = None,
) -> ContinuationScores:
    """Teacher-forced scores of ``continuations[k]`` (token ids) after the prompt of item k (a causal LM).

    The model reads prompt + continuation[:-1]; position target + s predicts continuation[s].
    ``edit`` (e.g. scaled neurons) gets each item's prompt target position, as in :func:`target_passes`.
    """
    adapter = adapter_for(model)
    if not adapter.causal:
        raise ValueError("continuations are scored by causal LMs only; a masked LM reads one [MASK]")
    device = model_device(model)
    prompt_of = list(range(len(encoded))) if items is None else [int(i) for i in items]
    if len(continuations) != len(prompt_of):
        raise ValueError(f"{len(continuations)} continuations for {len(prompt_of)} items")
    n = len(prompt_of)
    out = ContinuationScores(np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, dtype=bool),
                             TargetScores(np.full(n, np.nan, dtype=np.float32), np.full(n, -1, dtype=np.int32),
                                          np.zeros(n, dtype=np.int64)))
    sequences = [list(encoded.input_ids[p]) + [int(t) for t in continuations[k][:-1]] for k, p in enumerate(prompt_of)]
    head = adapter.lm_head()
    pad = pad_token_id(model)
    for batch in tqdm(length_sorted_batches([len(s) for s in sequences], batch_size), desc=progress, unit="batch",
                      disable=progress is None, mininterval=5.0):
        scored = [k for k in batch if len(continuations[k])]
        if not scored:
            continue
        ids, mask = pad_sequences([sequences[k] for k in scored], pad, device)
        positions = torch.tensor([encoded.mask_positions[prompt_of[k]] for k in scored], dtype=torch.long, device=device)
        rows = torch.cat([torch.full((len(continuations[k]),), r, dtype=torch.long) for r, k in enumerate(scored)]).to(device)
        cols = torch.cat([positions[r] + torch.arange(len(continuations[k]), device=device) for r, k in enumerate(scored)])
        gold = torch.tensor([int(t) for k in scored for t in continuations[k]], dtype=torch.long, device=device)
        with torch.no_grad(), (edit(scored, positions) if edit else contextlib.nullcontext()):
            (hidden,) = adapter.hidden_states(ids, mask)
            logits = head(hidden[rows, cols]).float()
        logp = torch.log_softmax(logits, dim=-1)
        token_logp = logp.gather(1, gold[:, None])[:, 0].double().cpu()
        hit = (logits.argmax(-1) == gold).cpu()
        start = 0
        for r, k in enumerate(scored):
            length = len(continuations[k])
            out.logprob[k] = float(token_logp[start : start + length].sum())
            out.greedy[k] = bool(hit[start : start + length].all())
            first_logits = logits[start]
            out.first.prob[k] = float(torch.softmax(first_logits, -1)[gold[start]])
            out.first.rank[k] = int((first_logits > first_logits[gold[start]]).sum()) + 1
            out.first.pred[k] = int(first_logits.argmax())
            start += length
    out.prob = np.exp(out.logprob)
    return out
