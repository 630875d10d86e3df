"""Where does a model keep its facts? A localisation diagnostic by ablation.

The knowledge-neuron method (Dai et al., 2022) attributes a fact to FFN neurons at the
target position (a masked LM's [MASK], a causal LM's last prompt token) and suppresses or
amplifies them there. That can only move the answer as far as the FFN activations at that
position carry it. This module measures how far, for any model with an adapter
(kn.models.adapters), by zeroing whole sublayer outputs and reading the gold probability
(full-vocabulary softmax at the target position, the same batched pass every stage uses:
kn.models.forward).

Ablations (each an :class:`Ablation`: a component, a set of positions, a set of layers):

- ``ffn``: the FFN neuron vector (the input of the down projection: what knowledge-neuron
  interventions scale) is set to 0 at the chosen positions. The down projection's bias still
  reaches the residual stream; only the neurons are silenced, exactly what zeroing every
  knowledge neuron at once would do.
- ``attn``: the attention sublayer's output (its output projection, bias included, before any
  residual add or norm) is set to 0 at the chosen positions: the residual stream still passes,
  only what attention wrote into it there is removed.

Positions: ``mask`` (the target position; the name keeps the masked-LM reading), ``subject``
(every token of the subject, :func:`subject_positions`) and ``all`` (every position; padding
is never attended to, so this equals every real token). Layers: one layer ``k`` (0-based, as in
every file of this project) or all layers in one forward pass.

Column names: ``{component}_{positions}_layer_{k}`` and ``{component}_{positions}_all``, and for
every position ``{component}_all_positions`` (all layers) / ``{component}_all_positions_layer_{k}``.
``ffn_mask_all`` is the [MASK]-FFN ceiling: suppressing a subset of the neurons at the target
position is expected to move the gold probability less than silencing all of them (an
empirical bound, not a theorem: partial ablations need not be monotonic).

Aggregation (:func:`summarise_localisation`) is the paper's ratio of averages per relation,
``mean(p_ablated - p0) / mean(p0)`` over prompts, then the unweighted mean over relations
(relation ``ALL``), with 95% percentile bootstrap CIs over facts. No file I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ContextManager, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from kn.hooks import attention_output_hooks, ffn_hooks
from kn.interventions import bootstrap_counts, percentile_ci, ratio_of_averages
from kn.models.adapters import adapter_for
from kn.models.encoding import MASK_LITERAL, EncodedPrompts, PromptCodec, bos_prefix, cut_before_mask
from kn.models.forward import RESUMED_PROMPTS, score_targets, unedited_chunks

COMPONENTS = ("ffn", "attn")
POSITIONS = ("mask", "subject", "all")
ALL = "ALL"
LONG_COLUMNS = {"relation": "object", "fact_id": "int64", "template_id": "int64", "n_subject_tokens": "int64",
                "ablation": "object", "p0": "float64", "p_ablated": "float64"}  # the per-prompt table, long form


@dataclass(frozen=True)
class Ablation:
    """Zero ``component``'s output at ``positions`` in every layer of ``layers`` (one forward pass)."""

    component: str  # "ffn" | "attn"
    positions: str  # "mask" | "subject" | "all"
    layers: tuple[int, ...]
    name: str

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"ablation component {self.component!r}; expected one of {COMPONENTS}")
        if self.positions not in POSITIONS:
            raise ValueError(f"ablation positions {self.positions!r}; expected one of {POSITIONS}")


def ablation_name(component: str, positions: str, layer: int | None) -> str:
    """``ffn_mask_layer_3``, ``ffn_mask_all``, ``ffn_subject_all``; every position: ``ffn_all_positions(_layer_3)``."""
    if positions == "all":
        return f"{component}_all_positions" + ("" if layer is None else f"_layer_{layer}")
    return f"{component}_{positions}_" + ("all" if layer is None else f"layer_{layer}")


def standard_ablations(
    n_layers: int,
    per_layer: Iterable[tuple[str, str]] = (("ffn", "mask"), ("attn", "mask")),
    all_layers: Iterable[tuple[str, str]] = (
        ("ffn", "mask"), ("ffn", "subject"), ("ffn", "all"), ("attn", "mask"), ("attn", "subject"), ("attn", "all"),
    ),
) -> list[Ablation]:
    """Each (component, positions) of ``per_layer`` in every single layer, and each of ``all_layers`` in
    all layers at once: the per-layer [MASK] curves and the whole-model ceilings."""
    out: list[Ablation] = []
    for component, positions in per_layer:
        out += [Ablation(component, positions, (k,), ablation_name(component, positions, k)) for k in range(n_layers)]
    for component, positions in all_layers:
        out.append(Ablation(component, positions, tuple(range(n_layers)), ablation_name(component, positions, None)))
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate ablations: {sorted({n for n in names if names.count(n) > 1})}")
    return out


