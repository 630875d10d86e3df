"""Positive controls, part two: what the unchanged study recovers of the storage planted by kn.planting.

The planted copy of the model went through the same attribute -> refine -> evaluate -> localise rules as the
run's own model (a nested run of this workflow, ``workflow/rules/controls.smk``). Here, per planted fact:

* recall: the share of its planted units in its refined knowledge-neuron set, for IG and the activation
  baseline, and whether any was found; the planted units' best rank among each prompt's IG scores;
* suppress x0 / amplify x2 of the planted units alone (computed here) beside the refined set's (the evaluate
  rule's) and beside the ceiling of zeroing the planted layer's whole FFN at the target position (localise);
* the paper's update rule (SPEC §7, same lambdas) through the planted units and through the refined IG set,
  sampled as the authors sample edits, with the relation's studied facts as the pool of new objects; the
  relation-level filter is not applied (planted units are unique to their fact by construction);
* why an update may not land: the rank of the new object after adding its token vector (the one the update
  writes) to the final hidden state at the target position, at 1, 4 and 16 times that state's norm.

Every aggregate is a ratio of sums over facts with a 95% bootstrap interval over facts (kn.interventions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn

from kn.editing import PromptScorer, update_study
from kn.interventions import Intervention, bootstrap_counts, gold_probabilities, percentile_ci, ratio_of_averages
from kn.localise import ablation_name
from kn.models.encoding import PromptCodec
from kn.models.readout import READOUT_SCALES, embedding_readout_ranks
from kn.tables import PLANTED_LAYERS, PLANTED_SUMMARY, Attribution, Fact, Neuron

ALL = "ALL"


@dataclass(frozen=True)
class PlantedStudy:
    """One planted fact as the planting record and the nested study see it."""

    relation: str
    fact_id: int  # in the planted study's data
    layer: int
    units: tuple[Neuron, ...]
    fact: Fact  # its prompts, from the planted study's ingested data


def planted_facts(record: Mapping[str, Any], facts: Mapping[str, Sequence[Fact]]) -> list[PlantedStudy]:
    """The planting record's facts joined with the planted study's facts (same relation, fact_id, subject)."""
    out = []
    for entry in record["facts"]:
        relation, fact_id = str(entry["relation"]), int(entry["fact_id"])
        fact = facts[relation][fact_id]
        if fact.subject != entry["subject"] or fact.object != entry["object"]:
            raise ValueError(f"planted fact {relation}:{fact_id} is ({entry['subject']!r}, {entry['object']!r}) in "
                             f"planting.json but ({fact.subject!r}, {fact.object!r}) in the planted study's data")
        out.append(PlantedStudy(relation, fact_id, int(entry["layer"]),
                                tuple((int(entry["layer"]), int(u)) for u in entry["units"]), fact))
    return out


# ---------------------------------------------------------------------------------------------- from the study
def best_planted_rank(scores: pd.DataFrame, units: Sequence[Neuron]) -> float:
    """Median over the fact's prompts of the best rank of a planted unit among the prompt's IG scores (1 = top).

    Scores below the attribution's storage ratio are not stored; a prompt on which no planted unit was stored
    counts as one past its stored scores (a lower bound on its rank)."""
    wanted = set(units)
    ranks = []
    for _, prompt in scores.groupby(["template_id"], sort=True):
        values = prompt["score"].to_numpy()
        mine = [s for layer, unit, s in zip(prompt["layer"], prompt["neuron"], values) if (int(layer), int(unit)) in wanted]
        ranks.append(len(values) + 1 if not mine else int((values > max(mine)).sum()) + 1)
    return float(np.median(ranks)) if ranks else math.nan


def study_rows(planted: Sequence[PlantedStudy], neurons: Mapping[str, Mapping[str, Mapping[int, list[Neuron]]]],
               attribution: Mapping[str, Attribution], evaluation: Mapping[str, pd.DataFrame],
               localisation: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per planted fact: recall, refined-set sizes, the planted units' IG rank, and the per-fact sums of the
    refined set's suppress/amplify (evaluate) and of the planted layer's FFN ceiling (localise)."""
    rows = []
    for item in planted:
        units = set(item.units)
        row: dict[str, Any] = {"relation": item.relation, "fact_id": item.fact_id, "layer": item.layer,
                               "units": len(units)}
        for method in ("ig", "base"):
            found = neurons[item.relation][method].get(item.fact_id, [])
            row[f"{method}_found"] = len(units & set(found))
            row[f"{method}_size"] = len(found)
        scores = attribution[item.relation].scores
        row["ig_rank"] = best_planted_rank(scores[(scores["fact_id"] == item.fact_id) & (scores["method"] == "ig")],
                                           item.units)
        own = evaluation[item.relation]
        own = own[(own["fact_id"] == item.fact_id) & (own["target"] == "own") & (own["method"] == "ig")]
        row["ig_p0"] = float(own["p0"].sum())
        row["ig_suppress"] = float((own["p_suppress"] - own["p0"]).sum())
        row["ig_amplify"] = float((own["p_amplify"] - own["p0"]).sum())
        ablated = localisation[item.relation]
        ablated = ablated[(ablated["fact_id"] == item.fact_id)
                          & (ablated["ablation"] == ablation_name("ffn", "mask", item.layer))]
        row["ceiling_p0"] = float(ablated["p0"].sum())
        row["ceiling"] = float((ablated["p_ablated"] - ablated["p0"]).sum())
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- on the model
def planted_effects(model: nn.Module, codec: PromptCodec, planted: Sequence[PlantedStudy], *, suppress: float,
                    amplify: float, batch_size: int) -> pd.DataFrame:
    """Per planted fact, the sums over its prompts of P(object) and of its change when only the planted units are
    scaled by ``suppress`` / ``amplify`` at the target position."""
    prompts = [p for item in planted for p in item.fact.prompts]
    owner = [k for k, item in enumerate(planted) for _ in item.fact.prompts]
    gold = codec.target_ids(prompts, [planted[k].fact.object for k in owner])
    rows = [Intervention(i, planted[k].units, factor) for factor in (1.0, suppress, amplify) for i, k in enumerate(owner)]
    probs = gold_probabilities(model, codec.encode(prompts), gold, rows, batch_size=batch_size).reshape(3, len(prompts))
    frame = pd.DataFrame({"item": owner, "p0": probs[0], "suppress": probs[1] - probs[0], "amplify": probs[2] - probs[0]})
    sums = frame.groupby("item").sum()
    return pd.DataFrame({"relation": [item.relation for item in planted], "fact_id": [item.fact_id for item in planted],
                         "planted_p0": sums["p0"].to_numpy(), "planted_suppress": sums["suppress"].to_numpy(),
                         "planted_amplify": sums["amplify"].to_numpy()})


