"""Editing case studies: update facts (SPEC §7) and erase relations (SPEC §8).

Plain functions over facts, neuron lists and a loaded masked LM; the stage CLIs
(``kn.stages.edit_update``, ``kn.stages.edit_erase``) do the file I/O. Every weight edit
goes through :func:`kn.hooks.edited_value_slots`, which restores the saved columns exactly,
so one loaded model serves every edit and the model on disk is never touched.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kn.hooks import edited_value_slots
from kn.models.arch import value_projections
from kn.models.blocks import mlm_head
from kn.models.encoding import EncodedPrompts, encode_prompts

Neuron = tuple[int, int]

FACT_COLUMNS = ("relation", "fact_id", "subject", "object", "template_id", "prompt")
NEURON_COLUMNS = ("relation", "method", "fact_id", "layer", "neuron", "order")
KN_FILTER_RULES = ("code", "paper")

# Why an update attempt did not become an edit (counted per relation in the summary).
SKIP_NO_KN = "no_kn"
SKIP_INCORRECT = "incorrect_answer"
SKIP_NEW_OBJECT = "new_object_not_one_token"
SKIP_REASONS = (SKIP_NO_KN, SKIP_INCORRECT, SKIP_NEW_OBJECT)


@dataclass(frozen=True)
class Fact:
    """One studied fact: its object and its bag of prompts (one per template, template order)."""

    relation: str
    fact_id: int
    subject: str
    object: str
    template_ids: tuple[int, ...]
    prompts: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Inputs (DataFrames in the CONTRACTS.md layouts -> facts and per-fact neuron lists)


def facts_from_table(frame: pd.DataFrame, n_study: int | None, source: str) -> list[Fact]:
    """The studied facts (fact_id < n_study) of one relation's prompts table, in fact order.

    Stages after attribution only see these facts (CONTRACTS.md), so N_r in SPEC §7/§8 is
    their number. ``source`` names the file in errors.
    """
    missing = [c for c in FACT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing columns {missing}; expected the ingest_relation layout {list(FACT_COLUMNS)}")
    relations = frame["relation"].unique().tolist()
    if len(relations) != 1:
        raise ValueError(f"{source}: expected the prompts of exactly one relation, found {relations}")
    table = frame if n_study is None else frame[frame["fact_id"] < n_study]
    table = table.sort_values(["fact_id", "template_id"], kind="stable")
    facts: list[Fact] = []
    for fact_id, bag in table.groupby("fact_id", sort=True):
        if int(fact_id) != len(facts):
            raise ValueError(f"{source}: fact_id {len(facts)} is missing (found {fact_id} next); fact ids must be 0..N-1")
        objects = bag["object"].unique().tolist()
        if len(objects) != 1:
            raise ValueError(f"{source}: fact_id {fact_id} has several objects {objects}")
        facts.append(
            Fact(
                relation=str(relations[0]),
                fact_id=int(fact_id),
                subject=str(bag["subject"].iloc[0]),
                object=str(objects[0]),
                template_ids=tuple(int(t) for t in bag["template_id"]),
                prompts=tuple(str(p) for p in bag["prompt"]),
            )
        )
    if not facts:
        raise ValueError(f"{source}: no facts with fact_id < {n_study}")
    return facts


def kn_lists_from_table(frame: pd.DataFrame, relation: str, n_facts: int, source: str, method: str = "ig") -> list[list[Neuron]]:
    """Per studied fact, its refined knowledge neurons in first-appearance order (``order``).

    Facts without rows have no KNs (an empty list), as in the authors' kn_bag files.
    """
    missing = [c for c in NEURON_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing columns {missing}; expected the refine layout {list(NEURON_COLUMNS)}")
    wrong = sorted(set(frame["relation"].astype(str)) - {relation})
    if wrong:
        raise ValueError(f"{source}: rows of relations {wrong}, expected only {relation}")
    rows = frame[(frame["method"] == method) & (frame["fact_id"] < n_facts)]
    if (rows["fact_id"] < 0).any():
        raise ValueError(f"{source}: negative fact_id {int(rows['fact_id'].min())}")
    lists: list[list[Neuron]] = [[] for _ in range(n_facts)]
    for fact_id, layer, unit in rows.sort_values(["fact_id", "order"], kind="stable")[["fact_id", "layer", "neuron"]].itertuples(index=False):
        neuron = (int(layer), int(unit))
        if neuron in lists[int(fact_id)]:
            raise ValueError(f"{source}: fact_id {fact_id} lists neuron {neuron} twice for method {method!r}")
        lists[int(fact_id)].append(neuron)
    return lists


# ---------------------------------------------------------------------------------------------
# Neuron choice


def neuron_fact_counts(kn_lists: Iterable[Sequence[Neuron]]) -> Counter[Neuron]:
    """c(l, i): the number of facts whose KN list contains (l, i)."""
    counts: Counter[Neuron] = Counter()
    for neurons in kn_lists:
        counts.update(set(neurons))
    return counts


def keep_uncommon_neurons(
    neurons: Sequence[Neuron], counts: Mapping[Neuron, int], n_facts: int, share: float, rule: str = "code"
) -> list[Neuron]:
    """The fact's KNs that are not shared across the relation (SPEC §7 step 3), in list order.

    ``code`` is the authors' select_kn: the fact is counted twice, so (l, i) is kept iff
    1 + c <= share * N_r. ``paper`` drops exactly the relation-level KNs: keep iff
    c < share * N_r (SPEC §11.11). They differ when share * N_r is not an integer, and for
    N_r < 1 / share the code rule keeps nothing at all.
    """
    if rule == "code":
        return [n for n in neurons if 1 + counts[n] <= n_facts * share]
    if rule == "paper":
        return [n for n in neurons if not counts[n] >= n_facts * share]
    raise ValueError(f"edit.kn_filter = {rule!r}; expected one of {list(KN_FILTER_RULES)}")


def random_neurons(rng: random.Random, count: int, n_layers: int, n_units: int) -> list[Neuron]:
    """The random-neuron baseline: ``count`` uniform (layer, unit) pairs, drawn layer first (SPEC §7)."""
    return [(rng.randint(0, n_layers - 1), rng.randint(0, n_units - 1)) for _ in range(count)]


def top_frequent_neurons(kn_lists: Iterable[Sequence[Neuron]], k: int) -> list[Neuron]:
    """The k neurons in the most facts' KN lists; ties by first appearance (facts in order, list order).

    Counter.most_common sorts stably by count, which is the authors' tie-break (SPEC §8).
    """
    counts: Counter[Neuron] = Counter()
    for neurons in kn_lists:
        counts.update(neurons)
    return [neuron for neuron, _ in counts.most_common(k)]


# ---------------------------------------------------------------------------------------------
# Update sampling (SPEC §7, call order of SPEC §13)


@dataclass(frozen=True)
class UpdatePlan:
    """One sampled edit: which fact, which new object, which neurons, which prompt, which PPL facts."""

    relation: str
    attempt: int
    fact_id: int
    new_object: str
    neurons: tuple[Neuron, ...]
    prompt_index: int
    intra_facts: tuple[int, ...]
    inter_facts: tuple[tuple[str, int], ...]


@dataclass
class RelationAttempts:
    """How a relation's sampling went: attempts made, edits planned, skips by reason."""

    relation: str
    attempts: int = 0
    edits: int = 0
    single_object: bool = False
    skipped: Counter[str] = field(default_factory=Counter)


