"""Every table passed between stages: its columns and types, and the one reader that checks it.

docs/CONTRACTS.md describes these files for people; this module is what the code uses. A
stage writes a table with ``SPEC.write(path, frame, provenance)`` and the next stage reads it
with ``SPEC.read(path, relation=...)``, which names the file, the missing columns and the
rule to rerun when the file does not hold what the contract says. The module also owns the
types shared by the science modules (a neuron, a fact) and the studied-fact selection.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import pyarrow as pa

from kn.io import read_parquet, read_provenance, write_parquet

Neuron = tuple[int, int]  # (layer, unit), both 0-based
METHODS = ("ig", "base")  # attribution methods: integrated gradients and the activation baseline (SPEC §3)

_S, _LS, _I16, _I32, _I64 = pa.string(), pa.large_string(), pa.int16(), pa.int32(), pa.int64()
_F32, _F64, _BOOL = pa.float32(), pa.float64(), pa.bool_()


@dataclass(frozen=True)
class Table:
    """A parquet table between stages: its name for messages, the rule that writes it, its schema."""

    name: str
    rule: str
    schema: pa.Schema

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def check(self, frame: pd.DataFrame, source: str | os.PathLike[str], relation: str | None = None) -> pd.DataFrame:
        """``frame`` if it has the contract's columns (and only ``relation``'s rows when given)."""
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"{source}: missing columns {missing} of the {self.name} table (expected {self.columns}, "
                f"docs/CONTRACTS.md); rerun rule {self.rule}"
            )
        if relation is not None and len(frame):
            found = sorted(set(frame["relation"].astype(str)))
            if found != [relation]:
                raise ValueError(f"{source}: holds relation(s) {found}; expected only {relation} (rule {self.rule})")
        return frame

    def read(self, path: str | os.PathLike[str], relation: str | None = None) -> pd.DataFrame:
        return self.check(read_parquet(path), path, relation)

    def write(self, path: str | os.PathLike[str], frame: pd.DataFrame, provenance: Mapping[str, Any]) -> None:
        write_parquet(path, frame[self.columns], provenance, schema=self.schema)

    def empty(self) -> pd.DataFrame:
        return self.schema.empty_table().to_pandas()


@dataclass(frozen=True)
class CsvTable:
    """A CSV table between stages (the summaries the report shows and the run summary reads)."""

    name: str
    rule: str
    columns: tuple[str, ...]

    def read(self, path: str | os.PathLike[str]) -> pd.DataFrame:
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: unreadable CSV ({exc}); rerun rule {self.rule}") from None
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} of the {self.name} table; rerun rule {self.rule}")
        return frame


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(fields))


# ---------------------------------------------------------------------------------------------- data
_PROMPT_FIELDS = (("relation", _LS), ("relation_label", _LS), ("lama_type", _LS), ("fact_id", _I32), ("subject", _LS),
                  ("object", _LS), ("template_id", _I32), ("template", _LS), ("prompt", _LS))
RELATION_PROMPTS = Table("relation prompts", "ingest_relation", _schema(*_PROMPT_FIELDS))
PROMPTS = Table("prompts", "ingest", _schema(*_PROMPT_FIELDS))
FACTS = Table("facts", "ingest", _schema(("relation", _LS), ("relation_label", _LS), ("lama_type", _LS),
                                         ("fact_id", _I32), ("subject", _LS), ("object", _LS), ("n_templates", _I32)))

# ---------------------------------------------------------------------------------------------- probe
PROBE = Table("probe", "probe", _schema(
    ("relation", _LS), ("fact_id", _I32), ("template_id", _I32), ("heldout", _BOOL), ("gold_id", _I32),
    ("gold_prob", _F32), ("gold_rank", _I32), ("pred_token", _LS), ("correct", _BOOL), ("skipped", _BOOL)))
# a causal LM's probe (docs/causal.md): every PROBE column (gold = the object's first token after the prompt;
# skipped = template not used or object not separable from the prompt's tokens), then how the template was used
# (ends_in_y / text_after_y: the text after [Y] was dropped / subject_after_y: not used), the object's token count,
# log P(all object tokens | prompt) teacher-forced, and whether greedy decoding writes exactly the whole object
PROBE_CAUSAL = Table("causal probe", "probe", _schema(
    *PROBE.schema, ("template_use", _LS), ("object_tokens", _I32), ("object_logprob", _F64), ("greedy_match", _BOOL)))
PROBE_ACCURACY = CsvTable("probe accuracy", "probe_summary", (
    "relation", "facts", "skipped_facts", "skipped_prompts", "train_prompts", "heldout_prompts", "train_accuracy",
    "heldout_accuracy", "train_gold_prob", "heldout_gold_prob", "majority_baseline"))

# ---------------------------------------------------------------------------------------------- attribution
SCORES = Table("attribution scores", "attribute", _schema(
    ("relation", _S), ("fact_id", _I32), ("template_id", _I32), ("method", _S), ("layer", _I16), ("neuron", _I32),
    ("score", _F32)))
SHARD_PROMPTS = Table("attribution prompts", "attribute", _schema(
    ("relation", _S), ("fact_id", _I32), ("template_id", _I32),
    ("gold_id", _I32),  # -1: the object is not one token of this vocabulary (prompt not attributed)
    ("gold_prob", _F32), ("pred_id", _I32), ("pred_token", _S), ("correct", _BOOL), ("ig_max", _F32),
    ("base_max", _F32)))

# ---------------------------------------------------------------------------------------------- refinement
NEURONS = Table("knowledge neurons", "refine", _schema(
    ("relation", _S), ("method", _S), ("fact_id", _I32), ("layer", _I16), ("neuron", _I32), ("order", _I32)))

# ---------------------------------------------------------------------------------------------- suppress / amplify
EVALUATION = Table("suppress/amplify", "evaluate", _schema(
    ("relation", _S), ("fact_id", _I32), ("target", _S), ("prompt_relation", _S), ("prompt_fact_id", _I32),
    ("template_id", _I32), ("method", _S), ("n_neurons", _I32), ("p0", _F64), ("p_suppress", _F64),
    ("p_amplify", _F64)))
DOSE = Table("dose response", "evaluate", _schema(
    ("relation", _S), ("fact_id", _I32), ("template_id", _I32), ("method", _S), ("k", _I32), ("n_neurons", _I32),
    ("p0", _F64), ("p_suppress", _F64)))
EFFECT_SUMMARY = CsvTable("suppress/amplify summary", "evaluate_summary",
                          ("relation", "method", "metric", "variant", "ratio", "ci_low", "ci_high", "n_facts"))
DOSE_SUMMARY = CsvTable("dose-response summary", "evaluate_summary",
                        ("relation", "method", "k", "ratio", "ci_low", "ci_high", "n_neurons"))

# ---------------------------------------------------------------------------------------------- localisation
LOCALISATION = Table("localisation", "localise", _schema(
    ("relation", _S), ("fact_id", _I32), ("template_id", _I32), ("n_subject_tokens", _I32), ("ablation", _S),
    ("p0", _F64), ("p_ablated", _F64)))
CEILING = CsvTable("localisation ceiling", "localise_summary", (
    "relation", "n_facts", "n_prompts", "p0", "ffn_mask_all", "ffn_subject_all", "ffn_all_positions", "attn_mask_all"))

# ---------------------------------------------------------------------------------------------- positive control
PLANTED_SUMMARY = CsvTable("positive control", "controls_summary", (
    "relation", "facts", "planted_units", "ig_recall", "ig_recall_low", "ig_recall_high", "ig_facts_found",
    "base_recall", "base_recall_low", "base_recall_high", "base_facts_found", "ig_rank_median", "ig_set_size",
    "base_set_size", "suppress_planted", "suppress_planted_low", "suppress_planted_high", "amplify_planted",
    "amplify_planted_low", "amplify_planted_high", "suppress_ig", "suppress_ig_low", "suppress_ig_high",
    "amplify_ig", "amplify_ig_low", "amplify_ig_high", "ceiling_layer", "ceiling_layer_low", "ceiling_layer_high",
    "update_planted_edits", "update_planted_success", "update_planted_success_low", "update_planted_success_high",
    "update_ig_edits", "update_ig_success", "update_ig_success_low", "update_ig_success_high", "readout_rank_x16"))
PLANTED_LAYERS = CsvTable("positive control by layer", "controls_summary", (
    "layer", "facts", "planted_units", "ig_recall", "ig_recall_low", "ig_recall_high", "base_recall",
    "base_recall_low", "base_recall_high"))

# ---------------------------------------------------------------------------------------------- editing
UPDATES = Table("fact updates", "edit_update", _schema(
    ("method", _S), ("relation", _S), ("attempt", _I32), ("fact_id", _I32), ("template_id", _I32), ("subject", _S),
    ("object", _S), ("new_object", _S), ("n_neurons", _I32), ("neurons", _S), ("pred_before", _S),
    ("pred_after", _S), ("change", _BOOL), ("success", _BOOL), ("success_at_k", _BOOL), ("new_prob_before", _F64),
    ("new_prob_after", _F64), ("new_rank_before", _I64), ("new_rank_after", _I64), ("paraphrases", _I32),
    ("para_success_before", _F64), ("para_success_after", _F64), ("para_gold_before", _F64),
    ("para_gold_after", _F64), ("intra_facts", _S), ("inter_facts", _S), ("ppl_prompts_left_out", _I32),
    ("nll_intra_before", _F64), ("nll_intra_after", _F64), ("nll_inter_before", _F64), ("nll_inter_after", _F64)))
UPDATE_SUMMARY = CsvTable("update summary", "edit_update", (
    "method", "scope", "edits", "attempts", "change_rate", "success_rate", "ppl_intra_delta", "ppl_inter_delta"))
ERASE = CsvTable("erase", "edit_erase", (
    "relation", "value", "n_neurons", "neurons", "prompts", "other_prompts",
    "acc_before", "acc_after", "acc_change", "ppl_before", "ppl_after", "ppl_change",
    "other_acc_before", "other_acc_after", "other_acc_change", "other_ppl_before", "other_ppl_after",
    "other_ppl_change"))

# ---------------------------------------------------------------------------------------------- web sentences
DISTANT_FACTS = Table("web-sentence facts", "distant", _schema(
    ("relation", _S), ("fact_id", _I32), ("subject", _S), ("object", _S), ("n_th", _I32), ("n_h", _I32),
    ("tail_pieces", _I32), ("tail_single_token", _BOOL), ("n_kn_ig", _I32), ("n_kn_base", _I32),
    ("status_ig", _S), ("status_base", _S)))
DISTANT_SENTENCES = Table("web sentences", "distant", _schema(
    ("relation", _S), ("fact_id", _I32), ("type", _S), ("sentence_idx", _I32), ("source_idx", _I64), ("text", _S),
    ("masked_word", _S), ("n_pieces", _I32), ("n_unk", _I32), ("truncated", _BOOL), ("readable", _BOOL),
    ("max_len", _I32)))
DISTANT_ACTIVATIONS = Table("web-sentence activations", "distant", _schema(
    ("relation", _S), ("method", _S), ("fact_id", _I32), ("layer", _I16), ("neuron", _I32), ("order", _I32),
    ("type", _S), ("sentence_idx", _I32), ("activation", _F32)))
DISTANT_OVERALL = CsvTable("web-sentence activation overall", "distant_summary",
                           ("subset", "method", "n_relations", "n_facts", "T1", "T2", "T3", "T1_ci_low", "T1_ci_high",
                            "T2_ci_low", "T2_ci_high", "T3_ci_low", "T3_ci_high", "T1_minus_T2", "T1_minus_T2_ci_low",
                            "T1_minus_T2_ci_high", "T1_minus_T3", "T1_minus_T3_ci_low", "T1_minus_T3_ci_high"))


# ---------------------------------------------------------------------------------------------- studied facts
def study_fact_count(n_facts: int, cap: int | None) -> int:
    """How many of a relation's facts the study uses: the first ``cap`` (all when ``cap`` is None)."""
    return n_facts if cap is None else min(int(cap), n_facts)