# ---------------------------------------------------------------------------------------------- subject positions
def _filled_text(template: str, subject: str, blank: str) -> tuple[str, list[tuple[int, int]]]:
    """The template with [X] = ``subject`` and [Y] = ``blank``, and the character spans of the subject.

    The template is walked slot by slot, so a [Y] before [X] shifts the subject by the length of
    ``blank``, not by the length of "[Y]".
    """
    if "[X]" not in template or "[Y]" not in template:
        raise ValueError(f"template {template!r} needs both [X] and [Y]")
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for piece in re.split(r"(\[X\]|\[Y\])", template):
        if piece == "[X]":
            spans.append((length, length + len(subject)))
            piece = subject
        elif piece == "[Y]":
            piece = blank
        text.append(piece)
        length += len(piece)
    return "".join(text), spans


def subject_positions(codec: PromptCodec, encoded: EncodedPrompts, templates: Sequence[str],
                      subjects: Sequence[str]) -> list[list[int]]:
    """Per prompt, the positions (into ``encoded``, as every stage indexes them) of the subject's tokens.

    ``encoded`` must be ``codec.encode`` of the prompts these templates and subjects make. A token
    belongs to the subject when its character span (the fast tokenizer's offset mapping) overlaps
    the subject in the text the model reads: the masked LM's prompt with its mask token, or the
    causal LM's prompt cut before [Y] after its BOS. Special tokens (empty spans) never do.
    """
    tokenizer = codec.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("subject positions need a fast tokenizer (offset mapping)")
    if not len(templates) == len(subjects) == len(encoded):
        raise ValueError(f"{len(encoded)} prompts, {len(templates)} templates, {len(subjects)} subjects")
    prefix = bos_prefix(tokenizer) if codec.causal else []
    texts, spans = [], []
    for template, subject in zip(templates, subjects):
        if codec.causal:
            filled, found = _filled_text(template, subject, MASK_LITERAL)
            filled = cut_before_mask(filled)[0]
        else:
            filled, found = _filled_text(template, subject, tokenizer.mask_token)
        texts.append(filled)
        spans.append(found)
    batch = tokenizer(texts, add_special_tokens=not codec.causal, truncation=not codec.causal,
                      max_length=codec.max_len, return_offsets_mapping=True)
    out: list[list[int]] = []
    for k, (text, ids, offsets) in enumerate(zip(texts, batch["input_ids"], batch["offset_mapping"])):
        if prefix + list(ids) != encoded.input_ids[k]:
            raise ValueError(f"prompt {k}: {text!r} tokenises differently from the pipeline's encoding")
        positions = [len(prefix) + pos for pos, (start, end) in enumerate(offsets)
                     if end > start and any(start < s_end and end > s_start for s_start, s_end in spans[k])]
        if not positions:
            raise ValueError(f"prompt {k}: no token of subject {subjects[k]!r} in {text!r}")
        out.append(positions)
    return out


# ---------------------------------------------------------------------------------------------- ablated passes
def _zeroing_edit(model: nn.Module, ablation: Ablation, subjects: Sequence[Sequence[int]]):
    """A batch edit (kn.models.forward.BatchEdit) zeroing ``ablation``'s component at its positions."""
    hooks = ffn_hooks if ablation.component == "ffn" else attention_output_hooks

    def edit(items: Sequence[int], targets: torch.Tensor) -> ContextManager[None]:
        masks: dict[tuple[int, int], torch.Tensor] = {}  # one per batch shape, shared by every hooked layer

        def positions_of(output: torch.Tensor) -> torch.Tensor:
            shape = (int(output.shape[0]), int(output.shape[1]))
            if shape not in masks:
                where = torch.zeros(shape, dtype=torch.bool, device=output.device)
                if ablation.positions == "all":
                    where[:] = True
                elif ablation.positions == "mask":
                    where[torch.arange(len(items), device=output.device), targets.to(output.device)] = True
                else:
                    for row, item in enumerate(items):
                        where[row, list(subjects[item])] = True
                masks[shape] = where[..., None]
            return masks[shape]

        def zero(output: torch.Tensor) -> torch.Tensor:
            return output.masked_fill(positions_of(output), 0.0)

        return hooks(model, {layer: zero for layer in ablation.layers})

    return edit


