"""Suppressing and amplifying knowledge neurons (SPEC §5), with controls and aggregation.

The paper's measurement: per fact, scale its KNs' activations at [MASK] (a causal LM: at the
last prompt token, docs/causal.md) (x0 suppress,
x2 amplify), all layers at once in one forward pass, on its own prompts and on the
prompts of one randomly drawn fact of another relation, and report per relation the
ratio of averages mean(Δp) / mean(p0). Beyond the paper: a layer-matched random-neuron
control, a dose-response over the top-k neurons by attribution, and bootstrap CIs.
"""

from __future__ import annotations

import io
import logging
import random
import warnings
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from transformers import PreTrainedTokenizerBase

from kn.hooks import scale_neurons_per_row
from kn.models.encoding import EncodedPrompts, PromptCodec, encode_prompts, object_token_id
from kn.models.forward import RESUMED_PROMPTS, score_continuations, score_targets, unedited_chunks
from kn.paper_numbers import paper_values
from kn.tables import DOSE, DOSE_SUMMARY, EFFECT_SUMMARY, EVALUATION, METHODS, Neuron

log = logging.getLogger("kn.interventions")

# SPEC §12 ([2nd]): unweighted mean over the 34 relations of the per-relation own-prompt ratios.
PAPER = {"suppress_own": paper_values("suppress"), "amplify_own": paper_values("amplify")}


@dataclass(frozen=True)
class Intervention:
    """One forward row: prompt ``prompt`` with ``neurons`` scaled by ``factor`` at its [MASK]."""

    prompt: int
    neurons: tuple[Neuron, ...] = ()
    factor: float = 1.0

    def key(self) -> tuple[int, tuple[Neuron, ...], float]:
        """Rows with equal keys give equal probabilities; an empty set is the unmodified model."""
        if not self.neurons:
            return (self.prompt, (), 1.0)
        return (self.prompt, tuple(sorted(self.neurons)), float(self.factor))


def first_scaled_layer(item: Intervention) -> int | None:
    """The lowest layer whose activations ``item`` changes; None when it changes none (the plain model)."""
    if not item.neurons or item.factor == 1.0:
        return None
    return min(int(layer) for layer, _ in item.neurons)


def gold_probabilities(
    model: nn.Module,
    encoded: EncodedPrompts,
    gold_ids: Sequence[int],
    rows: Sequence[Intervention],
    *,
    batch_size: int = 64,
    progress: bool = False,
    continuations: Sequence[Sequence[int]] | None = None,
    max_resumed_prompts: int = RESUMED_PROMPTS,
) -> np.ndarray:
    """P(gold | prompt) under each row's intervention: softmax over the full vocabulary at [MASK]
    (a causal LM: at the last prompt token, where the neurons are scaled).

    Identical rows (same prompt, neurons and factor; every empty set is the plain model) are
    computed once. Rows with different neuron sets share a batch (kn.models.forward), each
    scaled by :func:`kn.hooks.scale_neurons_per_row`; on a masked LM whose adapter can re-enter
    its blocks, each row resumes at the lowest layer it scales, from its prompt's unedited pass
    (kn.models.forward.PlainStates), held for ``max_resumed_prompts`` prompts at a time.
    ``continuations`` (causal LMs, the ``sequence`` target): per prompt the object's tokens, scored
    P(all of them), teacher-forced.
    """
    unique: dict[tuple, int] = {}
    todo: list[Intervention] = []
    for item in rows:
        if item.key() not in unique:
            unique[item.key()] = len(todo)
            todo.append(item)

    def scaling(chunk: Sequence[Intervention]):
        def scaled(batch: Sequence[int], positions: torch.Tensor):
            return scale_neurons_per_row(model, [chunk[k].neurons for k in batch], [chunk[k].factor for k in batch], positions)
        return scaled

    if continuations is not None:
        probs = score_continuations(model, encoded, [continuations[item.prompt] for item in todo], batch_size=batch_size,
                                    items=[item.prompt for item in todo], edit=scaling(todo),
                                    progress="forward batches" if progress else None).prob
    else:
        probs = np.empty(len(todo), dtype=np.float64)
        first_edited = [first_scaled_layer(item) for item in todo]
        starts = [() if layer is None else (layer,) for layer in first_edited]
        for indices, resume in unedited_chunks(model, encoded, [item.prompt for item in todo], starts,
                                               max_prompts=max_resumed_prompts, batch_size=batch_size):
            chunk = [todo[k] for k in indices]
            probs[indices] = score_targets(model, encoded, [gold_ids[item.prompt] for item in chunk], batch_size=batch_size,
                                           items=[item.prompt for item in chunk], edit=scaling(chunk),
                                           progress="forward batches" if progress else None,
                                           resume=resume, first_edited=[first_edited[k] for k in indices]).prob
    return np.array([probs[unique[item.key()]] for item in rows], dtype=np.float64)


