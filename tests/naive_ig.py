"""Naive integrated-gradients reference, written like the authors' code (SPEC §3).

One prompt at a time, padded to 128; for every layer one batch of m copies through the
*unmodified* HF model, a forward hook overwriting the whole FFN activation vector at
[MASK] with step·k (a leaf that requires grad), and the gradient of the full-vocabulary
softmax probability of the target with respect to that leaf. Shares no code with the
fast path beyond the hook context managers, so agreement tests the fast path's algebra.
Used by tests/test_attribution.py and benchmarks/attribution_benchmark.py.

Causal LMs (:func:`naive_causal_ig`): one prompt at a time, unpadded; for every layer one
batch of m copies through the unmodified HF model (every position, every layer), a hook
overwriting the last prompt token's FFN vector, and the gradient of P(target) (or, given a
continuation, of P(all its tokens), teacher-forced) with respect to it.
"""

from __future__ import annotations

from typing import Sequence

import numpy
import torch
from torch import Tensor, nn

from kn.hooks import capture_activations, ffn_hooks
from kn.models.adapters import adapter_for
from kn.models.encoding import EncodedPrompts

ALPHA_OFFSET = {"left": 0.0, "right": 1.0, "midpoint": 0.5}


def _points(m: int, alpha_rule: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Multipliers of (a / m) and the weight of each point, written out independently of kn.attribution."""
    if alpha_rule == "gauss_legendre":  # nodes and weights on [-1, 1] mapped to [0, 1]; the point is a * alpha
        nodes, weights = numpy.polynomial.legendre.leggauss(m)
        return (torch.tensor((nodes + 1) / 2 * m, dtype=torch.float32, device=device),
                torch.tensor(weights / 2 * m, dtype=torch.float32, device=device))
    # Riemann sums: the point is (a / m) * (k + offset), each weighs 1
    return (torch.arange(m, dtype=torch.float32, device=device) + ALPHA_OFFSET[alpha_rule],
            torch.ones(m, dtype=torch.float32, device=device))


def naive_ig(
    model: nn.Module,
    encoded: EncodedPrompts,
    target_ids: Sequence[int] | Tensor,
    *,
    m: int = 20,
    alpha_rule: str = "left",
    layers: Sequence[int] | None = None,
    max_len: int = 128,
) -> Tensor:
    """IG scores [n_prompts, len(layers), ffn], float32 on CPU."""
    if adapter_for(model).causal:
        return naive_causal_ig(model, encoded, target_ids, m=m, alpha_rule=alpha_rule, layers=layers)
    device = next(model.parameters()).device
    chosen = list(range(adapter_for(model).n_layers)) if layers is None else list(layers)
    pad_id = model.config.pad_token_id or 0
    multipliers, point_weights = _points(m, alpha_rule, device)
    results = []
    for ids_list, position, target in zip(encoded.input_ids, encoded.mask_positions, list(target_ids)):
        ids = torch.full((1, max_len), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((1, max_len), dtype=torch.long, device=device)
        ids[0, : len(ids_list)] = torch.tensor(ids_list)
        mask[0, : len(ids_list)] = 1
        where = torch.tensor([position], device=device)
        with torch.no_grad(), capture_activations(model, where, chosen) as captured:
            model(input_ids=ids, attention_mask=mask)
        per_layer = []
        for layer in chosen:
            step = captured[layer][0] / m  # (a - baseline) / num_points, baseline = 0
            scaled = (step[None, :] * multipliers[:, None]).requires_grad_(True)

            def overwrite(act: Tensor, scaled: Tensor = scaled) -> Tensor:
                act = act.clone()
                act[:, position, :] = scaled
                return act

            with torch.enable_grad(), ffn_hooks(model, {layer: overwrite}):
                logits = model(input_ids=ids.expand(m, -1), attention_mask=mask.expand(m, -1)).logits
                prob = torch.softmax(logits[:, position, :], dim=-1)[:, int(target)]
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
            per_layer.append(step * (grad * point_weights[:, None]).sum(dim=0))
        results.append(torch.stack(per_layer).float().cpu())
    return torch.stack(results)


def naive_causal_ig(
    model: nn.Module,
    encoded: EncodedPrompts,
    target_ids: Sequence[int] | Tensor,
    *,
    m: int = 20,
    alpha_rule: str = "left",
    layers: Sequence[int] | None = None,
    continuations: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """IG scores [n_prompts, len(layers), ffn] of a causal LM at each prompt's last token, float32 on CPU."""
    device = next(model.parameters()).device
    chosen = list(range(adapter_for(model).n_layers)) if layers is None else list(layers)
    multipliers, point_weights = _points(m, alpha_rule, device)
    conts = [[int(t)] for t in list(target_ids)] if continuations is None else [list(c) for c in continuations]
    results = []
    for ids_list, position, cont in zip(encoded.input_ids, encoded.mask_positions, conts):
        ids = torch.tensor([list(ids_list) + cont[:-1]], dtype=torch.long, device=device)
        where = torch.tensor([position], device=device)
        with torch.no_grad(), capture_activations(model, where, chosen) as captured:
            model(input_ids=ids)
        per_layer = []
        for layer in chosen:
            step = captured[layer][0] / m
            scaled = (step[None, :] * multipliers[:, None]).requires_grad_(True)

            def overwrite(act: Tensor, scaled: Tensor = scaled) -> Tensor:
                act = act.clone()
                act[:, position, :] = scaled
                return act

            with torch.enable_grad(), ffn_hooks(model, {layer: overwrite}):
                logits = model(input_ids=ids.expand(m, -1)).logits
                if len(cont) == 1:
                    prob = torch.softmax(logits[:, position, :], dim=-1)[:, cont[0]]
                else:
                    logp = torch.log_softmax(logits[:, position : position + len(cont), :], dim=-1)
                    prob = torch.exp(logp[:, torch.arange(len(cont)), torch.tensor(cont)].sum(dim=1))
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
            per_layer.append(step * (grad * point_weights[:, None]).sum(dim=0))
        results.append(torch.stack(per_layer).float().cpu())
    return torch.stack(results)
