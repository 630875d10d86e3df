"""Every hook the pipeline puts on a model, as context managers that always remove themselves.

Activations are read and changed through a forward pre-hook on each layer's value (down)
projection, whose input is the FFN neuron vector on every architecture (kn.models.adapters);
attention outputs through a forward hook on the attention output projection; value slots
through a writable view of the down projection's weight. Each context's ``finally`` removes
its handles (or restores the saved weights) even when the body raises, so a model is never
left modified.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from torch import nn

from kn.models.adapters import Adapter, adapter_for

Neuron = tuple[int, int]
ActivationEdit = Callable[[torch.Tensor], "torch.Tensor | None"]


def _check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer} out of range: model has {n_layers} FFN layers")


@contextlib.contextmanager
def _layer_hooks(model: nn.Module, edits: Mapping[int, ActivationEdit], on_input: bool,
                 module_of: Callable[[Adapter, int], nn.Module]) -> Iterator[None]:
    """One hook per named layer on ``module_of(adapter, layer)``: on its input (a pre-hook) or its output."""
    adapter = adapter_for(model)
    handles = []
    try:
        for layer, edit in edits.items():
            _check_layer(layer, adapter.n_layers)
            module = module_of(adapter, layer)
            if on_input:
                def pre_hook(_module: nn.Module, inputs: tuple, edit: ActivationEdit = edit):
                    replaced = edit(inputs[0])
                    return None if replaced is None else (replaced, *inputs[1:])

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                handles.append(module.register_forward_hook(lambda _m, _i, output, edit=edit: edit(output)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def ffn_hooks(model: nn.Module, edits: Mapping[int, ActivationEdit]) -> ContextManager[None]:
    """Run ``edits[layer](activation)`` on the FFN neuron vector ``[batch, seq, units]`` of each named layer.

    An edit returns a replacement tensor or None (observe only); the replacement is what the
    down projection then reads.
    """
    return _layer_hooks(model, edits, True, Adapter.value_projection)


def attention_output_hooks(model: nn.Module, edits: Mapping[int, ActivationEdit]) -> ContextManager[None]:
    """Run ``edits[layer](output)`` on what each named layer's attention sublayer adds ``[batch, seq, hidden]``.

    The output projection's output, before any residual add or norm: replacing it with
    zeros removes attention's contribution while the residual stream passes unchanged.
    """
    return _layer_hooks(model, edits, False, Adapter.attention_output)


@contextlib.contextmanager
def _capture_inputs(model: nn.Module, positions: torch.Tensor | None, layers: Sequence[int],
                    module_of: Callable[[Adapter, int], nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input of ``module_of(adapter, layer)`` for each layer, at one position per row or everywhere."""
    captured: dict[int, torch.Tensor] = {}
    rows = None if positions is None else torch.arange(positions.shape[0], device=positions.device)

    def make(layer: int) -> ActivationEdit:
        def record(value: torch.Tensor) -> None:
            captured[layer] = (value if rows is None else value[rows, positions]).detach()
            return None

        return record

    with _layer_hooks(model, {layer: make(layer) for layer in layers}, True, module_of):
        yield captured


def capture_activations(
    model: nn.Module, positions: torch.Tensor | None, layers: Sequence[int] | None = None
) -> ContextManager[dict[int, torch.Tensor]]:
    """Record each layer's FFN neuron vector at one position per row (e.g. the [MASK]), or at every position
    (``positions`` None).

    Yields a dict filled during the forward pass: ``{layer: [batch, units]}`` (or ``[batch, seq, units]``), detached.
    """
    chosen = range(adapter_for(model).n_layers) if layers is None else layers
    return _capture_inputs(model, positions, chosen, Adapter.value_projection)


@contextlib.contextmanager
def scale_neurons(
    model: nn.Module,
    neurons: Sequence[Neuron],
    factor: float,
    positions: torch.Tensor,
) -> Iterator[None]:
    """Multiply the given (layer, neuron) activations at one position per row by ``factor``.

    All layers are changed in one pass, in layer order, so a later layer sees earlier
    changes (SPEC §5). ``factor=0`` suppresses, ``factor=2`` amplifies.
    """
    with scale_neurons_per_row(model, [neurons] * positions.shape[0], [factor] * positions.shape[0], positions):
        yield