def sample_updates(
    rng: random.Random,
    facts: Mapping[str, Sequence[Fact]],
    kn_lists: Mapping[str, Sequence[Sequence[Neuron]]],
    top1_is_gold: Callable[[Fact, int], bool],
    *,
    edits_per_relation: int,
    max_attempts: int,
    share: float,
    rule: str,
    ppl_facts: int,
    random_shape: tuple[int, int] | None = None,
    new_object_ok: Callable[[str], bool] = lambda _obj: True,
) -> tuple[list[UpdatePlan], list[RelationAttempts]]:
    """Sample the edits exactly as the authors' stage 6, consuming ``rng`` in their order.

    Per relation (sorted ids), per attempt: randint(fact); choice(fact) for t' until its
    object differs; [random baseline: 2 randint per kept neuron]; stop as "no_kn" if no
    neuron is kept; randint(prompt); stop as "incorrect_answer" unless the model's top-1 on
    that prompt is the gold object; then ppl_facts x randint(intra fact, redrawn while equal
    to the edited fact) and ppl_facts x [choice(relation) redrawn while equal to r, randint(fact)].
    ``top1_is_gold(fact, prompt_index)`` asks the unedited model. Relations whose facts
    all share one object are skipped (the authors' t' loop would never end); with a single
    selected relation there are no inter-relation facts.
    """
    relations = sorted(facts)
    plans: list[UpdatePlan] = []
    report: list[RelationAttempts] = []
    for relation in relations:
        rel_facts = facts[relation]
        n_facts = len(rel_facts)
        status = RelationAttempts(relation)
        report.append(status)
        if len({fact.object for fact in rel_facts}) < 2:
            status.single_object = True
            continue
        counts = neuron_fact_counts(kn_lists[relation])
        for attempt in range(max_attempts):
            status.attempts = attempt + 1
            fact_index = rng.randint(0, n_facts - 1)
            fact = rel_facts[fact_index]
            while True:
                new_object = rng.choice(rel_facts).object
                if new_object != fact.object:
                    break
            neurons = keep_uncommon_neurons(kn_lists[relation][fact_index], counts, n_facts, share, rule)
            if random_shape is not None:
                neurons = random_neurons(rng, len(neurons), *random_shape)
            if not neurons:
                status.skipped[SKIP_NO_KN] += 1
                continue
            prompt_index = rng.randint(1, len(fact.prompts)) - 1
            if not top1_is_gold(fact, prompt_index):
                status.skipped[SKIP_INCORRECT] += 1
                continue
            if not new_object_ok(new_object):  # never on the paper's data: every object is one wordpiece
                status.skipped[SKIP_NEW_OBJECT] += 1
                continue
            intra: list[int] = []
            for _ in range(ppl_facts):
                other = rng.randint(0, n_facts - 1)
                while other == fact_index:
                    other = rng.randint(0, n_facts - 1)
                intra.append(other)
            inter: list[tuple[str, int]] = []
            if len(relations) > 1:
                for _ in range(ppl_facts):
                    other_relation = rng.choice(relations)
                    while other_relation == relation:
                        other_relation = rng.choice(relations)
                    inter.append((other_relation, rng.randint(0, len(facts[other_relation]) - 1)))
            plans.append(
                UpdatePlan(relation, attempt, fact_index, new_object, tuple(neurons), prompt_index, tuple(intra), tuple(inter))
            )
            status.edits += 1
            if status.edits == edits_per_relation:
                break
    return plans, report