def studied_rows(prompts: pd.DataFrame, cap: int | None) -> pd.DataFrame:
    """The rows of a relation's prompt table that belong to studied facts (fact_id < the count)."""
    n_facts = int(prompts["fact_id"].max()) + 1 if len(prompts) else 0
    return prompts[prompts["fact_id"] < study_fact_count(n_facts, cap)]


def shard_fact_range(shard: int, facts_per_shard: int, n_study: int) -> range:
    """Fact ids of attribution shard ``shard``: [k * per_shard, min((k + 1) * per_shard, n_study))."""
    if facts_per_shard < 1:
        raise ValueError(f"config key 'ig.facts_per_shard' = {facts_per_shard}; expected >= 1")
    start = shard * facts_per_shard
    if shard < 0 or start >= n_study:
        raise ValueError(
            f"shard {shard} is out of range: {n_study} study facts in shards of {facts_per_shard} "
            f"give shards 0..{max(0, (n_study + facts_per_shard - 1) // facts_per_shard - 1)}"
        )
    return range(start, min(start + facts_per_shard, n_study))


def shard_rows(prompts: pd.DataFrame, facts: range, source: str | os.PathLike[str]) -> pd.DataFrame:
    """A shard's prompt rows in (fact_id, template_id) order; every fact of the shard must have some."""
    rows = prompts[(prompts["fact_id"] >= facts.start) & (prompts["fact_id"] < facts.stop)]
    rows = rows.sort_values(["fact_id", "template_id"], kind="stable").reset_index(drop=True)
    absent = sorted(set(facts) - set(rows["fact_id"].astype(int)))
    if absent:
        raise ValueError(f"{source}: no prompts for fact_id(s) {absent[:5]} of this shard ({facts.start}..{facts.stop - 1})")
    return rows