@contextlib.contextmanager
def scale_neurons_per_row(
    model: nn.Module, neuron_sets: Sequence[Sequence[Neuron]], factors: Sequence[float], positions: torch.Tensor
) -> Iterator[None]:
    """Row r of the batch gets ``neuron_sets[r]`` multiplied by ``factors[r]`` at ``positions[r]``.

    Batching rows with different neuron sets (different facts, conditions, doses) into one
    forward pass is what keeps evaluation fast; every element is one in-place multiply.
    """
    if not len(neuron_sets) == len(factors) == positions.shape[0]:
        raise ValueError(f"{len(neuron_sets)} neuron sets, {len(factors)} factors, {positions.shape[0]} positions")
    by_layer: dict[int, tuple[list[int], list[int], list[float]]] = {}
    for row, (neurons, factor) in enumerate(zip(neuron_sets, factors)):
        for layer, unit in neurons:
            row_idx, unit_idx, row_factors = by_layer.setdefault(int(layer), ([], [], []))
            row_idx.append(row)
            unit_idx.append(int(unit))
            row_factors.append(float(factor))
    device = positions.device

    def make(row_idx: list[int], unit_idx: list[int], row_factors: list[float]) -> ActivationEdit:
        rows_t = torch.tensor(row_idx, dtype=torch.long, device=device)
        index = (rows_t, positions[rows_t], torch.tensor(unit_idx, dtype=torch.long, device=device))
        factors_t = torch.tensor(row_factors, dtype=torch.float32, device=device)

        def edit(act: torch.Tensor) -> torch.Tensor:
            act = act.clone()
            act[index] *= factors_t.to(dtype=act.dtype)
            return act

        return edit

    with ffn_hooks(model, {layer: make(*spec) for layer, spec in sorted(by_layer.items())}):
        yield


@contextlib.contextmanager
def edited_value_slots(model: nn.Module, new_slots: Mapping[Neuron, torch.Tensor]) -> Iterator[None]:
    """Overwrite value slots for the body, then restore them.

    Weight edits (SPEC §7, §8) are undone by copying back the saved slots, not by inverse
    arithmetic, so the model is bit-identical afterwards (SPEC §11.8), even when the body
    raises. Writes happen under ``torch.no_grad()`` (SPEC §11.7). Only the in-memory model
    changes; nothing is written to disk.
    """
    adapter = adapter_for(model)
    saved: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (layer, unit), slot in new_slots.items():
                _check_layer(layer, adapter.n_layers)
                slots = adapter.value_slots(layer)
                if not 0 <= unit < slots.shape[0]:
                    raise IndexError(f"neuron {unit} out of range: layer {layer} has {slots.shape[0]} FFN units")
                if slot.shape != (slots.shape[1],):
                    raise ValueError(f"value slot ({layer}, {unit}) needs shape ({slots.shape[1]},), got {tuple(slot.shape)}")
                saved.append((slots, unit, slots[unit].clone()))
                slots[unit] = slot.to(device=slots.device, dtype=slots.dtype)
        yield
    finally:
        with torch.no_grad():
            for slots, unit, original in reversed(saved):
                slots[unit] = original


def capture_ffn_inputs(
    model: nn.Module, positions: torch.Tensor | None, layers: Sequence[int]
) -> ContextManager[dict[int, torch.Tensor]]:
    """Record what each named layer's FFN reads (its up projection's input) at one position per row, or at every
    position (``positions`` None).

    Yields ``{layer: [batch, hidden]}`` (or ``[batch, seq, hidden]``), detached, filled during the forward pass:
    the vectors a unit's key is matched against.
    """
    return _capture_inputs(model, positions, layers, Adapter.key_projection)


@contextlib.contextmanager
def added_value(model: nn.Module, layer: int, unit: int, value: torch.Tensor) -> Iterator[None]:
    """Add ``activation[unit] * value`` to layer ``layer``'s FFN output at every position.

    The same as ``value`` added to the unit's value slot, but ``value`` may require grad, so a
    value vector can be optimised through the model without touching its weights.
    """
    adapter = adapter_for(model)
    _check_layer(layer, adapter.n_layers)

    def add(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + inputs[0][..., unit : unit + 1] * value.to(output.dtype)

    handle = adapter.value_projection(layer).register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