# ---------------------------------------------------------------------------------------------
# Weight edits


def updated_value_slots(
    model: nn.Module, neurons: Sequence[Neuron], old_id: int, new_id: int, lambda1: float, lambda2: float
) -> dict[Neuron, torch.Tensor]:
    """New value slots for the SPEC §7 update v <- v - l1 (|v|/|e_t|) e_t + l2 (|v|/|e_t'|) e_t'.

    All scales come from the unedited weights and all neurons change together. The
    arithmetic follows the authors' order (subtract, then add; scale = |v| / |e| * lambda);
    a neuron listed twice (possible in the random baseline) gets the update twice with the
    same scales, as their sequential in-place loop does. e are input word-embedding rows.
    """
    embeddings = model.get_input_embeddings().weight
    projections = value_projections(model)
    if embeddings.shape[1] != projections[0].weight.shape[0]:
        raise ValueError(
            f"word embeddings have size {embeddings.shape[1]} but value slots {projections[0].weight.shape[0]}: "
            "the SPEC §7 update adds embeddings to value slots and needs equal sizes"
        )
    with torch.no_grad():
        old_emb, new_emb = embeddings[old_id], embeddings[new_id]
        old_norm, new_norm = torch.norm(old_emb), torch.norm(new_emb)
        slots: dict[Neuron, torch.Tensor] = {}
        for layer, unit in neurons:
            original = projections[layer].weight[:, unit]
            value_norm = torch.norm(original)
            column = slots.get((layer, unit), original.clone())
            column = column - old_emb * (value_norm / old_norm * lambda1)
            column = column + new_emb * (value_norm / new_norm * lambda2)
            slots[(layer, unit)] = column
    return slots