def draw_other_facts(relations: Sequence[str], n_facts: Mapping[str, int], relation: str, seed: int) -> list[tuple[str, int]]:
    """For each fact of ``relation``, the (relation, fact_id) of one fact of another relation.

    Replays the authors' single stream (SPEC §5, §13): ``random.Random(seed)``, relations
    in sorted order, facts in order, per fact ``choice(other relations)`` then
    ``randint(0, N - 1)``. Relations before ``relation`` are replayed (cheap: no model
    calls), so a per-relation job draws exactly what one process over all relations
    would, and both methods get the same draws. Empty with fewer than two relations.
    """
    ordered = sorted(relations)
    if relation not in ordered:
        raise ValueError(f"relation {relation} is not among the selected relations {ordered}")
    if len(ordered) < 2:
        return []
    rng = random.Random(seed)
    for current in ordered:
        others = [r for r in ordered if r != current]
        draws = []
        for _ in range(n_facts[current]):
            other = rng.choice(others)
            draws.append((other, rng.randint(0, n_facts[other] - 1)))
        if current == relation:
            return draws
    raise AssertionError("unreachable: relation is in ordered")


def layer_matched_random(reference: Sequence[Neuron], n_units: int, rng: np.random.Generator) -> list[Neuron]:
    """For each neuron of ``reference`` (in order), a random neuron of the same layer.

    Draws are without replacement and never hit a neuron of ``reference`` itself, so
    the control has the same size and layer profile but no overlap. Prefixes of the
    result are layer-matched to prefixes of ``reference`` (used for the dose curve).
    When a layer has no unit left (a narrow FFN with a long reference, e.g. a dose of
    300 in a 128-unit layer) the control stops there: it returns the layer-matched prefix,
    and callers record how many neurons were actually scaled (``n_neurons``).
    """
    taken = set(reference)
    out: list[Neuron] = []
    for layer, _ in reference:
        free = n_units - sum(1 for (l, _u) in taken if l == layer)
        if free <= 0:
            break
        while True:
            candidate = (int(layer), int(rng.integers(n_units)))
            if candidate not in taken:
                break
        taken.add(candidate)
        out.append(candidate)
    return out


def random_controls(
    relation: str,
    seed: int,
    facts: Sequence[int],
    knowledge_neurons: Mapping[int, Sequence[Neuron]],
    ranking: Mapping[int, Sequence[Neuron]],
    n_units: int,
    dose_max: int,
) -> tuple[dict[int, list[Neuron]], dict[int, list[Neuron]]]:
    """The random-neuron control of one relation: per fact a layer-matched random set for its
    knowledge neurons, and one for the top ``dose_max`` of its attribution ranking (the dose curve).

    Seeded per relation (jobs run per relation), facts in order, sets before rankings.
    """
    rng = np.random.default_rng([int(seed), zlib.crc32(relation.encode())])
    sets: dict[int, list[Neuron]] = {}
    ranked: dict[int, list[Neuron]] = {}
    for fact in facts:
        sets[fact] = layer_matched_random(knowledge_neurons.get(fact, []), n_units, rng)
        ranked[fact] = layer_matched_random(list(ranking.get(fact, []))[:dose_max], n_units, rng)
    return sets, ranked