@torch.no_grad()
def ablated_gold_probabilities(
    model: nn.Module,
    encoded: EncodedPrompts,
    gold_ids: Sequence[int],
    subjects: Sequence[Sequence[int]],
    ablations: Sequence[Ablation],
    *,
    batch_size: int = 128,
    max_resumed_prompts: int = RESUMED_PROMPTS,
) -> dict[str, np.ndarray]:
    """``{"p0": [n], ablation.name: [n], ...}``: P(gold) at each prompt's target position, plain and
    under each ablation (float64, prompt order). Ablated passes resume at their lowest ablated layer
    from the prompts' unedited pass, held for ``max_resumed_prompts`` prompts at a time."""
    n = len(encoded)
    if len(gold_ids) != n or len(subjects) != n:
        raise ValueError(f"{n} prompts, {len(gold_ids)} gold ids, {len(subjects)} subject position lists")
    names = [a.name for a in ablations]
    if len(set(names)) != len(names) or "p0" in names:
        raise ValueError(f"ablation names must be unique and not 'p0': {names}")
    n_layers = adapter_for(model).n_layers
    for ablation in ablations:
        bad = [k for k in ablation.layers if not 0 <= k < n_layers]
        if bad:
            raise IndexError(f"{ablation.name}: layers {bad} out of range: model has {n_layers} layers")
    # each ablated pass resumes at its lowest ablated layer where the adapter can (kn.models.forward.unedited_chunks)
    starts = [min(a.layers) for a in ablations if a.layers]
    out = {name: np.empty(n, dtype=np.float64) for name in ["p0", *names]}
    for chunk, resume in unedited_chunks(model, encoded, range(n), [starts] * n, max_prompts=max_resumed_prompts,
                                         batch_size=batch_size):
        gold = [gold_ids[p] for p in chunk]
        out["p0"][chunk] = score_targets(model, encoded, gold, batch_size=batch_size, items=chunk, resume=resume,
                                         first_edited=[None] * len(chunk)).prob
        for ablation in ablations:
            edit = _zeroing_edit(model, ablation, [subjects[p] for p in chunk])  # the edit sees indices into chunk
            first = min(ablation.layers) if ablation.layers else None
            out[ablation.name][chunk] = score_targets(model, encoded, gold, batch_size=batch_size, items=chunk, edit=edit,
                                                      resume=resume, first_edited=[first] * len(chunk)).prob
    return out


# ---------------------------------------------------------------------------------------------- aggregation
def summarise_localisation(per_prompt: pd.DataFrame, columns: Sequence[str], resamples: int = 1000,
                           seed: int = 0) -> pd.DataFrame:
    """Relative change of the gold probability per relation and overall, with 95% bootstrap CIs.

    ``per_prompt``: one row per prompt with ``relation``, ``fact_id``, ``p0`` and each ablated
    probability of ``columns``. Per relation: ``mean(p - p0) / mean(p0)`` over its prompts (-0.10
    is a 10% drop); relation ``ALL``: the unweighted mean over relations. CIs: percentile bootstrap
    over facts within each relation, one resampling per relation (relations sorted,
    ``np.random.default_rng(seed)``) shared by every column, so columns are paired; ALL's CI
    averages the resampled relation values. ``resamples=0``: no CIs (NaN).

    Columns: relation, n_facts, n_prompts, p0 (mean over prompts; ALL: mean over relations), then
    per ablation ``<name>``, ``<name>_ci_low``, ``<name>_ci_high``.
    """
    missing = [c for c in ["relation", "fact_id", "p0", *columns] if c not in per_prompt.columns]
    if missing:
        raise ValueError(f"per-prompt table lacks columns {missing}")
    if per_prompt.empty:
        raise ValueError("per-prompt table is empty")
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    boot: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for relation, group in per_prompt.groupby("relation", sort=True):
        sums = group.groupby("fact_id", sort=True)[["p0", *columns]].sum()
        p0 = sums["p0"].to_numpy(np.float64)
        counts = bootstrap_counts(len(p0), resamples, rng) if resamples > 0 else None
        row: dict = {"relation": str(relation), "n_facts": len(p0), "n_prompts": len(group),
                     "p0": float(group["p0"].mean())}
        for column in columns:
            delta = sums[column].to_numpy(np.float64) - p0
            row[column] = float(ratio_of_averages(delta, p0))
            low = high = float("nan")
            if counts is not None:
                resampled = ratio_of_averages(delta[None, :], p0[None, :], counts)
                boot[column].append(resampled)
                low, high = percentile_ci(resampled)
            row[f"{column}_ci_low"], row[f"{column}_ci_high"] = low, high
        rows.append(row)
    table = pd.DataFrame(rows)
    overall: dict = {"relation": ALL, "n_facts": int(table["n_facts"].sum()),
                     "n_prompts": int(table["n_prompts"].sum()), "p0": float(table["p0"].mean())}
    for column in columns:
        overall[column] = float(np.nanmean(table[column].to_numpy()))
        low = high = float("nan")
        if resamples > 0:
            low, high = percentile_ci(np.nanmean(np.stack(boot[column]), axis=0))
        overall[f"{column}_ci_low"], overall[f"{column}_ci_high"] = low, high
    order = ["relation", "n_facts", "n_prompts", "p0"] + [f"{c}{s}" for c in columns for s in ("", "_ci_low", "_ci_high")]
    return pd.concat([table, pd.DataFrame([overall])], ignore_index=True)[order]