def update_pool(planted: Sequence[PlantedStudy], studied: Mapping[str, Sequence[Fact]],
                sets: Mapping[tuple[str, int], Sequence[Neuron]]) -> tuple[dict[str, list[Fact]], dict[str, list[list[Neuron]]]]:
    """The facts the update study samples from, per planted relation: its planted facts (fact ids 0..) with the
    neurons in ``sets``, then its studied facts (ids after them) with none, which only supply new objects and
    perplexity prompts (an edit drawn on one is skipped as having no neurons)."""
    facts: dict[str, list[Fact]] = {}
    lists: dict[str, list[list[Neuron]]] = {}
    for item in planted:
        facts.setdefault(item.relation, []).append(item.fact)
        lists.setdefault(item.relation, []).append(list(sets.get((item.relation, item.fact_id), [])))
    for relation in facts:
        for fact in studied.get(relation, []):
            facts[relation].append(Fact(relation, len(facts[relation]), fact.subject, fact.object, fact.template_ids,
                                        fact.prompts))
            lists[relation].append([])
    return facts, lists


def updates_through(scorer: PromptScorer, planted: Sequence[PlantedStudy], studied: Mapping[str, Sequence[Fact]],
                    sets: Mapping[tuple[str, int], Sequence[Neuron]], settings: Mapping[str, Any], seed: int) -> pd.DataFrame:
    """The paper's update (SPEC §7) of the planted facts through ``sets``, one row per edit (kn.editing's columns)."""
    facts, lists = update_pool(planted, studied, sets)
    edits, _ = update_study(scorer, facts, lists, seed=seed, methods=["kn"],
                            edits_per_relation=int(settings["edits_per_relation"]),
                            max_attempts=int(settings["max_attempts"]), share=math.inf, rule="paper",
                            ppl_facts=int(settings["ppl_facts"]), lambda1=float(settings["lambda1"]),
                            lambda2=float(settings["lambda2"]), success_k=int(settings["success_k"]))
    return edits