def rank_by_attribution(scores: pd.DataFrame) -> dict[int, list[Neuron]]:
    """Per fact, its neurons ranked by the sum over prompts of score / that prompt's max.

    Normalising by each prompt's maximum keeps one high-magnitude prompt from dominating
    (the same scale-free view as the coarse threshold t x max). Only stored scores exist
    (>= ig.storage_ratio x max); unstored ones count as 0, so a fact may rank fewer
    neurons than the largest dose k. Ties: ascending (layer, neuron).
    """
    if scores.empty:
        return {}
    prompt_max = scores.groupby(["fact_id", "template_id"])["score"].transform("max").to_numpy(dtype=np.float64)
    frame = scores[["fact_id", "layer", "neuron"]].assign(weight=scores["score"].to_numpy(dtype=np.float64) / prompt_max)
    totals = frame.groupby(["fact_id", "layer", "neuron"], as_index=False)["weight"].sum()
    totals = totals.sort_values(["fact_id", "weight", "layer", "neuron"], ascending=[True, False, True, True], kind="stable")
    return {
        int(fact): list(zip(group["layer"].astype(int), group["neuron"].astype(int)))
        for fact, group in totals.groupby("fact_id", sort=True)
    }


def fact_sums(results: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per fact (and ``keys``): Σ p0, Σ Δ_suppress, Σ Δ_amplify over its prompts, and #neurons."""
    frame = results.assign(
        d_suppress=results["p_suppress"] - results["p0"], d_amplify=results["p_amplify"] - results["p0"]
    )
    return frame.groupby([*keys, "fact_id"], as_index=False, sort=True).agg(
        p0=("p0", "sum"), d_suppress=("d_suppress", "sum"), d_amplify=("d_amplify", "sum"),
        n_neurons=("n_neurons", "first"), n_prompts=("p0", "size"),
    )


def ratio_of_averages(delta: np.ndarray, p0: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """mean(Δp) / mean(p0) over prompts, from per-fact sums (prompt counts cancel).

    ``delta`` and ``p0`` are [..., n_facts] per-fact sums; ``weights`` (same shape or
    broadcastable) are how often each fact counts (bootstrap multiplicities, or a 0/1
    mask for the variant without zero-KN facts). NaN where no p0 mass is left.
    """
    w = np.ones_like(p0) if weights is None else weights
    num = (delta * w).sum(axis=-1)
    den = (p0 * w).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_counts(n_facts: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n_facts] multiplicities of the facts in ``resamples`` draws with replacement."""
    idx = rng.integers(0, n_facts, size=(resamples, n_facts))
    counts = np.zeros((resamples, n_facts), dtype=np.float64)
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)
    return counts


def summarize(results: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    """Per relation and overall (unweighted mean over relations) ratio of averages, with 95% CIs.

    ``results`` holds per-prompt rows (relation, target own/other, method, fact_id,
    n_neurons, p0, p_suppress, p_amplify). Metrics: suppress/amplify x own/other (the
    paper's rm_own, eh_own, rm_oth, eh_oth). Variants: "all" facts (zero-KN facts count
    with Δ = 0, as in the paper) and "with_kn" (only facts whose set is non-empty).
    CIs: percentile bootstrap over facts within each relation, one resampling per
    relation (relations in sorted order, ``np.random.default_rng(seed)``) shared by all
    methods, targets and metrics, so comparisons are paired; the overall CI averages the
    resampled relation ratios (relations fixed, facts resampled).
    """
    sums = fact_sums(results, ["relation", "target", "method"])
    rng = np.random.default_rng(seed)
    stats: dict[tuple[str, str, str], dict[str, tuple[float, np.ndarray, int]]] = {}
    for relation, rel in sums.groupby("relation", sort=True):
        facts = np.sort(rel["fact_id"].unique())
        counts = bootstrap_counts(len(facts), resamples, rng) if resamples > 0 else None
        for (target, method), group in rel.groupby(["target", "method"], sort=True):
            pos = np.searchsorted(facts, group["fact_id"].to_numpy())

            def spread(values: np.ndarray) -> np.ndarray:
                out = np.zeros(len(facts))
                out[pos] = values
                return out

            p0 = spread(group["p0"].to_numpy())
            masks = {"all": spread(np.ones(len(group))), "with_kn": spread((group["n_neurons"].to_numpy() > 0) * 1.0)}
            for op in ("suppress", "amplify"):
                delta = spread(group[f"d_{op}"].to_numpy())
                for variant, mask in masks.items():
                    ratio = float(ratio_of_averages(delta, p0, mask))
                    samples = ratio_of_averages(delta, p0, counts * mask) if counts is not None else np.full(1, np.nan)
                    stats.setdefault((method, f"{op}_{target}", variant), {})[relation] = (ratio, samples, int(mask.sum()))
    rows = []
    for (method, metric, variant), by_relation in sorted(stats.items()):
        for relation, (ratio, samples, n) in by_relation.items():
            rows.append(_summary_row(relation, method, metric, variant, ratio, samples, n))
        ratios = np.array([r for r, _, _ in by_relation.values()])
        samples = np.stack([s for _, s, _ in by_relation.values()])
        with warnings.catch_warnings():  # all-NaN (no relation has a fact with KNs): NaN is the answer
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, mean_samples = float(np.nanmean(ratios)), np.nanmean(samples, axis=0)
        n_total = sum(n for _, _, n in by_relation.values())
        rows.append(_summary_row("mean", method, metric, variant, mean, mean_samples, n_total))
    return pd.DataFrame(rows, columns=list(EFFECT_SUMMARY.columns))


def _summary_row(relation: str, method: str, metric: str, variant: str, ratio: float, samples: np.ndarray, n: int) -> dict:
    low, high = percentile_ci(samples)
    return {"relation": relation, "method": method, "metric": metric, "variant": variant, "ratio": ratio,
            "ci_low": low, "ci_high": high, "n_facts": n}


def summarize_dose(dose: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    """Dose-response: per relation, method and k the suppression ratio of averages, and the mean over relations.

    ``n_neurons`` is the mean number of neurons actually scaled (a ranking can be shorter
    than k). CIs: the same fact bootstrap as :func:`summarize` (one resampling per relation
    shared by all methods and k).
    """
    frame = dose.assign(d_suppress=dose["p_suppress"] - dose["p0"])
    sums = frame.groupby(["relation", "method", "k", "fact_id"], as_index=False, sort=True).agg(
        p0=("p0", "sum"), d_suppress=("d_suppress", "sum"), n_neurons=("n_neurons", "first")
    )
    rng = np.random.default_rng(seed)
    rows, per_curve = [], {}
    for relation, rel in sums.groupby("relation", sort=True):
        facts = np.sort(rel["fact_id"].unique())
        counts = bootstrap_counts(len(facts), resamples, rng) if resamples > 0 else None
        for (method, k), group in rel.groupby(["method", "k"], sort=True):
            pos = np.searchsorted(facts, group["fact_id"].to_numpy())
            p0, delta = np.zeros(len(facts)), np.zeros(len(facts))
            p0[pos], delta[pos] = group["p0"].to_numpy(), group["d_suppress"].to_numpy()
            ratio = float(ratio_of_averages(delta, p0))
            samples = ratio_of_averages(delta, p0, counts) if counts is not None else np.full(1, np.nan)
            n_neurons = float(group["n_neurons"].mean())
            rows.append([relation, method, int(k), ratio, *percentile_ci(samples), n_neurons])
            per_curve.setdefault((method, int(k)), []).append((ratio, samples, n_neurons))
    for (method, k), items in sorted(per_curve.items()):
        with warnings.catch_warnings():  # all-NaN slices: NaN is the answer
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_samples = np.nanmean(np.stack([s for _, s, _ in items]), axis=0)
        rows.append(["mean", method, k, float(np.nanmean([r for r, _, _ in items])), *percentile_ci(mean_samples),
                     float(np.mean([n for _, _, n in items]))])
    return pd.DataFrame(rows, columns=list(DOSE_SUMMARY.columns))


def percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the finite bootstrap samples (NaN when there are none)."""
    finite = samples[np.isfinite(samples)]
    if not finite.size:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class EvaluationInputs:
    """Everything one relation's evaluation needs, already resolved to prompt indices.

    ``prompts`` has one row per encoded prompt (relation, fact_id, template_id), aligned
    with ``encoded`` and ``gold_ids``. ``neuron_sets[method][fact]`` is the set a method
    scales (the KN list, or the random control); ``rankings[method][fact]`` its neurons
    by decreasing attribution for the dose curve; ``draws[fact]`` the other-relation fact.
    """

    relation: str
    encoded: EncodedPrompts
    gold_ids: Sequence[int]
    prompts: pd.DataFrame
    facts: Sequence[int]
    draws: Mapping[int, tuple[str, int]]
    neuron_sets: Mapping[str, Mapping[int, Sequence[Neuron]]]
    rankings: Mapping[str, Mapping[int, Sequence[Neuron]]]
    continuations: Sequence[Sequence[int]] | None = None  # causal ``sequence`` target: each prompt's object tokens


def relation_inputs(
    relation: str,
    prompts: Mapping[str, pd.DataFrame],
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    neurons: Mapping[str, Mapping[int, Sequence[Neuron]]],
    scores: pd.DataFrame,
    *,
    random_control: bool,
    n_units: int,
    dose_ks: Sequence[int],
    codec: PromptCodec | None = None,
) -> EvaluationInputs:
    """Resolve one relation's evaluation: the other-relation draws, the prompts they need (their
    objects one token of ``tokenizer``), the neuron sets per method and the dose rankings.

    ``prompts`` maps every selected relation to its studied prompt rows; ``neurons`` is the
    relation's refined neurons per method; ``scores`` its stored attribution scores. ``codec``
    (default: a masked LM's) says how the model reads prompts: a causal LM uses only the
    templates it reads, the object's first token after each prompt (or, with the ``sequence``
    target, all its tokens).
    """
    codec = codec or PromptCodec(tokenizer, causal=False)
    n_facts = {rel: int(frame["fact_id"].max()) + 1 if len(frame) else 0 for rel, frame in prompts.items()}
    if relation not in n_facts:
        raise ValueError(f"evaluate {relation}: its prompt table is not among the inputs ({sorted(n_facts)})")
    draws = dict(enumerate(draw_other_facts(list(n_facts), n_facts, relation, seed)))
    if not draws:
        log.warning("only one relation selected: no other-relation prompts to evaluate")
    needed = {(relation, f) for f in range(n_facts[relation])} | set(draws.values())
    table = pd.concat(list(prompts.values()), ignore_index=True)
    table["relation"] = table["relation"].astype(str)
    table = table[[key in needed for key in zip(table["relation"], table["fact_id"])]]
    continuations = None
    if codec.causal:
        table = codec.usable_rows(table)
        ids = codec.target_ids(table["prompt"].tolist(), table["object"].tolist())
        if min(ids, default=0) < 0:
            log.warning("%d prompts skipped: object not separable from the prompt's tokens", sum(i < 0 for i in ids))
        table = table[np.array(ids) >= 0].reset_index(drop=True)
        encoded = codec.encode(table["prompt"].tolist())
        gold_ids = codec.target_ids(table["prompt"].tolist(), table["object"].tolist())
        continuations = codec.continuations(table["prompt"].tolist(), table["object"].tolist())
    else:
        gold = {obj: object_token_id(tokenizer, obj) for obj in table["object"].unique()}
        no_gold = sorted(obj for obj, token in gold.items() if token is None)
        if no_gold:
            log.warning("%d objects are not one token and their facts are skipped: %s", len(no_gold), no_gold[:10])
        table = table[table["object"].map(gold).notna()].reset_index(drop=True)
        encoded = encode_prompts(tokenizer, table["prompt"].tolist())
        gold_ids = [int(gold[obj]) for obj in table["object"]]
    rankings: dict[str, dict[int, list[Neuron]]] = {m: rank_by_attribution(scores[scores["method"] == m]) for m in METHODS}
    facts = sorted(set(table.loc[table["relation"] == relation, "fact_id"].astype(int)))
    neuron_sets: dict[str, Mapping[int, Sequence[Neuron]]] = {m: neurons[m] for m in METHODS}
    if random_control:  # same size and layers as the IG sets / the IG ranking
        neuron_sets["random"], rankings["random"] = random_controls(
            relation, seed, facts, neurons["ig"], rankings["ig"], n_units, max(dose_ks, default=0))
    return EvaluationInputs(relation, encoded, gold_ids, table[["relation", "fact_id", "template_id"]], facts, draws,
                            neuron_sets, rankings, continuations)


def evaluate_relation(
    model: nn.Module,
    inputs: EvaluationInputs,
    *,
    suppress_factor: float,
    amplify_factor: float,
    dose_ks: Sequence[int],
    batch_size: int = 64,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-prompt probabilities for suppress/amplify (own and other prompts) and the dose curve.

    Every (prompt, neuron set, factor) is one row of a batched forward pass; the rows of
    all facts, methods and doses share batches. The dose curve suppresses the top-k
    ranked neurons on the fact's own prompts: len(dose_ks) x len(methods) extra rows per
    prompt (fewer when a ranking is shorter than k and the sets repeat).
    """
    index = {(r, f, t): i for i, (r, f, t) in enumerate(zip(inputs.prompts["relation"], inputs.prompts["fact_id"],
                                                          inputs.prompts["template_id"]))}
    by_fact: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for (rel, fact, template), i in sorted(index.items()):
        by_fact.setdefault((rel, fact), []).append((template, i))

    plan: list[tuple[str, dict]] = []  # (table, row metadata) aligned with rows
    rows: list[Intervention] = []
    for fact in inputs.facts:
        targets = [("own", (inputs.relation, fact))]
        if fact in inputs.draws:
            targets.append(("other", inputs.draws[fact]))
        for target, (prompt_rel, prompt_fact) in targets:
            if (prompt_rel, prompt_fact) not in by_fact:  # e.g. a drawn fact whose object is not one token
                log.warning("%s fact %d: no prompts for %s fact %s %d; skipped", inputs.relation, fact, target,
                            prompt_rel, prompt_fact)
                continue
            for template, i in by_fact[(prompt_rel, prompt_fact)]:
                for method, sets in inputs.neuron_sets.items():
                    neurons = tuple(sets.get(fact, ()))
                    meta = {"relation": inputs.relation, "fact_id": fact, "target": target, "prompt_relation": prompt_rel,
                            "prompt_fact_id": prompt_fact, "template_id": template, "method": method,
                            "n_neurons": len(neurons)}
                    for column, factor in (("p0", 1.0), ("p_suppress", suppress_factor), ("p_amplify", amplify_factor)):
                        plan.append(("result", {**meta, "column": column}))
                        rows.append(Intervention(i, () if column == "p0" else neurons, factor))
        for template, i in by_fact[(inputs.relation, fact)]:
            for method, ranking in inputs.rankings.items():
                ranked = list(ranking.get(fact, ()))
                for k in dose_ks:
                    neurons = tuple(ranked[:k])
                    meta = {"relation": inputs.relation, "fact_id": fact, "template_id": template, "method": method,
                            "k": k, "n_neurons": len(neurons)}
                    for column, factor in (("p0", 1.0), ("p_suppress", suppress_factor)):
                        plan.append(("dose", {**meta, "column": column}))
                        rows.append(Intervention(i, () if column == "p0" else neurons, factor))
    log.info("%s: %d intervention rows (%d distinct forward rows)", inputs.relation, len(rows),
             len({r.key() for r in rows}))
    probs = gold_probabilities(model, inputs.encoded, inputs.gold_ids, rows, batch_size=batch_size, progress=True,
                               continuations=inputs.continuations)
    return _pivot(plan, probs, "result", EVALUATION.columns), _pivot(plan, probs, "dose", DOSE.columns)


def _pivot(plan: list[tuple[str, dict]], probs: np.ndarray, table: str, columns: list[str]) -> pd.DataFrame:
    """Gather the probability rows of one table into one row per (prompt, method[, k])."""
    records: dict[tuple, dict] = {}
    for (kind, meta), p in zip(plan, probs):
        if kind != table:
            continue
        key = tuple(v for k, v in meta.items() if k != "column")
        records.setdefault(key, {k: v for k, v in meta.items() if k != "column"})[meta["column"]] = float(p)
    return pd.DataFrame(list(records.values()), columns=columns)


METHOD_LABELS = {"ig": "Ours (IG)", "base": "Baseline", "random": "Random"}


def effects_markdown(summary: pd.DataFrame) -> str:
    """Overall means (with CIs) beside the paper's numbers, then the per-relation own-prompt ratios."""
    methods = [m for m in METHOD_LABELS if m in set(summary["method"])]
    mean = summary[summary["relation"] == "mean"].set_index(["metric", "variant", "method"])
    out = io.StringIO()
    out.write("# Suppressing and amplifying knowledge neurons (SPEC §5)\n\n")
    out.write("Ratio of averages mean(Δp) / mean(p0) per relation, then the unweighted mean over relations; "
              "95% bootstrap CIs over facts. `all`: every studied fact (zero-KN facts count with Δ = 0, as in the "
              "paper); `with_kn`: only facts with at least one neuron.\n\n")
    out.write("| metric | variant | " + " | ".join(METHOD_LABELS[m] for m in methods) + " | paper ours | paper baseline |\n")
    out.write("|---|---|" + "---|" * len(methods) + "---|---|\n")
    for metric, variant in sorted({(m, v) for m, v, _ in mean.index}):
        cells = [_ci_cell(mean.loc[(metric, variant, m)]) if (metric, variant, m) in mean.index else "" for m in methods]
        paper = PAPER.get(metric, {}) if variant == "all" else {}
        out.write(f"| {metric} | {variant} | " + " | ".join(cells) + f" | {_signed_pct(paper.get('ig'))} | "
                  f"{_signed_pct(paper.get('base'))} |\n")
    per = summary[(summary["relation"] != "mean") & (summary["variant"] == "all")
                  & summary["metric"].isin(["suppress_own", "amplify_own"])]
    table = per.pivot_table(index="relation", columns=["metric", "method"], values="ratio")
    out.write("\n## Per relation (own prompts, all facts)\n\n| relation | "
              + " | ".join(f"{metric} {METHOD_LABELS[m]}" for metric, m in table.columns) + " |\n")
    out.write("|---|" + "---|" * len(table.columns) + "\n")
    for relation, row in table.iterrows():
        out.write(f"| {relation} | " + " | ".join(f"{v:+.2%}" for v in row.to_numpy()) + " |\n")
    return out.getvalue()


def _ci_cell(row: pd.Series) -> str:
    return f"{row.ratio:+.2%} [{row.ci_low:+.2%}, {row.ci_high:+.2%}]"


def _signed_pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.2%}"
