"""Positive controls, part one: plant facts the model does not know into known FFN units of a copy of it.

Each planted unit is a key-value memory (Geva et al. 2021): its key (a row of the FFN's up projection and its
bias) fires on the fact's prompts and stays quiet on other prompts, and its value slot (a row of the down
projection) makes the fact's object the model's answer. The unchanged study then runs on the copy
(``workflow/rules/controls.smk``), and :mod:`kn.controls` reads how much of the planted storage it recovers.

**Natural scale.** A planted unit's activation on its fact's prompts stays at or below the layer's own
``activation_quantile`` activation on ParaRel prompts, and its value slot's norm at or below the largest natural
value-slot norm of its layer. A control that wins only by being loud would measure nothing. A fact that one such
unit cannot carry gets more units with the same key, whose values add up; the fewest units that carry it are the
model's own answer to how many neurons one fact takes here.

**Which facts.** ParaRel facts the model does not answer (its top-1 is the object on none of the fact's prompts),
whose object is a target the model can score, whose subject the tokenizer does not read as mostly unknown
tokens, and which no study of the run uses: for a trained organism the facts after its training set (it has
never seen the subject), for a pretrained model the facts after the studied ones. The planted answer is the
fact's true object.

**How.** Layer by layer, bottom to top (so a fact's inputs include every planting below it). A fact's templates
are split (seeded) into key, validation and test templates. Its key (:func:`fact_key`) is built from the key
prompts alone: their FFN input minus each template's mean over other facts, whitened, thresholded so that no
quiet token (any position of other prompts, or of its own prompts but their target) fires it. Its value is
optimised through the model (projected gradient ascent on the object's log-probability over the key prompts)
within the norm budget of U units, U the fewest (a search) at which the object is top-1 there. A fact is kept only if that holds on its
validation prompts; the test prompts decide nothing and measure the planting (acceptance). Units overwritten are
the layer's least active over every position.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from kn.hooks import added_value, capture_activations, capture_ffn_inputs
from kn.models.adapters import adapter_for, model_device
from kn.models.encoding import EncodedPrompts, PromptCodec, pad_sequences
from kn.models.forward import pad_token_id, score_targets, target_passes

log = logging.getLogger("kn.planting")

# Acceptance of a planting (fixed before any planting ran): the object top-1 on the planted facts' prompts of
# templates not used for the keys, and the studied (unplanted) facts as they were.
ACCEPT_TOP1 = 0.90
ACCEPT_STUDIED_CHANGED = 0.01  # share of studied prompts whose top-1 prediction changes, at most
ACCEPT_STUDIED_PROB = 0.01  # relative change of their mean gold probability, at most
QUIET_SHARE = 0.10  # a planted unit "fires" on a prompt above this share of its median activation on its own fact


@dataclass(frozen=True)
class PlantingSettings:
    """The ``controls`` config section (conf/config.yaml documents each key) and the run's seed."""

    facts_per_relation: int
    max_relations: int | None
    layers: tuple[int, ...] | None
    units_per_fact: int | None  # None: the fewest that carry the fact (searched)
    max_units_per_fact: int
    key_template_share: float
    activation_quantile: float
    background_prompts: int
    value_steps: int
    max_subject_unk_share: float
    seed: int

    @classmethod
    def of(cls, section: Mapping[str, Any], seed: int) -> "PlantingSettings":
        units = section["units_per_fact"]
        layers = section["layers"]
        return cls(int(section["facts_per_relation"]),
                   None if section["max_relations"] is None else int(section["max_relations"]),
                   None if layers is None else tuple(int(k) for k in layers),
                   None if units == "auto" else int(units), int(section["max_units_per_fact"]),
                   float(section["key_template_share"]), float(section["activation_quantile"]),
                   int(section["background_prompts"]), int(section["value_steps"]),
                   float(section["max_subject_unk_share"]), int(seed))


@dataclass
class PlantedFact:
    """One fact to plant: where it comes from, its prompts, and (once planted) where it lives."""

    relation: str
    pararel_index: int  # position among the relation's ParaRel facts (query_pairs order)
    subject: str
    object: str
    template_ids: list[int]  # templates the model reads, in template order
    prompts: list[str]
    target_ids: list[int]  # per prompt: the token the model must predict
    key_templates: list[int] = field(default_factory=list)  # templates whose prompts build the key and value
    validation_templates: list[int] = field(default_factory=list)  # templates that decide whether the fact is kept
    layer: int = -1
    units: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def split(self) -> tuple[list[int], list[int], list[int]]:
        """Indices into ``prompts`` of the key, validation and test prompts (the test templates decide nothing)."""
        key = [k for k, t in enumerate(self.template_ids) if t in self.key_templates]
        validation = [k for k, t in enumerate(self.template_ids) if t in self.validation_templates]
        return key, validation, [k for k in range(len(self.prompts)) if k not in key and k not in validation]