def readout_ranks(model: nn.Module, codec: PromptCodec, planted: Sequence[PlantedStudy],
                  studied: Mapping[str, Sequence[Fact]], batch_size: int) -> pd.DataFrame:
    """Per planted fact, the median over its prompts of the rank of a new object t' (the first studied object of
    its relation that differs from its own) with t''s token vector added to the final hidden state at the target
    position at ``s`` times that state's norm (kn.models.readout), for s = 0 (unchanged) and READOUT_SCALES."""
    scales = (0.0, *READOUT_SCALES)
    rows = []
    for item in planted:
        others = [f.object for f in studied.get(item.relation, []) if f.object != item.fact.object]
        new_id = codec.target_id(item.fact.prompts[0], others[0]) if others else None
        row: dict[str, Any] = {"relation": item.relation, "fact_id": item.fact_id,
                               "new_object": others[0] if others else None}
        if new_id is not None:
            ranks = embedding_readout_ranks(model, codec.encode(list(item.fact.prompts)),
                                            [new_id] * len(item.fact.prompts), scales, batch_size)
            row.update({f"readout_rank_x{scale:g}": float(np.median(ranks[:, k])) for k, scale in enumerate(scales)})
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- aggregates
def _ratio(num: np.ndarray, den: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """sum(num) / sum(den) over facts and its 95% bootstrap interval over facts."""
    if not len(num):
        return math.nan, math.nan, math.nan
    point = float(ratio_of_averages(num, den))
    low, high = percentile_ci(ratio_of_averages(num, den, bootstrap_counts(len(num), resamples, rng)))
    return point, low, high


def summary_table(facts: pd.DataFrame, updates: Mapping[str, pd.DataFrame], resamples: int, seed: int) -> pd.DataFrame:
    """One row per relation and ``ALL``: every aggregate of the module doc with its interval.

    ``facts``: :func:`study_rows` joined with :func:`planted_effects` and :func:`readout_ranks`; ``updates``:
    {"planted": edits, "ig": edits} from :func:`updates_through`."""
    rows = []
    for relation in [*sorted(facts["relation"].unique()), ALL]:
        group = facts if relation == ALL else facts[facts["relation"] == relation]
        rng = np.random.default_rng(seed)
        row: dict[str, Any] = {"relation": relation, "facts": len(group), "planted_units": int(group["units"].sum())}
        for method in ("ig", "base"):
            row[f"{method}_recall"], row[f"{method}_recall_low"], row[f"{method}_recall_high"] = _ratio(
                group[f"{method}_found"].to_numpy(float), group["units"].to_numpy(float), resamples, rng)
            row[f"{method}_facts_found"] = float((group[f"{method}_found"] > 0).mean()) if len(group) else math.nan
            row[f"{method}_set_size"] = float(group[f"{method}_size"].mean()) if len(group) else math.nan
        row["ig_rank_median"] = float(group["ig_rank"].median()) if len(group) else math.nan
        for name, num, den in (("suppress_planted", "planted_suppress", "planted_p0"),
                               ("amplify_planted", "planted_amplify", "planted_p0"),
                               ("suppress_ig", "ig_suppress", "ig_p0"), ("amplify_ig", "ig_amplify", "ig_p0"),
                               ("ceiling_layer", "ceiling", "ceiling_p0")):
            row[name], row[f"{name}_low"], row[f"{name}_high"] = _ratio(group[num].to_numpy(float),
                                                                        group[den].to_numpy(float), resamples, rng)
        for name, edits in updates.items():
            mine = edits if relation == ALL else edits[edits["relation"] == relation]
            per_fact = mine.groupby(["relation", "fact_id"])["success"].agg(["sum", "count"])
            row[f"update_{name}_edits"] = int(per_fact["count"].sum())
            (row[f"update_{name}_success"], row[f"update_{name}_success_low"],
             row[f"update_{name}_success_high"]) = _ratio(per_fact["sum"].to_numpy(float),
                                                          per_fact["count"].to_numpy(float), resamples, rng)
        row["readout_rank_x16"] = float(group["readout_rank_x16"].median()) if "readout_rank_x16" in group else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=list(PLANTED_SUMMARY.columns))