@dataclass(frozen=True)
class Fact:
    """One studied fact: its object and its bag of prompts (one per template, template order)."""

    relation: str
    fact_id: int
    subject: str
    object: str
    template_ids: tuple[int, ...]
    prompts: tuple[str, ...]


def facts_of(prompts: pd.DataFrame, source: str | os.PathLike[str]) -> list[Fact]:
    """The facts of one relation's prompt rows, in fact order (ids must run 0..N-1)."""
    RELATION_PROMPTS.check(prompts, source)
    relations = prompts["relation"].unique().tolist()
    if len(relations) != 1:
        raise ValueError(f"{source}: expected the prompts of exactly one relation, found {relations}")
    facts: list[Fact] = []
    for fact_id, bag in prompts.sort_values(["fact_id", "template_id"], kind="stable").groupby("fact_id", sort=True):
        if int(fact_id) != len(facts):
            raise ValueError(f"{source}: fact_id {len(facts)} is missing (found {fact_id} next); fact ids must be 0..N-1")
        objects = bag["object"].unique().tolist()
        if len(objects) != 1:
            raise ValueError(f"{source}: fact_id {fact_id} has several objects {objects}")
        facts.append(Fact(str(relations[0]), int(fact_id), str(bag["subject"].iloc[0]), str(objects[0]),
                          tuple(int(t) for t in bag["template_id"]), tuple(str(p) for p in bag["prompt"])))
    if not facts:
        raise ValueError(f"{source}: no facts")
    return facts