def localise_relation(model: nn.Module, codec: PromptCodec, prompts: pd.DataFrame, *, batch_size: int = 128,
                      ablations: Sequence[Ablation] | None = None) -> pd.DataFrame:
    """Per-prompt gold probabilities, plain and under every ablation, for one relation's prompt rows.

    ``prompts`` holds ingested prompt rows (relation, fact_id, template_id, template, subject,
    prompt, object). Rows whose template the model does not read, or whose object is not a target
    it can score (a masked LM's multi-piece objects), are left out, as in every other stage; with
    none left the table is empty. Long form: one row per prompt and ablation (:data:`LONG_COLUMNS`).
    """
    usable = codec.usable_rows(prompts)
    targets = codec.target_ids(list(usable["prompt"]), list(usable["object"]))
    keep = np.array(targets) >= 0
    rows = usable[keep].reset_index(drop=True)
    gold = [t for t in targets if t >= 0]
    if rows.empty:  # e.g. every studied object is several tokens for this tokenizer: nothing to measure
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in LONG_COLUMNS.items()})
    encoded = codec.encode(list(rows["prompt"]))
    subjects = subject_positions(codec, encoded, list(rows["template"]), list(rows["subject"]))
    chosen = standard_ablations(adapter_for(model).n_layers) if ablations is None else list(ablations)
    probs = ablated_gold_probabilities(model, encoded, gold, subjects, chosen, batch_size=batch_size)
    per_prompt = pd.DataFrame({
        "relation": rows["relation"].astype(str).to_numpy(),
        "fact_id": rows["fact_id"].to_numpy(np.int64),
        "template_id": rows["template_id"].to_numpy(np.int64),
        "n_subject_tokens": np.array([len(s) for s in subjects], dtype=np.int64),
        "p0": probs["p0"],
    })
    long = pd.concat([per_prompt.assign(ablation=a.name, p_ablated=probs[a.name]) for a in chosen], ignore_index=True)
    return long[list(LONG_COLUMNS)]


def ceiling_table(long: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    """:func:`summarise_localisation` of per-prompt rows in long form (one row per prompt and ablation,
    columns relation, fact_id, template_id, ablation, p0, p_ablated), ablations in first-seen order."""
    names = list(dict.fromkeys(long["ablation"]))
    if not names:
        raise ValueError("no localised prompt in any relation: nothing to summarise")
    wide = long.pivot_table(index=["relation", "fact_id", "template_id", "p0"], columns="ablation",
                            values="p_ablated", aggfunc="first", sort=True).reset_index()
    missing = wide[names].isna().any(axis=1)
    if missing.any():
        first = wide[missing].iloc[0]
        raise ValueError(f"prompt ({first['relation']}, fact {first['fact_id']}, template {first['template_id']}) "
                         "lacks some ablations; every prompt needs every ablation")
    return summarise_localisation(wide, names, resamples=resamples, seed=seed)


def ceiling_lines(ceiling: pd.DataFrame) -> dict[str, float]:
    """The ALL row's values (no CI columns): what the summary and the sweep quote."""
    row = ceiling[ceiling["relation"] == ALL]
    if row.empty:
        raise ValueError(f"ceiling table has no relation = {ALL} row")
    return {k: float(v) for k, v in row.iloc[0].items() if k != "relation" and not k.endswith(("_ci_low", "_ci_high"))}