def erased_value_slots(model: nn.Module, neurons: Sequence[Neuron], value: str, unk_id: int | None) -> dict[Neuron, torch.Tensor]:
    """Value slots for SPEC §8: zeros (the authors' run) or the [UNK] word embedding (their alternative)."""
    projections = value_projections(model)
    hidden = projections[0].weight.shape[0]
    if value == "zero":
        fill = torch.zeros(hidden, dtype=projections[0].weight.dtype, device=projections[0].weight.device)
    elif value == "unk":
        if unk_id is None:
            raise ValueError("erase.value = 'unk' but the tokenizer has no unknown token")
        fill = model.get_input_embeddings().weight[unk_id].detach().clone()
        if fill.shape != (hidden,):
            raise ValueError(f"erase.value = 'unk': the embedding has size {fill.shape[0]}, value slots {hidden}")
    else:
        raise ValueError(f"erase.value = {value!r}; expected 'zero' or 'unk'")
    return {neuron: fill for neuron in dict.fromkeys(neurons)}


# ---------------------------------------------------------------------------------------------
# Scoring prompts


def mask_logits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Float32 MLM logits at each prompt's first mask, ``[len(prompts), vocab]`` on the CPU.

    Batches are right-padded; SPEC §1 shows padding only changes reduction-order noise.
    Use ``batch_size=1`` where the authors' numbers come from single-prompt passes.
    """
    vocab_size = model.get_output_embeddings().weight.shape[0]
    if not prompts:
        return torch.empty(0, vocab_size)
    encoded = encode_prompts(tokenizer, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    head = mlm_head(model)  # applied to the mask rows only: the vocabulary projection dominates otherwise
    chunks: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        chunk = EncodedPrompts(encoded.input_ids[start : start + batch_size], encoded.mask_positions[start : start + batch_size])
        input_ids, attention = chunk.padded(pad_id, device)
        with torch.no_grad():
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            rows = torch.arange(len(chunk), device=hidden.device)
            positions = torch.tensor(chunk.mask_positions, device=hidden.device)
            chunks.append(head(hidden[rows, positions]).float().cpu())
    return torch.cat(chunks)


def gold_nll(logits: torch.Tensor, gold_ids: Sequence[int]) -> np.ndarray:
    """-ln P(gold) per row, P a softmax over the full vocabulary.

    log_softmax instead of the authors' log(1 / softmax): equal up to rounding, but finite
    where the probability underflows to 0 in fp32.
    """
    if len(gold_ids) == 0:
        return np.empty(0, dtype=np.float64)
    log_probs = torch.log_softmax(logits, dim=-1)
    return -log_probs[torch.arange(len(gold_ids)), torch.tensor(list(gold_ids))].double().numpy()


def token_rank(logits_row: torch.Tensor, token_id: int) -> int:
    """1-based rank of ``token_id`` among the vocabulary by logit (1 + #strictly higher logits)."""
    return int((logits_row > logits_row[token_id]).sum().item()) + 1


def _mean(values: np.ndarray | torch.Tensor) -> float:
    """Mean as a float; NaN for an empty set (e.g. a fact with a single prompt has no paraphrases)."""
    array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    return float(array.mean()) if array.size else math.nan


def perplexity(mean_nlls: Sequence[float]) -> float:
    """exp of the mean of (per-edit or per-prompt) mean NLLs; NaN for an empty set."""
    values = [v for v in mean_nlls if not math.isnan(v)]
    return float(math.exp(float(np.mean(values)))) if values else math.nan


def relative_change(old: float, new: float) -> float:
    """(new - old) / old: positive when the quantity grew (SPEC §11.9 fixes the authors' sign)."""
    return (new - old) / old if old else math.nan


# ---------------------------------------------------------------------------------------------
# Running the update study


@dataclass
class PromptScorer:
    """The model, its tokenizer and the vocabulary ids of object strings, for scoring prompts."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    object_ids: Mapping[str, int | None]
    batch_size: int
    device: torch.device | str = "cpu"

    def logits(self, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        return mask_logits(self.model, self.tokenizer, prompts, batch_size or self.batch_size, self.device)

    def token(self, token_id: int) -> str:
        return str(self.tokenizer.convert_ids_to_tokens(int(token_id)))

    def fact_prompts(self, facts: Iterable[Fact]) -> tuple[list[str], list[int], int]:
        """All prompts of the facts whose object is one token, their gold ids, and how many were left out."""
        prompts: list[str] = []
        gold: list[int] = []
        left_out = 0
        for fact in facts:
            gold_id = self.object_ids[fact.object]
            if gold_id is None:
                left_out += len(fact.prompts)
                continue
            prompts.extend(fact.prompts)
            gold.extend([gold_id] * len(fact.prompts))
        return prompts, gold, left_out


class Top1Cache:
    """Whether the unedited model's top-1 on a prompt is the gold object, from a batch-1 pass, memoised.

    Attempts redraw the same prompts many times; every check runs between edits, on the
    restored (bit-identical) model, so one answer per prompt is exact.
    """

    def __init__(self, scorer: PromptScorer) -> None:
        self.scorer = scorer
        self.answers: dict[tuple[str, int, int], bool] = {}

    def __call__(self, fact: Fact, prompt_index: int) -> bool:
        key = (fact.relation, fact.fact_id, prompt_index)
        if key not in self.answers:
            gold_id = self.scorer.object_ids[fact.object]
            top1 = int(self.scorer.logits([fact.prompts[prompt_index]], batch_size=1)[0].argmax())
            self.answers[key] = gold_id is not None and top1 == gold_id
        return self.answers[key]


def run_update(
    scorer: PromptScorer,
    facts: Mapping[str, Sequence[Fact]],
    plan: UpdatePlan,
    unedited: PromptSet,
    *,
    lambda1: float,
    lambda2: float,
    success_k: int,
) -> dict[str, object]:
    """Apply one planned edit, measure it, restore the model; one result row.

    On the edited prompt (batch 1, as the authors): change, success, success@k, P and rank
    of t' before/after. Beyond the paper (SPEC §11.13): the same on the fact's other
    prompts. PPL sets: mean gold NLL over all prompts of the intra / inter facts (a fact
    drawn twice counts twice), before and after. The authors edit, restore, measure the
    unedited model, re-edit; with an exact restore the unedited numbers are those of
    ``unedited`` (scored once for all edits, in other batches: reduction-order noise only).
    """
    fact = facts[plan.relation][plan.fact_id]
    gold_id = scorer.object_ids[fact.object]
    new_id = scorer.object_ids[plan.new_object]
    if gold_id is None or new_id is None:
        raise ValueError(f"{plan.relation} fact {plan.fact_id}: objects {fact.object!r} -> {plan.new_object!r} must be single tokens")
    prompt = fact.prompts[plan.prompt_index]
    paraphrases = [p for i, p in enumerate(fact.prompts) if i != plan.prompt_index]
    para_rows = np.delete(unedited.rows_of[(plan.relation, plan.fact_id)], plan.prompt_index)
    intra_keys = [(plan.relation, i) for i in plan.intra_facts]
    inter_keys = list(plan.inter_facts)
    intra_prompts, intra_gold, intra_left = scorer.fact_prompts(facts[r][i] for r, i in intra_keys)
    inter_prompts, inter_gold, inter_left = scorer.fact_prompts(facts[r][i] for r, i in inter_keys)
    empty = np.empty(0, dtype=np.int64)
    intra_rows = np.concatenate([unedited.rows_of.get(key, empty) for key in intra_keys] + [empty])
    inter_rows = np.concatenate([unedited.rows_of.get(key, empty) for key in inter_keys] + [empty])

    before = scorer.logits([prompt], batch_size=1)[0]
    slots = updated_value_slots(scorer.model, plan.neurons, gold_id, new_id, lambda1, lambda2)
    with edited_value_slots(scorer.model, slots):
        after = scorer.logits([prompt], batch_size=1)[0]
        batch_after = scorer.logits(paraphrases + intra_prompts + inter_prompts)
    para_top_before = torch.from_numpy(unedited.top1[para_rows])
    para_top_after = batch_after[: len(paraphrases)].argmax(-1)
    nll_after = gold_nll(batch_after[len(paraphrases) :], intra_gold + inter_gold)

    top1_before, top1_after = int(before.argmax()), int(after.argmax())
    prob_before = float(torch.softmax(before, -1)[new_id])
    prob_after = float(torch.softmax(after, -1)[new_id])
    rank_before, rank_after = token_rank(before, new_id), token_rank(after, new_id)
    n_intra = len(intra_prompts)

    return {
        "relation": plan.relation,
        "attempt": plan.attempt,
        "fact_id": fact.fact_id,
        "template_id": fact.template_ids[plan.prompt_index],
        "subject": fact.subject,
        "object": fact.object,
        "new_object": plan.new_object,
        "n_neurons": len(plan.neurons),
        "neurons": " ".join(f"{layer}:{unit}" for layer, unit in plan.neurons),
        "pred_before": scorer.token(top1_before),
        "pred_after": scorer.token(top1_after),
        "change": top1_after != top1_before,
        "success": top1_after == new_id,
        "success_at_k": rank_after <= success_k,
        "new_prob_before": prob_before,
        "new_prob_after": prob_after,
        "new_rank_before": rank_before,
        "new_rank_after": rank_after,
        "paraphrases": len(paraphrases),
        "para_success_before": _mean(para_top_before == new_id),
        "para_success_after": _mean(para_top_after == new_id),
        "para_gold_before": _mean(para_top_before == gold_id),
        "para_gold_after": _mean(para_top_after == gold_id),
        "intra_facts": " ".join(str(i) for i in plan.intra_facts),
        "inter_facts": " ".join(f"{r}:{i}" for r, i in plan.inter_facts),
        "ppl_prompts_left_out": intra_left + inter_left,
        "nll_intra_before": _mean(unedited.nll[intra_rows]),
        "nll_intra_after": _mean(nll_after[:n_intra]),
        "nll_inter_before": _mean(unedited.nll[inter_rows]),
        "nll_inter_after": _mean(nll_after[n_intra:]),
    }


def summarize_updates(rows: pd.DataFrame, attempts: pd.DataFrame, success_k: int) -> pd.DataFrame:
    """Per method, overall and per relation: the SPEC §7 aggregates and the skip counts.

    Rates are means over edits; PPL = exp(mean over edits of the per-edit mean NLL);
    MRR = mean of 1 / rank. ``attempts`` has one row per (method, relation).
    """
    records: list[dict[str, object]] = []
    for method, method_attempts in attempts.groupby("method", sort=False):
        method_rows = rows[rows["method"] == method]
        scopes = [("all", method_rows, method_attempts)] + [
            (rel, method_rows[method_rows["relation"] == rel], method_attempts[method_attempts["relation"] == rel])
            for rel in method_attempts["relation"]
        ]
        for scope, edits, tried in scopes:
            record: dict[str, object] = {"method": method, "scope": scope, "edits": len(edits)}
            record["attempts"] = int(tried["attempts"].sum())
            for reason in SKIP_REASONS:
                record[f"skipped_{reason}"] = int(tried[f"skipped_{reason}"].sum())
            record["single_object_relations"] = int(tried["single_object"].sum())
            has = len(edits) > 0
            record["change_rate"] = float(edits["change"].mean()) if has else math.nan
            record["success_rate"] = float(edits["success"].mean()) if has else math.nan
            record[f"success_at_{success_k}"] = float(edits["success_at_k"].mean()) if has else math.nan
            record["para_success_before"] = float(edits["para_success_before"].mean()) if has else math.nan
            record["para_success_after"] = float(edits["para_success_after"].mean()) if has else math.nan
            record["para_gold_after"] = float(edits["para_gold_after"].mean()) if has else math.nan
            prob_delta = edits["new_prob_after"] - edits["new_prob_before"]
            record["new_prob_delta"] = float(prob_delta.mean()) if has else math.nan
            # the authors' ratio; an fp32 probability of exactly 0 before would make it infinite, so such edits are left out
            ratio = prob_delta[edits["new_prob_before"] > 0] / edits["new_prob_before"][edits["new_prob_before"] > 0]
            record["new_prob_ratio"] = float(ratio.mean()) if len(ratio) else math.nan
            record["mr_before"] = float(edits["new_rank_before"].mean()) if has else math.nan
            record["mr_after"] = float(edits["new_rank_after"].mean()) if has else math.nan
            record["mrr_before"] = float((1.0 / edits["new_rank_before"]).mean()) if has else math.nan
            record["mrr_after"] = float((1.0 / edits["new_rank_after"]).mean()) if has else math.nan
            for kind in ("intra", "inter"):
                before = perplexity(edits[f"nll_{kind}_before"].tolist())
                after = perplexity(edits[f"nll_{kind}_after"].tolist())
                record[f"ppl_{kind}_before"] = before
                record[f"ppl_{kind}_after"] = after
                record[f"ppl_{kind}_delta"] = after - before
            records.append(record)
    return pd.DataFrame.from_records(records)


# ---------------------------------------------------------------------------------------------
# Erasing relations


@dataclass
class PromptSet:
    """Every prompt (with a one-token object) of many facts, scored once by one model state.

    Row k of a fact is its k-th prompt. ``rows_of`` maps (relation, fact_id) to its rows.
    """

    relation: np.ndarray
    fact_id: np.ndarray
    top1: np.ndarray
    correct: np.ndarray
    nll: np.ndarray
    rows_of: dict[tuple[str, int], np.ndarray]


def score_facts(scorer: PromptScorer, facts: Mapping[str, Sequence[Fact]]) -> tuple[PromptSet, int]:
    """Top-1 and gold NLL of every prompt of every fact (batched), and the number of prompts left out.

    Prompts whose object is not one token are left out (never on the paper's data; the
    authors' code would score their [UNK] id).
    """
    relation_of: list[str] = []
    fact_of: list[int] = []
    prompts: list[str] = []
    gold: list[int] = []
    left_out = 0
    for relation in sorted(facts):
        for fact in facts[relation]:
            fact_prompts, fact_gold, fact_left = scorer.fact_prompts([fact])
            prompts += fact_prompts
            gold += fact_gold
            relation_of += [relation] * len(fact_prompts)
            fact_of += [fact.fact_id] * len(fact_prompts)
            left_out += fact_left
    logits = scorer.logits(prompts)
    top1 = logits.argmax(-1).numpy() if prompts else np.empty(0, dtype=np.int64)
    rows_of: dict[tuple[str, int], list[int]] = {}
    for row, key in enumerate(zip(relation_of, fact_of)):
        rows_of.setdefault(key, []).append(row)
    return (
        PromptSet(
            relation=np.array(relation_of, dtype=object),
            fact_id=np.array(fact_of, dtype=np.int64),
            top1=top1,
            correct=top1 == np.array(gold, dtype=np.int64),
            nll=gold_nll(logits, gold),
            rows_of={key: np.array(rows, dtype=np.int64) for key, rows in rows_of.items()},
        ),
        left_out,
    )


def accuracy_and_ppl(scores: PromptSet, mask: np.ndarray) -> tuple[float, float]:
    """Accuracy and PPL = exp(mean gold NLL) over the prompts selected by ``mask`` (SPEC §8)."""
    if not mask.any():
        return math.nan, math.nan
    return float(scores.correct[mask].mean()), float(math.exp(scores.nll[mask].mean()))


def erase_relation(
    scorer: PromptScorer,
    facts: Mapping[str, Sequence[Fact]],
    relation: str,
    neurons: Sequence[Neuron],
    value: str,
    before: PromptSet,
) -> dict[str, object]:
    """Erase ``neurons`` (SPEC §8), score every prompt again, restore; one row of before/after numbers.

    ``before`` is the unedited model's scores (the same for every erased relation, since
    each erase is restored exactly).
    """
    slots = erased_value_slots(scorer.model, neurons, value, scorer.tokenizer.unk_token_id)
    with edited_value_slots(scorer.model, slots):
        after, _ = score_facts(scorer, facts)
    own = before.relation == relation
    row: dict[str, object] = {
        "relation": relation,
        "value": value,
        "n_neurons": len(neurons),
        "neurons": " ".join(f"{layer}:{unit}" for layer, unit in neurons),
        "prompts": int(own.sum()),
        "other_prompts": int((~own).sum()),
    }
    for prefix, mask in (("", own), ("other_", ~own)):
        acc_before, ppl_before = accuracy_and_ppl(before, mask)
        acc_after, ppl_after = accuracy_and_ppl(after, mask)
        row.update(
            {
                f"{prefix}acc_before": acc_before,
                f"{prefix}acc_after": acc_after,
                f"{prefix}acc_change": relative_change(acc_before, acc_after),
                f"{prefix}ppl_before": ppl_before,
                f"{prefix}ppl_after": ppl_after,
                f"{prefix}ppl_change": relative_change(ppl_before, ppl_after),
            }
        )
    return row