# ---------------------------------------------------------------------------------------------- knowledge neurons
def neuron_lists(neurons: pd.DataFrame, method: str, source: str | os.PathLike[str] = "neurons table") -> dict[int, list[Neuron]]:
    """Per fact_id, its refined knowledge neurons of ``method`` in first-appearance order (``order``).

    Facts without rows have no knowledge neurons; callers use ``.get(fact_id, [])``.
    """
    NEURONS.check(neurons, source)
    unknown = sorted(set(neurons["method"].astype(str)) - set(METHODS))
    if unknown:
        raise ValueError(f"{source}: column 'method' has value {unknown[0]!r}; expected one of {list(METHODS)}")
    rows = neurons[neurons["method"] == method].sort_values(["fact_id", "order"], kind="stable")
    lists: dict[int, list[Neuron]] = {}
    for fact_id, layer, unit in zip(rows["fact_id"], rows["layer"], rows["neuron"]):
        neuron = (int(layer), int(unit))
        fact = lists.setdefault(int(fact_id), [])
        if neuron in fact:
            raise ValueError(f"{source}: fact_id {fact_id} lists neuron {neuron} twice for method {method!r}")
        fact.append(neuron)
    return lists


def read_neurons(path: str | os.PathLike[str], relation: str) -> dict[str, dict[int, list[Neuron]]]:
    """A relation's refined neurons as {method: {fact_id: [neurons in first-appearance order]}}."""
    frame = NEURONS.read(path, relation)
    return {method: neuron_lists(frame, method, path) for method in METHODS}


def read_refine_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The refine stage's JSON record of one relation (adaptive p, studied facts, model shape)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); rerun rule refine") from None
    for key in ("n_layers", "ffn_size", *(f"{m}" for m in METHODS)):
        if key not in record:
            raise ValueError(f"{path}: no key {key!r} (docs/CONTRACTS.md, refine); rerun rule refine")
    for method in METHODS:
        for key in ("fact_ids", "n_facts", "in_target", "p", "avg_kn"):
            if key not in record[method]:
                raise ValueError(f"{path}: no key '{method}.{key}' (docs/CONTRACTS.md, refine); rerun rule refine")
    return record


# ---------------------------------------------------------------------------------------------- attribution shards
@dataclass
class Attribution:
    """A relation's attribution shards read together."""

    scores: pd.DataFrame  # every stored score (SCORES columns)
    prompts: pd.DataFrame  # one row per prompt (SHARD_PROMPTS columns)
    model_shape: dict[str, int]  # n_layers, ffn_size of the attributed model (from the shards' provenance)

    def scorable_prompts(self) -> pd.Series:
        """Prompts per fact among those whose object is one token (the studied facts that count)."""
        usable = self.prompts[self.prompts["gold_id"] >= 0]
        return usable.groupby("fact_id").size().sort_index()

    def unscorable_facts(self) -> list[int]:
        """Studied facts none of whose prompts could be attributed (object not one token)."""
        return sorted(set(self.prompts["fact_id"].astype(int)) - set(self.scorable_prompts().index.astype(int)))


