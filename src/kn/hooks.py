"""Forward hooks on FFN activation modules, as context managers that always remove themselves.

Every intervention in the pipeline (capturing activations, scaling neurons, the IG
patch) goes through :func:`ffn_hooks`, whose ``finally`` removes each handle even when
the body raises, so a model is never left modified.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from kn.models.arch import ffn_activation_modules, value_projections

ActivationEdit = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def ffn_hooks(model: nn.Module, edits: Mapping[int, ActivationEdit]) -> Iterator[None]:
    """Run ``edits[layer](activation)`` on the FFN activation output of each named layer.

    An edit returns a replacement tensor or None (observe only). Activations are
    ``[batch, seq, ffn]``.
    """
    modules = ffn_activation_modules(model)
    handles = []
    try:
        for layer, edit in edits.items():
            if not 0 <= layer < len(modules):
                raise IndexError(f"layer {layer} out of range: model has {len(modules)} FFN layers")

            def hook(_module: nn.Module, _inputs: object, output: torch.Tensor, edit: ActivationEdit = edit):
                return edit(output)

            handles.append(modules[layer].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_activations(
    model: nn.Module, positions: torch.Tensor, layers: Sequence[int] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Record each layer's FFN activations at one position per row (e.g. the [MASK]).

    Yields a dict filled during the forward pass: ``{layer: [batch, ffn]}`` (detached).
    """
    n_layers = len(ffn_activation_modules(model))
    captured: dict[int, torch.Tensor] = {}
    rows = torch.arange(positions.shape[0], device=positions.device)

    def make(layer: int) -> ActivationEdit:
        def record(act: torch.Tensor) -> None:
            captured[layer] = act[rows, positions].detach()
            return None

        return record

    with ffn_hooks(model, {layer: make(layer) for layer in (layers if layers is not None else range(n_layers))}):
        yield captured


@contextlib.contextmanager
def scale_neurons(
    model: nn.Module,
    neurons: Sequence[tuple[int, int]],
    factor: float,
    positions: torch.Tensor,
) -> Iterator[None]:
    """Multiply the given (layer, neuron) activations at one position per row by ``factor``.

    All layers are changed in one pass, in layer order, so a later layer sees earlier
    changes (SPEC §5). ``factor=0`` suppresses, ``factor=2`` amplifies.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, unit in neurons:
        by_layer.setdefault(int(layer), []).append(int(unit))
    rows = torch.arange(positions.shape[0], device=positions.device)

    def make(units: list[int]) -> ActivationEdit:
        index = torch.tensor(units, dtype=torch.long)

        def edit(act: torch.Tensor) -> torch.Tensor:
            act = act.clone()
            idx = index.to(act.device)
            act[rows[:, None], positions[:, None], idx[None, :]] *= factor
            return act

        return edit

    with ffn_hooks(model, {layer: make(units) for layer, units in by_layer.items()}):
        yield


@contextlib.contextmanager
def edited_value_slots(model: nn.Module, new_slots: Mapping[tuple[int, int], torch.Tensor]) -> Iterator[None]:
    """Overwrite value slots (columns of the FFN output projection) for the body, then restore them.

    Weight edits (SPEC §7, §8) are undone by copying back the saved columns, not by inverse
    arithmetic, so the model is bit-identical afterwards (SPEC §11.8), even when the body
    raises. Writes happen under ``torch.no_grad()`` (SPEC §11.7). Only the in-memory model
    changes; nothing is written to disk.
    """
    projections = value_projections(model)
    saved: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (layer, unit), column in new_slots.items():
                if not 0 <= layer < len(projections):
                    raise IndexError(f"layer {layer} out of range: model has {len(projections)} FFN layers")
                weight = projections[layer].weight
                if not 0 <= unit < weight.shape[1]:
                    raise IndexError(f"neuron {unit} out of range: layer {layer} has {weight.shape[1]} FFN units")
                if column.shape != (weight.shape[0],):
                    raise ValueError(f"value slot ({layer}, {unit}) needs shape ({weight.shape[0]},), got {tuple(column.shape)}")
                saved.append((weight, unit, weight[:, unit].clone()))
                weight[:, unit] = column.to(device=weight.device, dtype=weight.dtype)
        yield
    finally:
        with torch.no_grad():
            for weight, unit, original in reversed(saved):
                weight[:, unit] = original
