"""Resumed passes (kn.models.forward.PlainStates): an edit's pass that restarts at its first edited block
gives what the full pass under the same edit gives, on every masked architecture that can re-enter its blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kn.hooks import attention_output_hooks, scale_neurons_per_row
from kn.models.adapters import adapter_for
from kn.models.encoding import EncodedPrompts
from kn.models.forward import plain_states, prompt_chunks, score_targets, target_passes, unedited_chunks
from tests.tiny_models import MASKED_KINDS, tiny

LAYERS = 4


def random_prompts(vocab: int, n: int, seed: int) -> EncodedPrompts:
    """Prompts of 3-9 tokens (so batches pad), each with one target position."""
    rng = np.random.default_rng(seed)
    ids, positions = [], []
    for _ in range(n):
        length = int(rng.integers(3, 10))
        ids.append([int(t) for t in rng.integers(3, vocab, size=length)])
        positions.append(int(rng.integers(0, length)))
    return EncodedPrompts(ids, positions)


def scaling_rows(n_items: int, ffn: int, seed: int) -> tuple[list[list[tuple[int, int]]], list[float]]:
    """Per item a random neuron set (empty for every fifth item) and a factor (0, 2 or 0.5)."""
    rng = np.random.default_rng(seed)
    sets, factors = [], []
    for k in range(n_items):
        size = 0 if k % 5 == 0 else int(rng.integers(1, 6))
        sets.append([(int(rng.integers(0, LAYERS)), int(rng.integers(0, ffn))) for _ in range(size)])
        factors.append(float(rng.choice([0.0, 2.0, 0.5])))
    return sets, factors


@pytest.mark.parametrize("kind", [k for k in MASKED_KINDS if k != "distilbert"])
def test_resumed_scaling_equals_full_passes(kind: str) -> None:
    model = tiny(kind, layers=LAYERS)
    encoded = random_prompts(60, 7, seed=1)
    items = [k % 7 for k in range(23)]  # repeats: several edits of one prompt
    sets, factors = scaling_rows(len(items), 64, seed=2)
    targets = [int(t) for t in np.random.default_rng(3).integers(3, 60, size=len(items))]

    def edit(batch, positions):
        return scale_neurons_per_row(model, [sets[k] for k in batch], [factors[k] for k in batch], positions)

    full = score_targets(model, encoded, targets, batch_size=4, items=items, edit=edit)
    first = [min(layer for layer, _ in sets[k]) if sets[k] else None for k in range(len(items))]
    states = plain_states(model, encoded, items, [f for f in first if f is not None], batch_size=3)
    resumed = score_targets(model, encoded, targets, batch_size=4, items=items, edit=edit, resume=states, first_edited=first)
    np.testing.assert_allclose(resumed.prob, full.prob, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(resumed.pred, full.pred)
    assert {f for f in first} >= {None, 1}  # both kinds of item, and resumption above block 0, were exercised
    plain = score_targets(model, encoded, targets, batch_size=4, items=items)
    changed = [k for k in range(len(items)) if sets[k] and factors[k] != 1.0]
    assert not np.allclose(resumed.prob[changed], plain.prob[changed])  # the edits did change the scaled items


def test_resumed_attention_zeroing_equals_full_pass() -> None:
    model = tiny("bert", layers=LAYERS)
    encoded = random_prompts(60, 6, seed=4)

    def zero_at_target(batch, positions):
        def zero(output: torch.Tensor) -> torch.Tensor:
            out = output.clone()
            out[torch.arange(len(batch)), positions] = 0.0
            return out
        return attention_output_hooks(model, {2: zero, 3: zero})

    targets = list(range(3, 9))
    full = score_targets(model, encoded, targets, batch_size=4, edit=zero_at_target)
    states = plain_states(model, encoded, range(6), [2], batch_size=4)
    resumed = score_targets(model, encoded, targets, batch_size=4, edit=zero_at_target, resume=states, first_edited=[2] * 6)
    np.testing.assert_allclose(resumed.prob, full.prob, rtol=1e-5, atol=1e-7)
    clean = score_targets(model, encoded, targets, batch_size=2, resume=states, first_edited=[None] * 6)
    np.testing.assert_allclose(clean.prob, score_targets(model, encoded, targets, batch_size=4).prob, rtol=1e-6)


def test_resume_needs_states_of_the_block_and_prompt() -> None:
    model = tiny("bert", layers=LAYERS)
    encoded = random_prompts(60, 4, seed=5)
    states = plain_states(model, encoded, [0, 1], [2], batch_size=4)
    with pytest.raises(KeyError, match="block 1"):
        list(target_passes(model, encoded, batch_size=4, items=[0], resume=states, first_edited=[1]))
    with pytest.raises(KeyError, match="prompts \\[3\\]"):
        list(target_passes(model, encoded, batch_size=4, items=[3], resume=states, first_edited=[2]))
    with pytest.raises(ValueError, match="first_edited"):
        list(target_passes(model, encoded, batch_size=4, items=[0, 1], resume=states, first_edited=[2]))
    with pytest.raises(IndexError, match="blocks 0..3"):
        plain_states(model, encoded, [0], [4], batch_size=4)
    distil = tiny("distilbert", layers=LAYERS)
    assert not adapter_for(distil).resumable
    with pytest.raises(ValueError, match="cannot resume"):
        list(target_passes(distil, encoded, batch_size=4, items=[0], resume=states, first_edited=[2]))


def test_prompt_chunks_keep_each_prompts_items_together() -> None:
    prompts = [5, 2, 5, 9, 2, 7]
    assert prompt_chunks(prompts, 2) == [[1, 4, 0, 2], [5, 3]]  # prompts {2, 5}, then {7, 9}
    assert prompt_chunks(prompts, 10) == [[1, 4, 0, 2, 5, 3]]
    assert prompt_chunks([], 3) == []
    with pytest.raises(ValueError, match="max_prompts"):
        prompt_chunks(prompts, 0)


def test_unedited_chunks_hold_each_groups_start_blocks_or_nothing_where_passes_cannot_resume() -> None:
    encoded = random_prompts(60, 4, seed=9)
    prompts, starts = [3, 1, 3, 0], [(2,), (), (1,), (3,)]
    model = tiny("bert", layers=LAYERS)
    groups = list(unedited_chunks(model, encoded, prompts, starts, max_prompts=2, batch_size=4))
    assert [indices for indices, _ in groups] == [[3, 1], [0, 2]]  # prompts {0, 1}, then {3}
    assert [sorted(states.blocks) for _, states in groups] == [[3], [1, 2]]
    assert [sorted(states.logits) for _, states in groups] == [[0, 1], [3]]
    distil = tiny("distilbert", layers=LAYERS)
    assert list(unedited_chunks(distil, encoded, prompts, starts, max_prompts=2, batch_size=4)) == [([0, 1, 2, 3], None)]
    with pytest.raises(ValueError, match="start-block sets"):
        list(unedited_chunks(model, encoded, prompts, starts[:2], max_prompts=2, batch_size=4))