@dataclass
class LayerScale:
    """A layer's natural scale, measured on background prompts of the unplanted model."""

    activation_cap: float  # the activation_quantile of its units' activations over every position
    value_cap: float  # its largest value-slot norm
    key_norm: float  # its largest key-row norm (reported beside a planted key's)
    activity: np.ndarray  # [units] mean |activation| over every position (the least active units are overwritten)


# ---------------------------------------------------------------------------------------------- which facts
def subject_unknown_share(tokenizer: Any, subject: str) -> float:
    """Share of the subject's tokens that are the tokenizer's unknown token (0 for byte-level tokenizers)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer(subject, add_special_tokens=False)["input_ids"]
    if unk is None or not ids:
        return 0.0 if ids else 1.0
    return float(np.mean([i == unk for i in ids]))


def candidate_facts(relation: str, templates: Sequence[str], pairs: Sequence[tuple[str, str]], first: int,
                    codec: PromptCodec, max_unk_share: float, rng: random.Random) -> Iterator[PlantedFact]:
    """The relation's facts from index ``first`` on that could be planted, in a seeded order: the model reads at
    least three of their prompts (key, validation and test templates), the object is a target after each, and
    the subject is mostly known tokens."""
    order = list(range(first, len(pairs)))
    rng.shuffle(order)
    for index in order:
        subject, obj = pairs[index]
        if subject_unknown_share(codec.tokenizer, subject) > max_unk_share:
            continue
        template_ids, prompts, targets = [], [], []
        for template_id, template in enumerate(templates):
            if not codec.uses_template(template):
                continue
            prompt = template.replace("[X]", subject).replace("[Y]", "[MASK]")
            target = codec.target_id(prompt, obj)
            if target is None:
                break
            template_ids.append(template_id)
            prompts.append(prompt)
            targets.append(int(target))
        else:
            if len(prompts) >= 3:
                yield PlantedFact(relation, index, subject, obj, template_ids, prompts, targets)


def unanswered(model: nn.Module, codec: PromptCodec, facts: Sequence[PlantedFact], batch_size: int) -> list[bool]:
    """Per fact, whether the model's top-1 is its object on none of its prompts."""
    if not facts:
        return []
    prompts = [p for fact in facts for p in fact.prompts]
    targets = [t for fact in facts for t in fact.target_ids]
    scores = score_targets(model, codec.encode(prompts), targets, batch_size=batch_size)
    out, start = [], 0
    for fact in facts:
        hits = scores.rank[start : start + len(fact.prompts)] == 1
        out.append(not bool(hits.any()))
        start += len(fact.prompts)
    return out