def layer_table(facts: pd.DataFrame, n_layers: int, resamples: int, seed: int) -> pd.DataFrame:
    """Recall by planted layer, IG and baseline, with 95% bootstrap intervals over facts (empty layers NaN)."""
    rows = []
    for layer in range(n_layers):
        group = facts[facts["layer"] == layer]
        rng = np.random.default_rng(seed)
        row: dict[str, Any] = {"layer": layer, "facts": len(group), "planted_units": int(group["units"].sum())}
        for method in ("ig", "base"):
            row[f"{method}_recall"], row[f"{method}_recall_low"], row[f"{method}_recall_high"] = _ratio(
                group[f"{method}_found"].to_numpy(float), group["units"].to_numpy(float), resamples, rng)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(PLANTED_LAYERS.columns))


def _pct(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:+.1f}%"


def _share(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.0f}%"


def control_lines(record: Mapping[str, Any], table: pd.DataFrame | None) -> list[str]:
    """The positive control in a few sentences (the summary's section and the markdown's head)."""
    accept = record["acceptance"]
    units = record["units_per_fact"]
    lines = [
        f"Planted {accept['planted_facts']} facts the model did not know ({len(record['unplanted'])} more could not "
        f"be planted at natural scale); the fewest natural-scale units that carry one: median {units['median']:g} "
        f"(range {units['min']}-{units['max']}); one unit alone carries {_share(record['single_unit_validation_top1'])} "
        "of validation prompts.",
        f"Planting acceptance {'passed' if accept['passed'] else 'FAILED'}: object top-1 on "
        f"{_share(accept['test_top1'])} of held-out-template prompts (need >= {_share(accept['thresholds']['test_top1'])}); "
        f"studied prompts' top-1 changed on {100 * accept['studied_top1_changed']:.1f}% (<= 1%), mean gold probability "
        f"{_pct(accept['studied_gold_prob_change'])} (within ±1%).",
    ]
    if table is None or table.empty:
        lines.append("The planted study did not run: a planting that fails its acceptance is not used.")
        return lines
    row = table[table["relation"] == ALL].iloc[0]
    lines += [
        f"IG recovers {_share(row['ig_recall'])} of {int(row['planted_units'])} planted units "
        f"[{_share(row['ig_recall_low'])}, {_share(row['ig_recall_high'])}] (any unit for {_share(row['ig_facts_found'])} of "
        f"facts; best planted rank, median {row['ig_rank_median']:g}); the activation baseline "
        f"{_share(row['base_recall'])} [{_share(row['base_recall_low'])}, {_share(row['base_recall_high'])}].",
        f"Suppressing the planted units alone: {_pct(row['suppress_planted'])}; the refined IG set (mean "
        f"{row['ig_set_size']:.1f} neurons): {_pct(row['suppress_ig'])}; zeroing the planted layer's FFN at the target: "
        f"{_pct(row['ceiling_layer'])}. Amplifying x2: planted {_pct(row['amplify_planted'])}, refined set "
        f"{_pct(row['amplify_ig'])}.",
        f"The paper's update rule moves a planted fact to its new object in {_share(row['update_planted_success'])} of "
        f"{int(row['update_planted_edits'])} edits through the planted units and {_share(row['update_ig_success'])} of "
        f"{int(row['update_ig_edits'])} through the refined set; adding the new object's token vector at 16x the final "
        f"hidden state's norm leaves it at median rank {row['readout_rank_x16']:g}.",
    ]
    return lines