def read_attribution(shards: Mapping[str, tuple[Path, Path]], relation: str) -> Attribution:
    """All (scores, prompts) shard pairs of one relation, checked for what refinement relies on.

    One relation, methods ig/base, no duplicate (prompt, method, neuron) rows, no prompt in
    two shards, study fact ids 0..N-1 without gaps (a missing fact would silently drop out of
    averages that count zero-KN facts), and no score for a prompt the tables do not list.
    """
    if not shards:
        raise ValueError(f"no attribution shards given for {relation}")
    score_frames, prompt_frames, shapes = [], [], set()
    for scores_path, prompts_path in shards.values():
        scores = SCORES.read(scores_path, relation)
        record = read_provenance(scores_path)
        if "n_layers" not in record or "ffn_size" not in record:
            raise ValueError(f"{scores_path}: its provenance does not give the model's n_layers and ffn_size; rerun rule attribute")
        shapes.add((int(record["n_layers"]), int(record["ffn_size"])))
        bad = sorted(set(scores["method"].astype(str)) - set(METHODS))
        if bad:
            raise ValueError(f"{scores_path}: column 'method' has values {bad}; expected {list(METHODS)}")
        score_frames.append(scores)
        prompt_frames.append(SHARD_PROMPTS.read(prompts_path, relation))
    scores = pd.concat(score_frames, ignore_index=True)
    prompts = pd.concat(prompt_frames, ignore_index=True)
    duplicated = scores.duplicated(["method", "fact_id", "template_id", "layer", "neuron"])
    if duplicated.any():
        row = scores[duplicated].iloc[0]
        raise ValueError(
            f"attribution shards of {relation}: duplicate score for method {row['method']}, fact {row['fact_id']}, "
            f"template {row['template_id']}, neuron ({row['layer']}, {row['neuron']}); each shard must hold distinct facts"
        )
    if prompts.duplicated(["fact_id", "template_id"]).any():
        raise ValueError(f"prompt tables of {relation}: a (fact_id, template_id) appears in more than one row/shard")
    fact_ids = sorted(set(prompts["fact_id"].astype(int)))
    if fact_ids != list(range(len(fact_ids))):
        gaps = sorted(set(range(len(fact_ids))) - set(fact_ids))
        raise ValueError(
            f"prompt tables of {relation}: fact_ids must be 0..N-1 without gaps (study facts); "
            f"got {len(fact_ids)} facts, first out-of-range or missing ids: {gaps[:5] or fact_ids[-1:]}"
        )
    stray = sorted(set(scores["fact_id"].astype(int)) - set(fact_ids))
    if stray:
        raise ValueError(f"attribution shards of {relation}: score rows for fact_ids {stray[:5]} absent from the prompt tables")
    if len(shapes) != 1:
        raise ValueError(f"attribution shards of {relation} come from models of different shapes (layers, units): {sorted(shapes)}")
    n_layers, ffn_size = shapes.pop()
    return Attribution(scores, prompts, {"n_layers": n_layers, "ffn_size": ffn_size})


def shard_pairs(args_inputs: Mapping[str, Path]) -> dict[str, tuple[Path, Path]]:
    """``--in scores:<k>=...`` and ``--in prompts:<k>=...`` inputs paired by shard key."""
    scores = {name.split(":", 1)[1]: path for name, path in args_inputs.items() if name.startswith("scores:")}
    prompts = {name.split(":", 1)[1]: path for name, path in args_inputs.items() if name.startswith("prompts:")}
    if set(scores) != set(prompts):
        raise ValueError(f"attribution shards {sorted(scores)} and prompt tables {sorted(prompts)} do not pair up")
    return {key: (scores[key], prompts[key]) for key in sorted(scores)}


def concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Row-bind tables read per relation (in the order given)."""
    return pd.concat(list(frames), ignore_index=True)


def relation_keyed(paths: Mapping[str, Path], table: Table) -> dict[str, pd.DataFrame]:
    """Read ``{relation: path}`` as ``{relation: checked frame}``."""
    return {relation: table.read(path, relation) for relation, path in paths.items()}


def layers_and_units(records: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """The studied model's (layers, FFN units per layer), which every refine record states."""
    shapes = {(int(r["n_layers"]), int(r["ffn_size"])) for r in records}
    if len(shapes) != 1:
        raise ValueError(f"refine records disagree on the model's shape (layers, units): {sorted(shapes)}")
    return shapes.pop()