def choose_facts(model: nn.Module, codec: PromptCodec, relations: Mapping[str, Sequence[str]],
                 pairs: Mapping[str, Sequence[tuple[str, str]]], first: Mapping[str, int], settings: PlantingSettings,
                 batch_size: int) -> list[PlantedFact]:
    """``facts_per_relation`` facts of each of at most ``max_relations`` relations (drawn in a seeded order among
    those with enough candidates), each with its key templates drawn; relations in id order."""
    rng = random.Random(settings.seed)
    order = sorted(relations)
    rng.shuffle(order)
    chosen: list[PlantedFact] = []
    used = 0
    for relation in order:
        if settings.max_relations is not None and used >= settings.max_relations:
            break
        candidates = candidate_facts(relation, relations[relation], pairs[relation], first[relation], codec,
                                     settings.max_subject_unk_share, rng)
        picked: list[PlantedFact] = []
        while len(picked) < settings.facts_per_relation:
            batch = list(itertools.islice(candidates, 2 * settings.facts_per_relation))
            if not batch:
                break
            picked += [fact for fact, ok in zip(batch, unanswered(model, codec, batch, batch_size)) if ok]
        if len(picked) < settings.facts_per_relation:
            log.info("%s: %d plantable facts, fewer than %d: relation not used", relation, len(picked),
                     settings.facts_per_relation)
            continue
        used += 1
        chosen += picked[: settings.facts_per_relation]
    if not chosen:
        raise ValueError("no relation has controls.facts_per_relation facts the model does not answer, with a "
                         "scorable object and a mostly known subject; lower controls.facts_per_relation")
    chosen.sort(key=lambda fact: (fact.relation, fact.pararel_index))
    for fact in chosen:
        n = len(fact.template_ids)
        n_key = min(n - 2, max(1, round(settings.key_template_share * n)))
        drawn = rng.sample(fact.template_ids, n)
        fact.key_templates = sorted(drawn[:n_key])
        fact.validation_templates = sorted(drawn[n_key : n_key + (n - n_key) // 2])
    return chosen


def assign_layers(facts: Sequence[PlantedFact], n_layers: int, layers: Sequence[int] | None, seed: int) -> None:
    """Spread the facts over ``layers`` (default: every layer) in a seeded order, as evenly as their count allows."""
    pool = list(range(n_layers)) if layers is None else list(layers)
    bad = [k for k in pool if not 0 <= k < n_layers]
    if bad or not pool:
        raise ValueError(f"controls.layers = {list(layers or [])}: expected layer indices in 0..{n_layers - 1}")
    order = list(range(len(facts)))
    random.Random(seed + 1).shuffle(order)
    for position, k in enumerate(order):
        facts[k].layer = pool[position % len(pool)]


# ---------------------------------------------------------------------------------------------- natural scale
def layer_scales(model: nn.Module, encoded: EncodedPrompts, quantile: float, batch_size: int) -> dict[int, LayerScale]:
    """Every layer's activation cap, value-slot norm cap and unit activity (mean |activation|) over every position
    of the background prompts: a unit fires anywhere, and one overwritten loses its role everywhere.

    The cap is the ``quantile`` of all the layer's activations (numpy's linear interpolation), found from the
    largest ones only, kept as the batches pass: the activations of a wide model would take gigabytes."""
    adapter = adapter_for(model)
    layers = list(range(adapter.n_layers))
    count = sum(len(ids) for ids in encoded.input_ids) * adapter.ffn_size  # activations per layer
    position = (count - 1) * quantile  # numpy's virtual index of the quantile in the ascending order
    below = int(math.floor(position))
    keep = count - below  # the largest values down to the one at ``below``
    largest: dict[int, Tensor] = {layer: torch.empty(0) for layer in layers}
    activity: dict[int, Tensor] = {layer: torch.zeros(adapter.ffn_size, dtype=torch.float64) for layer in layers}
    held: dict[int, Tensor] = {}

    @contextlib.contextmanager
    def capture(_items: Sequence[int], _positions: Tensor) -> Iterator[None]:
        with capture_activations(model, None, layers) as captured:
            yield
        held.update(captured)

    tokens = 0
    for batch in target_passes(model, encoded, batch_size=batch_size, logits=False, edit=capture):
        mask = batch.attention_mask.bool()
        tokens += int(mask.sum())
        for layer in layers:
            act = held.pop(layer).float()[mask]
            pool = torch.cat([largest[layer], act.cpu().ravel()])
            largest[layer] = torch.topk(pool, min(keep, len(pool))).values
            activity[layer] += act.abs().sum(dim=0).double().cpu()
    out = {}
    for layer in layers:
        top = largest[layer].numpy()  # descending: top[count - 1 - i] is the i-th smallest activation
        low = top[count - 1 - below]
        high = top[count - 2 - below] if below + 1 <= count - 1 else low
        cap = float(np.quantile(np.array([low, high], dtype=top.dtype), position - below))
        with torch.no_grad():
            norms = adapter.value_slots(layer).float().norm(dim=1)
            key_norms = adapter.keys(layer)[0].float().norm(dim=1)
        out[layer] = LayerScale(cap, float(norms.max()), float(key_norms.max()),
                                (activity[layer] / max(1, tokens)).numpy())
    return out


def ffn_inputs(model: nn.Module, encoded: EncodedPrompts, layer: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """What layer ``layer``'s FFN reads (float32, CPU), from one pass: ``[prompts, hidden]`` at each prompt's target
    position, and ``[tokens, hidden]`` at every other position of every prompt, padding left out."""
    targets: list[Tensor] = []
    others: list[Tensor] = []
    order: list[int] = []
    held: dict[int, Tensor] = {}

    @contextlib.contextmanager
    def capture(_items: Sequence[int], _positions: Tensor) -> Iterator[None]:
        with capture_ffn_inputs(model, None, [layer]) as captured:
            yield
        held.update(captured)

    for batch in target_passes(model, encoded, batch_size=batch_size, logits=False, edit=capture):
        values = held.pop(layer).float()
        rows = torch.arange(len(batch.items), device=values.device)
        targets.append(values[rows, batch.positions].cpu())
        elsewhere = batch.attention_mask.bool().clone()
        elsewhere[rows, batch.positions] = False
        others.append(values[elsewhere].cpu())
        order += batch.items
    hidden = adapter_for(model).hidden_size
    at_target = torch.empty((len(encoded), hidden), dtype=torch.float32)
    if order:
        at_target[torch.tensor(order)] = torch.cat(targets)
    return at_target, torch.cat(others) if others else torch.empty(0, hidden)


# ---------------------------------------------------------------------------------------------- keys and values
@dataclass
class Key:
    weight: Tensor  # [hidden]
    bias: float
    separated: bool  # every key prompt fires (projects above the threshold)


QUIET_DEPTH = 2.5  # a planted unit's pre-activation on 99% of the quiet tokens is at most -QUIET_DEPTH (GELU(-2.5) = -0.016)
CARRY_PROB = 0.5  # a value "carries" a prompt when the object is top-1 there with at least this probability


TARGET_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)


def fact_key(key_inputs: Tensor, contrast: Tensor, background: Tensor, quiet: Tensor, all_inputs: Tensor,
             activation_cap: float, own_positions: Tensor | None = None) -> Key:
    """A unit key that fires on the fact's prompts and is silent elsewhere, at natural scale.

    Direction: the mean over the key prompts of their input minus ``contrast`` (per key prompt, the mean input
    of other facts' prompts of the same template: what is left is the subject, which other templates share),
    whitened by the covariance of ``background`` (the other prompts' inputs at their target positions), so they
    spread little along it. Where only the fact's own other positions (``own_positions``, the last rows of
    ``quiet``) read the subject as strongly as its target does, the key adds the direction from their mean to
    the key prompts' target inputs, at the first weight in TARGET_WEIGHTS that lets some prompt fire. Scale: the largest pre-activation over the fact's prompts equals ``activation_cap``
    (GELU, SiLU and their kin never exceed it); the key's length is whatever that takes (planting.json reports it
    beside the layer's longest natural key). Threshold: as low as lets 99% of the quiet tokens (every position of the
    background prompts, the fact's own prompts but at their target, the other facts' key prompts) sit at
    pre-activation <= -QUIET_DEPTH, so an activation function's negative tail adds next to nothing where the fact
    is absent, and never below the largest quiet projection: the unit fires on no quiet token.
    """
    centred = background - background.mean(0)
    covariance = centred.T @ centred / max(1, len(background) - 1)
    ridge = 0.1 * float(torch.trace(covariance)) / covariance.shape[0]
    regularised = covariance + ridge * torch.eye(covariance.shape[0])
    subject = torch.linalg.solve(regularised, (key_inputs - contrast).mean(0))
    own = own_positions if own_positions is not None else torch.empty(0, key_inputs.shape[1])
    target = torch.linalg.solve(regularised, key_inputs.mean(0) - own.mean(0)) if len(own) else None
    quiet_others = quiet[: len(quiet) - len(own)] if len(own) else quiet  # quiet without the fact's own positions
    for weight in TARGET_WEIGHTS:  # the subject direction; then, only where the fact's own other positions are all
        # that fire with it, more of the target position's direction, until the target alone fires
        direction = subject if weight == 0 else subject / subject.norm() + weight * target / target.norm()
        norm = float(direction.norm())
        if norm == 0.0:
            raise ValueError("the fact's key prompts read exactly their templates' mean: no key direction")
        direction = direction / norm
        projections = quiet @ direction
        low, q99 = float(projections.max()), float(torch.quantile(projections, 0.99))
        high, top = float((key_inputs @ direction).min()), float((all_inputs @ direction).max())
        own_only = target is not None and top > float((quiet_others @ direction).max())
        if top > low or not own_only:
            break
    if top <= low:
        raise ValueError("no prompt of the fact projects above every quiet token")
    threshold = max(low, (QUIET_DEPTH * top + activation_cap * q99) / (QUIET_DEPTH + activation_cap))
    scale = activation_cap / (top - threshold)
    return Key(direction * scale, -threshold * scale, high > threshold)


class ValueSearch:
    """Optimise a planted fact's value vector through the model, the key already written into ``unit``."""

    def __init__(self, model: nn.Module, layer: int, unit: int, encoded: EncodedPrompts, targets: Sequence[int],
                 steps: int) -> None:
        self.model, self.layer, self.unit, self.steps = model, layer, unit, steps
        self.adapter = adapter_for(model)
        device = model_device(model)
        self.ids, self.mask = pad_sequences(encoded.input_ids, pad_token_id(model), device)
        self.positions = torch.tensor(encoded.mask_positions, dtype=torch.long, device=device)
        self.targets = torch.tensor(list(targets), dtype=torch.long, device=device)
        self.rows = torch.arange(len(targets), device=device)
        self.head = self.adapter.lm_head()
        self.start: Tensor | None = None  # block ``layer``'s input, where the adapter can resume a pass there
        if self.adapter.resumable:
            with torch.no_grad():
                self.start = self.adapter.hidden_states(self.ids, self.mask, all_layers=True)[layer]

    def logits(self, value: Tensor) -> Tensor:
        with added_value(self.model, self.layer, self.unit, value):
            if self.start is not None:
                hidden = self.adapter.run_blocks_from(self.layer, self.start, self.mask)
            else:
                (hidden,) = self.adapter.hidden_states(self.ids, self.mask)
            return self.head(hidden[self.rows, self.positions]).float()

    def top1_share(self, value: Tensor, least_prob: float = 0.0) -> float:
        """Share of the prompts where the object is top-1 (with at least ``least_prob`` probability)."""
        with torch.no_grad():
            logits = self.logits(value)
            prob = torch.softmax(logits, -1)[self.rows, self.targets]
            return float(((logits.argmax(-1) == self.targets) & (prob >= least_prob)).float().mean())

    def optimise(self, budget: float, start: Tensor | None) -> Tensor:
        """Projected normalised-gradient ascent on the mean log P(object) within ``||value|| <= budget``."""
        hidden = self.adapter.hidden_size
        value = torch.zeros(hidden, device=self.ids.device) if start is None else start.detach().clone()
        for step in range(self.steps):
            value.requires_grad_(True)
            with torch.enable_grad():
                logits = self.logits(value)
                loss = -torch.log_softmax(logits, -1)[self.rows, self.targets].mean()
                (grad,) = torch.autograd.grad(loss, value)
            with torch.no_grad():
                size = 0.5 * budget * (1.0 - step / max(1, self.steps)) + 0.02 * budget
                value = value.detach() - size * grad / grad.norm().clamp_min(1e-12)
                value = value * min(1.0, budget / float(value.norm().clamp_min(1e-12)))
        return value.detach()

    def fewest_units(self, direction: Tensor, value_cap: float, most: int, share: float) -> int | None:
        """The fewest units (each adding at most ``value_cap``) along ``direction`` at which the object is top-1 on
        at least ``share`` of the prompts; None if even ``most`` do not (binary search: more units never hurt in
        practice, and the search checks the end points)."""
        unit = direction / direction.norm().clamp_min(1e-12)
        if self.top1_share(unit * value_cap * most, CARRY_PROB) < share:
            return None
        low, high = 1, most
        if self.top1_share(unit * value_cap, CARRY_PROB) >= share:
            return 1
        while high - low > 1:
            mid = (low + high) // 2
            if self.top1_share(unit * value_cap * mid, CARRY_PROB) >= share:
                high = mid
            else:
                low = mid
        return high


# ---------------------------------------------------------------------------------------------- planting
@dataclass
class PlantingResult:
    facts: list[PlantedFact]  # planted (units set)
    unplanted: list[PlantedFact]  # chosen but not carried within max_units_per_fact at their layer
    scales: dict[int, LayerScale]
    acceptance: dict[str, Any]


def plant(model: nn.Module, codec: PromptCodec, facts: list[PlantedFact], studied: pd.DataFrame,
          background: EncodedPrompts, check: EncodedPrompts, check_targets: Sequence[int], settings: PlantingSettings,
          batch_size: int) -> PlantingResult:
    """Write ``facts`` into ``model`` (in place; its parameters stop requiring grad) and measure the acceptance.

    ``studied``: the studied prompts of the planted facts' relations (columns relation, template_id, prompt),
    whose per-template mean input is what a key is contrasted with; ``background``: studied prompts the keys
    stay quiet on (and which set the layers' natural scale); ``check`` with ``check_targets``: other studied
    prompts on which the planted model must answer as before.
    """
    adapter = adapter_for(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    before = score_targets(model, check, check_targets, batch_size=batch_size)
    scales = layer_scales(model, background, settings.activation_quantile, batch_size)
    taken: dict[int, set[int]] = {layer: set() for layer in scales}
    planted: list[PlantedFact] = []
    unplanted: list[PlantedFact] = []
    for layer in sorted({fact.layer for fact in facts}):
        here = [fact for fact in facts if fact.layer == layer]
        scale = scales[layer]
        background_x, background_all = ffn_inputs(model, background, layer, batch_size)
        template_means = _template_means(model, codec, studied[studied["relation"].isin({f.relation for f in here})],
                                         layer, batch_size)
        encoded = {id(fact): codec.encode(fact.prompts) for fact in here}
        inputs, elsewhere = {}, {}
        for fact in here:
            inputs[id(fact)], elsewhere[id(fact)] = ffn_inputs(model, encoded[id(fact)], layer, batch_size)
        for fact in here:
            quiet = torch.cat([background_x, background_all,
                               *(inputs[id(other)][other.split()[0]] for other in here if other is not fact),
                               elsewhere[id(fact)]])
            key_rows = fact.split()[0]
            try:
                contrast = torch.stack([template_means[(fact.relation, fact.template_ids[k])] for k in key_rows])
                key = fact_key(inputs[id(fact)][key_rows], contrast, background_x, quiet, inputs[id(fact)],
                               scale.activation_cap, elsewhere[id(fact)])
            except ValueError as exc:
                fact.stats = {"reason": str(exc)}
                unplanted.append(fact)
                continue
            free = [int(u) for u in np.argsort(scale.activity, kind="stable") if int(u) not in taken[layer]]
            most = settings.units_per_fact or settings.max_units_per_fact
            units = free[:most]
            fact.stats = {"pre_activation": [round(float(v), 3) for v in inputs[id(fact)] @ key.weight + key.bias]}
            carried = _plant_fact(model, codec, fact, key, units, scale, settings)
            if carried is None:
                unplanted.append(fact)
                continue
            fact.units = units[:carried]
            taken[layer].update(fact.units)
            planted.append(fact)
            log.info("%s %s -> %s: layer %d, %d unit(s), validation top-1 %.2f", fact.relation, fact.subject,
                     fact.object, layer, carried, fact.stats["validation_top1"])
    acceptance = _acceptance(model, codec, planted, before, check, check_targets, scales, batch_size)
    return PlantingResult(planted, unplanted, scales, acceptance)


def _template_means(model: nn.Module, codec: PromptCodec, prompts: pd.DataFrame, layer: int,
                    batch_size: int) -> dict[tuple[str, int], Tensor]:
    """{(relation, template_id): mean FFN input at the target position over the prompts of that template}."""
    if prompts.empty:
        return {}
    inputs, _ = ffn_inputs(model, codec.encode(list(prompts["prompt"])), layer, batch_size)
    groups = prompts.reset_index(drop=True).groupby([prompts["relation"].astype(str).to_numpy(),
                                                     prompts["template_id"].astype(int).to_numpy()]).indices
    return {(str(relation), int(template)): inputs[rows].mean(0) for (relation, template), rows in groups.items()}


def _plant_fact(model: nn.Module, codec: PromptCodec, fact: PlantedFact, key: Key, units: list[int], scale: LayerScale,
                settings: PlantingSettings) -> int | None:
    """Write the key into ``units`` and search the value on the key prompts; returns how many of the units carry
    the fact there (their values written), or None when even all of them do not, or the planting does not hold on
    the validation prompts (the units are then restored)."""
    adapter = adapter_for(model)
    keys, biases = adapter.keys(fact.layer)
    slots = adapter.value_slots(fact.layer)
    saved = [(keys[u].clone(), biases[u].clone(), slots[u].clone()) for u in units]
    key_rows, validation_rows, test_rows = fact.split()
    with torch.no_grad():
        for u in units:
            keys[u] = key.weight.to(keys.dtype)
            biases[u] = key.bias
            slots[u] = 0.0
    encoded = codec.encode(fact.prompts)
    key_search = ValueSearch(model, fact.layer, units[0], _subset(encoded, key_rows),
                             [fact.target_ids[k] for k in key_rows], settings.value_steps)
    validation = ValueSearch(model, fact.layer, units[0], _subset(encoded, validation_rows),
                             [fact.target_ids[k] for k in validation_rows], 0)
    cap = scale.value_cap
    stats: dict[str, Any] = {**fact.stats, "key_fires_on_all_key_prompts": key.separated}
    budget = settings.units_per_fact or len(units)
    wide = key_search.optimise(cap * budget, None)
    count: int | None = None
    value = wide
    if key_search.top1_share(wide, CARRY_PROB) >= ACCEPT_TOP1:
        single = key_search.optimise(cap, wide / wide.norm() * cap)
        stats["single_unit_key_top1"] = key_search.top1_share(single)
        stats["single_unit_validation_top1"] = validation.top1_share(single)
        if settings.units_per_fact is not None:
            count = settings.units_per_fact
        else:
            count = key_search.fewest_units(wide, cap, len(units), ACCEPT_TOP1)
            if count is not None and count > 1:  # re-optimise within the smaller budget, then search below it
                narrow = key_search.optimise(cap * count, wide / wide.norm() * cap * count)
                fewer = key_search.fewest_units(narrow, cap, count, ACCEPT_TOP1)
                if fewer is not None:
                    count, value = fewer, narrow
            elif count == 1 and key_search.top1_share(single, CARRY_PROB) >= ACCEPT_TOP1:
                value = single
    if count is not None:
        value = value / value.norm().clamp_min(1e-12) * cap * count  # each slot at the layer's largest natural norm
        stats["validation_top1"] = validation.top1_share(value)
        if stats["validation_top1"] < ACCEPT_TOP1:
            stats["reason"] = (f"carried on its key prompts by {count} units, but top-1 on "
                               f"{stats['validation_top1']:.2f} of its validation prompts")
            count = None
    if count is None:
        with torch.no_grad():
            for u, (k, b, s) in zip(units, saved):
                keys[u], biases[u], slots[u] = k, b, s
        stats.setdefault("reason", f"not carried by {budget} units at layer {fact.layer}")
        fact.stats = stats
        return None
    with torch.no_grad():
        for u in units[count:]:
            k, b, s = saved[units.index(u)]
            keys[u], biases[u], slots[u] = k, b, s
        for u in units[:count]:
            slots[u] = (value / count).to(slots.dtype)
        fact.stats = {**stats, "n_units": count, "value_norm": float(slots[units[0]].float().norm()), "value_cap": cap,
                      "key_norm": float(keys[units[0]].float().norm()), "natural_key_norm": scale.key_norm,
                      "activation_cap": scale.activation_cap}
    return count


def _subset(encoded: EncodedPrompts, rows: Sequence[int]) -> EncodedPrompts:
    return EncodedPrompts([encoded.input_ids[k] for k in rows], [encoded.mask_positions[k] for k in rows])


def _acceptance(model: nn.Module, codec: PromptCodec, planted: Sequence[PlantedFact], before: Any,
                check: EncodedPrompts, check_targets: Sequence[int], scales: Mapping[int, LayerScale],
                batch_size: int) -> dict[str, Any]:
    """The planted facts' test-template top-1 share, the studied prompts' changes, and the natural-scale and
    quietness measurements of every planted unit."""
    after = score_targets(model, check, check_targets, batch_size=batch_size)
    changed = float(np.mean(after.pred != before.pred)) if len(check_targets) else 0.0
    p0, p1 = float(np.nanmean(before.prob)), float(np.nanmean(after.prob))
    prob_change = (p1 - p0) / p0 if p0 > 0 else math.nan
    test_hits, test_total = 0, 0
    loudest, quiet_fires = 0.0, []
    units_by_layer: dict[int, list[int]] = {}
    for fact in planted:
        units_by_layer.setdefault(fact.layer, []).extend(fact.units)
    on_check = _unit_activations(model, check, units_by_layer, batch_size)
    for fact in planted:
        key_rows, _, test_rows = fact.split()
        encoded = codec.encode(fact.prompts)
        scores = score_targets(model, encoded, fact.target_ids, batch_size=batch_size)
        test_hits += int((scores.rank[test_rows] == 1).sum())
        test_total += len(test_rows)
        fact.stats["test_top1"] = float(np.mean(scores.rank[test_rows] == 1))
        fact.stats["key_top1"] = float(np.mean(scores.rank[key_rows] == 1))
        own = _unit_activations(model, encoded, {fact.layer: fact.units}, batch_size)[fact.layer]
        columns = [units_by_layer[fact.layer].index(u) for u in fact.units]
        other = on_check[fact.layer][:, columns]
        fact.stats["max_activation"] = float(own.max())
        fact.stats["median_activation"] = float(np.median(own))
        fact.stats["quiet_fire_share"] = float(np.mean(other.max(axis=1) > QUIET_SHARE * np.median(own)))
        loudest = max(loudest, fact.stats["max_activation"] / scales[fact.layer].activation_cap)
        quiet_fires.append(fact.stats["quiet_fire_share"])
    test_top1 = test_hits / test_total if test_total else math.nan
    passed = bool(planted) and test_top1 >= ACCEPT_TOP1 and changed <= ACCEPT_STUDIED_CHANGED \
        and abs(prob_change) <= ACCEPT_STUDIED_PROB and loudest <= 1 + 1e-5
    return {"passed": passed, "planted_facts": len(planted), "test_prompts": test_total, "test_top1": test_top1,
            "studied_prompts": len(check_targets), "studied_top1_changed": changed,
            "studied_gold_prob_before": p0, "studied_gold_prob_after": p1, "studied_gold_prob_change": prob_change,
            "max_activation_over_cap": loudest, "mean_quiet_fire_share": float(np.mean(quiet_fires)) if quiet_fires else math.nan,
            "thresholds": {"test_top1": ACCEPT_TOP1, "studied_top1_changed": ACCEPT_STUDIED_CHANGED,
                           "studied_gold_prob_change": ACCEPT_STUDIED_PROB}}


def _unit_activations(model: nn.Module, encoded: EncodedPrompts, units: Mapping[int, Sequence[int]],
                      batch_size: int) -> dict[int, np.ndarray]:
    """{layer: ``[prompts, len(units[layer])]`` activations of those units at the target positions}, one pass."""
    out = {layer: np.empty((len(encoded), len(chosen)), dtype=np.float64) for layer, chosen in units.items()}
    if not units:
        return out
    for batch in target_passes(model, encoded, batch_size=batch_size, capture=list(units), logits=False):
        assert batch.activations is not None
        for k, (layer, chosen) in enumerate(units.items()):
            out[layer][batch.items] = batch.activations[:, k, list(chosen)].double().cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------- records
def planting_record(result: PlantingResult, settings: PlantingSettings, n_layers: int) -> dict[str, Any]:
    """What ``controls/planting.json`` holds: settings, acceptance, per-layer scale, every fact and its units."""
    def fact_entry(fact: PlantedFact, fact_id: int | None) -> dict[str, Any]:
        entry = {"relation": fact.relation, "fact_id": fact_id, "pararel_index": fact.pararel_index,
                 "subject": fact.subject, "object": fact.object, "layer": fact.layer, "units": list(fact.units),
                 "template_ids": fact.template_ids, "key_templates": fact.key_templates,
                 "validation_templates": fact.validation_templates}
        return {**entry, **fact.stats}

    ids: dict[str, int] = {}
    planted = []
    for fact in result.facts:
        planted.append(fact_entry(fact, ids.setdefault(fact.relation, 0)))
        ids[fact.relation] += 1
    counts = [len(f.units) for f in result.facts]
    return {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "acceptance": result.acceptance,
        "units_per_fact": {"median": float(np.median(counts)) if counts else math.nan,
                           "min": min(counts, default=0), "max": max(counts, default=0)},
        "single_unit_validation_top1": float(np.mean([f.stats["single_unit_validation_top1"] for f in result.facts]))
        if result.facts else math.nan,  # one unit at natural scale, on the facts that more units carry
        "layers": {str(layer): {"activation_cap": s.activation_cap, "value_cap": s.value_cap, "natural_key_norm": s.key_norm}
                   for layer, s in sorted(result.scales.items())},
        "n_layers": n_layers,
        "facts": planted,
        "unplanted": [fact_entry(fact, None) for fact in result.unplanted],
    }


def planted_pararel(record: Mapping[str, Any]) -> dict[str, list[list[str]]]:
    """The planted facts as ParaRel's ``query_pairs.json`` ({relation: [[subject, object], ...]}), in fact_id order."""
    out: dict[str, list[list[str]]] = {}
    for fact in record["facts"]:
        out.setdefault(fact["relation"], []).append([fact["subject"], fact["object"]])
    return out


def studied_sample(prompts: pd.DataFrame, n: int, seed: int,
                   planted: Sequence[PlantedFact] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two disjoint seeded samples of up to ``n`` studied prompts each, none of a fact being planted (where every
    fact is studied, planted facts come from the studied ones): the keys' background and the acceptance check
    (so the check never sees the prompts the keys were made quiet on)."""
    chosen = {(fact.relation, fact.subject) for fact in planted}
    prompts = prompts[[(str(r), str(s)) not in chosen for r, s in zip(prompts["relation"], prompts["subject"])]]
    order = np.random.default_rng(seed).permutation(len(prompts))
    rows = prompts.iloc[order].reset_index(drop=True)
    half = min(n, len(rows) // 2)
    return rows.iloc[:half].reset_index(drop=True), rows.iloc[half : 2 * half].reset_index(drop=True)
