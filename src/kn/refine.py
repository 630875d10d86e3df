"""Knowledge-neuron refinement (SPEC §4): coarse sets per prompt, refined sets per fact, adaptive p.

Plain functions over long-format score tables (one row per stored (prompt, neuron) score,
columns fact_id, template_id, layer, neuron, score) so they can be tested on hand-built
tables. Everything follows the authors' code rather than the paper's text (SPEC §11.3):
"≥" comparisons, a floor of ``min_prompts`` on the count threshold, at most ``max_evals``
evaluations of p, and p accumulated in binary floating point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PROMPT_KEYS = ["fact_id", "template_id"]
SCORE_COLUMNS = ["fact_id", "template_id", "layer", "neuron", "score"]
NEURON_COLUMNS = ["fact_id", "layer", "neuron", "order"]


def coarse_sets(scores: pd.DataFrame, ratio: float) -> pd.DataFrame:
    """Per prompt, the neurons whose score is >= ``ratio`` x that prompt's maximum.

    The maximum is taken over the stored entries of the prompt (the storage filter keeps
    the maximum, so it is the global one). Compared in float64 like the authors' JSON
    floats. Rows come back sorted by (fact_id, template_id, layer, neuron): prompts in
    order and, within a prompt, ascending (l, i), which defines first appearance.
    """
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise ValueError(f"score table lacks columns {missing}; expected {SCORE_COLUMNS}")
    score = scores["score"].to_numpy(dtype=np.float64)
    prompt_max = scores.groupby(PROMPT_KEYS, sort=False)["score"].transform("max").to_numpy(dtype=np.float64)
    kept = scores.loc[score >= ratio * prompt_max, ["fact_id", "template_id", "layer", "neuron"]]
    return kept.sort_values(["fact_id", "template_id", "layer", "neuron"], kind="stable").reset_index(drop=True)


def neuron_counts(coarse: pd.DataFrame) -> pd.DataFrame:
    """Per fact and neuron: in how many prompts' coarse sets it is, and where it first appears.

    ``first`` is the row index of its first occurrence in ``coarse`` (already in
    first-appearance order), so sorting by it reproduces the authors' Counter order.
    This does not depend on p, so the adaptive loop computes it once.
    """
    positions = coarse.assign(first=np.arange(len(coarse), dtype=np.int64))
    grouped = positions.groupby(["fact_id", "layer", "neuron"], sort=False)
    counts = grouped.agg(count=("template_id", "size"), first=("first", "min")).reset_index()
    return counts.sort_values("first", kind="stable").reset_index(drop=True)


def refine_facts(counts: pd.DataFrame, n_prompts: pd.Series, p: float, min_prompts: int) -> pd.DataFrame:
    """Refined knowledge neurons per fact: count >= max(p x n_prompts(fact), min_prompts).

    ``n_prompts`` maps fact_id -> number of prompts of that fact. ``p * n`` is a float64
    product exactly as Python computes it, so accumulated p (0.6499999999999999) behaves
    as in the authors' code. Returns fact_id, layer, neuron, order (0-based position in
    the fact's first-appearance order).
    """
    unknown = sorted(set(counts["fact_id"].unique()) - set(n_prompts.index))
    if unknown:
        raise ValueError(f"score rows for fact_ids {unknown[:5]} that have no prompt count")
    n = n_prompts.reindex(counts["fact_id"]).to_numpy(dtype=np.float64)
    threshold = np.maximum(p * n, float(min_prompts))
    kept = counts.loc[counts["count"].to_numpy() >= threshold, ["fact_id", "layer", "neuron", "first"]]
    kept = kept.sort_values(["fact_id", "first"], kind="stable")
    kept["order"] = kept.groupby("fact_id").cumcount()
    return kept[NEURON_COLUMNS].reset_index(drop=True)


@dataclass
class AdaptiveResult:
    """Outcome of the adaptive-p loop for one relation and method."""

    p: float  # the p whose sets are kept (the last evaluation's)
    evaluations: list[dict[str, float]] = field(default_factory=list)  # [{p, avg}] in order
    in_target: bool = False  # False: no evaluation landed in [target_min, target_max]
    neurons: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=NEURON_COLUMNS))

    @property
    def avg_kn(self) -> float:
        return self.evaluations[-1]["avg"]


def adaptive_refine(
    counts: pd.DataFrame,
    n_prompts: pd.Series,
    *,
    p: float,
    p_step: float,
    max_evals: int,
    target_min: float,
    target_max: float,
    min_prompts: int,
) -> AdaptiveResult:
    """Adapt p per relation until the average #KN per fact lies in [target_min, target_max].

    The average divides by every fact in ``n_prompts`` (facts with no KNs count). p moves
    by ``p_step`` after each miss (down when too few, up when too many), accumulated by
    repeated float addition/subtraction as in the authors' code. After ``max_evals``
    misses the last evaluation's sets are kept and ``in_target`` is False; p can
    oscillate between two values, which this reports rather than hides.
    """
    if max_evals < 1:
        raise ValueError(f"refine.max_evals = {max_evals}; expected >= 1")
    n_facts = len(n_prompts)
    if n_facts == 0:
        raise ValueError("no facts to refine (empty prompt table)")
    result = AdaptiveResult(p=p)
    for _ in range(max_evals):
        neurons = refine_facts(counts, n_prompts, p, min_prompts)
        avg = len(neurons) / n_facts
        result.p, result.neurons = p, neurons
        result.evaluations.append({"p": p, "avg": avg})
        if target_min <= avg <= target_max:
            result.in_target = True
            break
        p = p - p_step if avg < target_min else p + p_step
    return result


def relation_level(neurons: pd.DataFrame, n_facts: int, share: float) -> list[list[int]]:
    """Neurons in the refined sets of >= ``share`` x n_facts facts, in first-appearance order.

    Order: facts in order, within a fact its KN order (like the authors' Counter).
    """
    ordered = neurons.sort_values(["fact_id", "order"], kind="stable")
    n_with = ordered.groupby(["layer", "neuron"], sort=False)["fact_id"].nunique()
    kept = n_with[n_with.to_numpy() >= share * n_facts]
    return [[int(layer), int(neuron)] for layer, neuron in kept.index]


def refine_relation(
    scores: pd.DataFrame, n_prompts: pd.Series, thresholds: dict[str, float], *, relation_share: float, **adaptive: float
) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Coarse sets, adaptive p and relation-level neurons of one relation, per method.

    ``scores`` holds the relation's stored scores of every method in ``thresholds`` (method
    -> coarse threshold ratio t); ``n_prompts`` the attributed prompts of each studied fact;
    ``adaptive`` are :func:`adaptive_refine`'s settings (p, p_step, max_evals, target_min,
    target_max, min_prompts). Returns the refined neurons (method, fact_id, layer, neuron,
    order) and per method the adaptive-p record.
    """
    tables, records = [], {}
    for method, t in thresholds.items():
        counts = neuron_counts(coarse_sets(scores[scores["method"] == method], t))
        result = adaptive_refine(counts, n_prompts, **adaptive)
        tables.append(result.neurons.assign(method=method))
        records[method] = {
            "t": t,
            "p": result.p,
            "evaluations": result.evaluations,
            "in_target": result.in_target,
            "avg_kn": result.avg_kn,
            "n_facts": len(n_prompts),
            "fact_ids": [int(f) for f in n_prompts.index],
            "relation_level": relation_level(result.neurons, len(n_prompts), relation_share),
        }
    return pd.concat(tables, ignore_index=True), records
