"""Editing case studies: update facts (SPEC §7) and erase relations (SPEC §8).

Plain functions over facts, neuron lists and a loaded masked LM; the stage CLIs
(``kn.stages.edit_update``, ``kn.stages.edit_erase``) do the file I/O. Every weight edit
goes through :func:`kn.hooks.edited_value_slots`, which restores the saved columns exactly,
so one loaded model serves every edit and the model on disk is never touched.
"""

from __future__ import annotations

import json
import logging
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

from tqdm import tqdm

from kn.hooks import edited_value_slots
from kn.models.adapters import adapter_for
from kn.models.encoding import PromptCodec, encode_prompts, object_token_id
from kn.models.forward import target_logits
from kn.paper_numbers import paper_values
from kn.tables import ERASE, UPDATES, Fact, Neuron, facts_of, neuron_lists, studied_rows

log = logging.getLogger("kn.editing")

KN_FILTER_RULES = ("code", "paper")

# Why an update attempt did not become an edit (counted per relation in the summary).
SKIP_NO_KN = "no_kn"
SKIP_INCORRECT = "incorrect_answer"
SKIP_NEW_OBJECT = "new_object_not_one_token"
SKIP_REASONS = (SKIP_NO_KN, SKIP_INCORRECT, SKIP_NEW_OBJECT)


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
    new_object_ok: Callable[[Fact, int, str], bool] = lambda _fact, _prompt, _obj: True,
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
            if not new_object_ok(fact, prompt_index, new_object):  # never on the paper's data: every object is one wordpiece
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


def edit_embeddings(model: nn.Module) -> tuple[torch.Tensor, str]:
    """The token vectors the update writes into value slots, and which they are.

    The authors' BERT ties its output layer to the input word embeddings, so e_t is both.
    A model with an untied output layer predicts through its unembedding rows, so those
    are used; the input embeddings otherwise.
    """
    adapter = adapter_for(model)
    inputs, outputs = adapter.input_embeddings(), adapter.output_embeddings()
    if outputs.data_ptr() == inputs.data_ptr() or outputs.shape != inputs.shape:
        return inputs, "input embeddings (tied to the output layer)"
    return outputs, "output (unembedding) vectors (untied from the input embeddings)"


def updated_value_slots(
    model: nn.Module, neurons: Sequence[Neuron], old_id: int, new_id: int, lambda1: float, lambda2: float
) -> dict[Neuron, torch.Tensor]:
    """New value slots for the SPEC §7 update v <- v - l1 (|v|/|e_t|) e_t + l2 (|v|/|e_t'|) e_t'.

    All scales come from the unedited weights and all neurons change together. The
    arithmetic follows the authors' order (subtract, then add; scale = |v| / |e| * lambda);
    a neuron listed twice (possible in the random baseline) gets the update twice with the
    same scales, as their sequential in-place loop does. e are the rows :func:`edit_embeddings` picks.
    """
    adapter = adapter_for(model)
    embeddings, _ = edit_embeddings(model)
    if embeddings.shape[1] != adapter.hidden_size:
        raise ValueError(
            f"token vectors have size {embeddings.shape[1]} but value slots {adapter.hidden_size}: "
            "the SPEC §7 update adds token vectors to value slots and needs equal sizes"
        )
    with torch.no_grad():
        old_emb, new_emb = embeddings[old_id], embeddings[new_id]
        old_norm, new_norm = torch.norm(old_emb), torch.norm(new_emb)
        slots: dict[Neuron, torch.Tensor] = {}
        for layer, unit in neurons:
            original = adapter.value_slots(layer)[unit]
            value_norm = torch.norm(original)
            column = slots.get((layer, unit), original.clone())
            column = column - old_emb * (value_norm / old_norm * lambda1)
            column = column + new_emb * (value_norm / new_norm * lambda2)
            slots[(layer, unit)] = column
    return slots


def erased_value_slots(model: nn.Module, neurons: Sequence[Neuron], value: str, unk_id: int | None) -> dict[Neuron, torch.Tensor]:
    """Value slots for SPEC §8: zeros (the authors' run) or the [UNK] word embedding (their alternative)."""
    adapter = adapter_for(model)
    slots = adapter.value_slots(0)
    if value == "zero":
        fill = torch.zeros(adapter.hidden_size, dtype=slots.dtype, device=slots.device)
    elif value == "unk":
        if unk_id is None:
            raise ValueError("erase.value = 'unk' but the tokenizer has no unknown token")
        fill = adapter.input_embeddings()[unk_id].detach().clone()
        if fill.shape != (adapter.hidden_size,):
            raise ValueError(f"erase.value = 'unk': the embedding has size {fill.shape[0]}, value slots {adapter.hidden_size}")
    else:
        raise ValueError(f"erase.value = {value!r}; expected 'zero' or 'unk'")
    return {neuron: fill for neuron in dict.fromkeys(neurons)}


# ---------------------------------------------------------------------------------------------
# Scoring prompts


def mask_logits(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Float32 MLM logits at each prompt's first mask, ``[len(prompts), vocab]`` on the CPU (kn.models.forward).

    Use ``batch_size=1`` where the authors' numbers come from single-prompt passes.
    """
    if not prompts:
        return torch.empty(0, adapter_for(model).output_embeddings().shape[0])
    return target_logits(model, encode_prompts(tokenizer, prompts), batch_size=batch_size)


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
    """The model, its tokenizer and the vocabulary ids of object strings, for scoring prompts.

    With a causal ``codec`` (docs/causal.md) prompts are read at their last token before [Y] and
    an object's id is its first token as the tokenizer writes it after the prompt (``object_ids``
    is then not used); a masked LM reads the [MASK] and looks objects up in ``object_ids``.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    object_ids: Mapping[str, int | None]
    batch_size: int
    codec: PromptCodec | None = None

    @property
    def causal(self) -> bool:
        return self.codec is not None and self.codec.causal

    def logits(self, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        if self.causal:
            assert self.codec is not None
            if not prompts:
                return torch.empty(0, adapter_for(self.model).output_embeddings().shape[0])
            return target_logits(self.model, self.codec.encode(prompts), batch_size=batch_size or self.batch_size)
        return mask_logits(self.model, self.tokenizer, prompts, batch_size or self.batch_size)

    def gold(self, prompt: str, obj: str) -> int | None:
        """The id the model must predict for ``obj`` after ``prompt`` (None: the object cannot be scored)."""
        if self.causal:
            assert self.codec is not None
            return self.codec.target_id(prompt, obj)
        return self.object_ids[obj]

    def token(self, token_id: int) -> str:
        return str(self.tokenizer.convert_ids_to_tokens(int(token_id)))

    def fact_prompts(self, facts: Iterable[Fact]) -> tuple[list[str], list[int], int]:
        """All prompts of the facts whose object is one token, their gold ids, and how many were left out."""
        prompts: list[str] = []
        gold: list[int] = []
        left_out = 0
        for fact in facts:
            for prompt in fact.prompts:
                gold_id = self.gold(prompt, fact.object)
                if gold_id is None:
                    left_out += 1
                    continue
                prompts.append(prompt)
                gold.append(gold_id)
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
            gold_id = self.scorer.gold(fact.prompts[prompt_index], fact.object)
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
    prompt = fact.prompts[plan.prompt_index]
    gold_id = scorer.gold(prompt, fact.object)
    new_id = scorer.gold(prompt, plan.new_object)
    if gold_id is None or new_id is None:
        raise ValueError(f"{plan.relation} fact {plan.fact_id}: objects {fact.object!r} -> {plan.new_object!r} must be single tokens")
    paraphrases = [p for i, p in enumerate(fact.prompts) if i != plan.prompt_index]
    # per paraphrase, the ids of the old and new objects after it (a masked LM: the same two ids everywhere)
    para_new = torch.tensor([_id_or(scorer.gold(p, plan.new_object)) for p in paraphrases], dtype=torch.long)
    para_gold = torch.tensor([_id_or(scorer.gold(p, fact.object)) for p in paraphrases], dtype=torch.long)
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
        "para_success_before": _mean(para_top_before == para_new),
        "para_success_after": _mean(para_top_after == para_new),
        "para_gold_before": _mean(para_top_before == para_gold),
        "para_gold_after": _mean(para_top_after == para_gold),
        "intra_facts": " ".join(str(i) for i in plan.intra_facts),
        "inter_facts": " ".join(f"{r}:{i}" for r, i in plan.inter_facts),
        "ppl_prompts_left_out": intra_left + inter_left,
        "nll_intra_before": _mean(unedited.nll[intra_rows]),
        "nll_intra_after": _mean(nll_after[:n_intra]),
        "nll_inter_before": _mean(unedited.nll[inter_rows]),
        "nll_inter_after": _mean(nll_after[n_intra:]),
    }


def _id_or(token_id: int | None) -> int:
    """A token id, or -1 (never a prediction) when the object cannot be scored after that prompt."""
    return -1 if token_id is None else int(token_id)


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


# ---------------------------------------------------------------------------------------------
# The two studies, end to end on one loaded model


def editing_study(
    prompts: Mapping[str, pd.DataFrame], neurons: Mapping[str, pd.DataFrame], tokenizer: PreTrainedTokenizerBase,
    cap: int | None, codec: PromptCodec | None = None,
) -> tuple[dict[str, list[Fact]], dict[str, list[list[Neuron]]], dict[str, int | None]]:
    """The facts both editing studies use, per relation: the studied facts whose object is one
    token of the tokenizer (no other can be edited or scored), their IG knowledge neurons
    (aligned with the facts), and the vocabulary id of every object.

    ``prompts`` and ``neurons`` map each selected relation to its prompt and neuron tables. A
    causal ``codec`` keeps only the prompts of templates it reads, and the facts whose object
    has a first token after its first prompt (the ids are then looked up per prompt).
    """
    causal = codec is not None and codec.causal
    if set(prompts) != set(neurons):
        raise ValueError(f"relations with prompts {sorted(prompts)} differ from those with neurons {sorted(neurons)}")
    facts: dict[str, list[Fact]] = {}
    kn_lists: dict[str, list[list[Neuron]]] = {}
    object_ids: dict[str, int | None] = {}
    for relation in sorted(prompts):
        rows = studied_rows(prompts[relation], cap)
        if causal:  # the prompts a causal LM reads and whose object it can score (every prompt of a fact, on ParaRel)
            assert codec is not None
            rows = codec.usable_rows(rows)
            rows = rows[[codec.target_id(str(p), str(o)) is not None for p, o in zip(rows["prompt"], rows["object"])]]
        studied = facts_of(rows, relation)
        for fact in studied:
            if causal:
                assert codec is not None
                object_ids[fact.object] = codec.target_id(fact.prompts[0], fact.object)
            elif fact.object not in object_ids:
                object_ids[fact.object] = object_token_id(tokenizer, fact.object)
        facts[relation] = [fact for fact in studied if object_ids[fact.object] is not None]
        if len(facts[relation]) < len(studied):
            log.warning("%s: %d of %d studied facts left out: object not one token", relation,
                        len(studied) - len(facts[relation]), len(studied))
        lists = neuron_lists(neurons[relation], "ig", relation)
        kn_lists[relation] = [lists.get(fact.fact_id, []) for fact in facts[relation]]
    return facts, kn_lists, object_ids


def update_study(
    scorer: PromptScorer,
    facts: Mapping[str, Sequence[Fact]],
    kn_lists: Mapping[str, Sequence[Sequence[Neuron]]],
    *,
    seed: int,
    methods: Sequence[str],
    edits_per_relation: int,
    max_attempts: int,
    share: float,
    rule: str,
    ppl_facts: int,
    lambda1: float,
    lambda2: float,
    success_k: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """SPEC §7 for every method ("kn": the facts' knowledge neurons, "random": the random-neuron
    baseline), each a fresh stream seeded like the authors' script. Returns one row per edit
    and one row per (method, relation) of attempts and skips.

    ``kn_lists[relation][k]`` are the knowledge neurons of ``facts[relation][k]``.
    """
    top1_is_gold = Top1Cache(scorer)
    unedited, left_out = score_facts(scorer, facts)  # the "before" side of every PPL and paraphrase measure
    if left_out:
        log.warning("%d prompts left out of PPL sets: their object is not one token of this tokenizer", left_out)
    adapter = adapter_for(scorer.model)
    shape = (adapter.n_layers, adapter.ffn_size)
    rows: list[dict[str, object]] = []
    attempts: list[dict[str, object]] = []
    for method in methods:
        plans, report = sample_updates(
            random.Random(seed), facts, kn_lists, top1_is_gold, edits_per_relation=edits_per_relation,
            max_attempts=max_attempts, share=share, rule=rule, ppl_facts=ppl_facts,
            random_shape=shape if method == "random" else None,
            new_object_ok=lambda fact, prompt_index, obj: scorer.gold(fact.prompts[prompt_index], obj) is not None,
        )
        for status in report:
            attempts.append({"method": method, "relation": status.relation, "attempts": status.attempts,
                             "edits": status.edits, "single_object": status.single_object,
                             **{f"skipped_{reason}": status.skipped[reason] for reason in SKIP_REASONS}})
            log.info("%s %s: %d edits in %d attempts, skipped %s%s", method, status.relation, status.edits,
                     status.attempts, dict(status.skipped), " (all facts share one object)" if status.single_object else "")
        for plan in tqdm(plans, desc=f"edit ({method})", unit="edit"):
            row = run_update(scorer, facts, plan, unedited, lambda1=lambda1, lambda2=lambda2, success_k=success_k)
            rows.append({"method": method, **row})
    return pd.DataFrame.from_records(rows, columns=UPDATES.columns), pd.DataFrame.from_records(attempts)


def erase_study(scorer: PromptScorer, facts: Mapping[str, Sequence[Fact]], kn_lists: Mapping[str, Sequence[Sequence[Neuron]]],
                relations: Sequence[str], top_k: int, value: str) -> pd.DataFrame:
    """SPEC §8 for each of ``relations``: erase its ``top_k`` most frequent knowledge neurons, score
    every prompt of every studied fact before and after; one row per erased relation."""
    rows: list[dict[str, object]] = []
    if relations:
        before, left_out = score_facts(scorer, facts)
        if left_out:
            log.warning("%d prompts left out: their object is not one token of this tokenizer", left_out)
        for relation in tqdm(relations, desc="erase", unit="relation"):
            neurons = top_frequent_neurons(kn_lists[relation], top_k)
            if len(neurons) < top_k:
                log.warning("%s: only %d distinct knowledge neurons (erase.top_k = %d)", relation, len(neurons), top_k)
            row = erase_relation(scorer, facts, relation, neurons, value, before)
            log.info("%s: accuracy %.3f -> %.3f, PPL %.4g -> %.4g; others: accuracy %.3f -> %.3f, PPL %.4g -> %.4g",
                     relation, row["acc_before"], row["acc_after"], row["ppl_before"], row["ppl_after"],
                     row["other_acc_before"], row["other_acc_after"], row["other_ppl_before"], row["other_ppl_after"])
            rows.append(row)
    return pd.DataFrame.from_records(rows, columns=list(ERASE.columns))


# ---------------------------------------------------------------------------------------------
# Reports

# The paper's numbers (SPEC §12, [2nd]) printed beside ours.
_RATES, _PPL = paper_values("update_rates"), paper_values("update_ppl")
PAPER_UPDATE = {
    "kn": {"change_rate": _RATES["change_rate"], "success_rate": _RATES["success_rate"],
           "ppl_intra_delta": _PPL["ppl_intra_delta"], "ppl_inter_delta": _PPL["ppl_inter_delta"]},
    "random": {"change_rate": _RATES["random_change_rate"], "success_rate": _RATES["random_success_rate"],
               "ppl_inter_delta": _PPL["random_ppl_inter_delta"]},
}
# SPEC §12: PPL before -> after on the erased relation ([2nd] / [mem]).
PAPER_ERASE_PPL = {
    rel: (paper_values(f"erase:{rel}")["before"], paper_values(f"erase:{rel}")["after"]) for rel in ("P19", "P106", "P27", "P937")
}


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return str(value)


def _pct(value: float) -> str:
    return "nan" if value != value else f"{100 * value:+.1f}%"


def _provenance_lines(meta: Mapping[str, object], settings: Mapping[str, object]) -> list[str]:
    shown = {k: meta[k] for k in ("stage", "seed", "run_config", "versions") if k in meta}
    return ["", "## Provenance", "", "```json", json.dumps(shown, indent=2), "```", "",
            "Config of this run: `" + json.dumps(settings) + "`", ""]


def update_markdown(summary: pd.DataFrame, model_name: str, settings: Mapping[str, object], relation_share: float,
                    facts: Mapping[str, Sequence[Fact]], vectors: str, meta: Mapping[str, object]) -> str:
    """The overall table beside the paper's numbers, skip reasons per relation, and provenance."""
    k = settings["success_k"]
    overall = summary[summary["scope"] == "all"]
    sizes = [len(v) for v in facts.values()]
    lines = [
        "# Updating facts (SPEC §7)",
        "",
        f"Model `{model_name}`; {len(facts)} relations; studied facts per relation (object one token): "
        f"{min(sizes)}-{max(sizes)}; up to {settings['edits_per_relation']} edits per relation in at most "
        f"{settings['max_attempts']} attempts; lambda1 = {settings['lambda1']}, lambda2 = {settings['lambda2']}; "
        f"common-KN filter rule `{settings['kn_filter']}` (share {relation_share}); token vectors: {vectors}; "
        f"seed {meta.get('seed')}.",
        "",
        f"| method | edits | change | success | success@{k} | paraphrase success | MRR before -> after "
        "| PPL intra before -> after (delta) | PPL inter before -> after (delta) | paper change / success / dPPL intra / dPPL inter |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in overall.to_dict("records"):
        paper = PAPER_UPDATE.get(str(rec["method"]), {})
        paper_text = " / ".join(_fmt(paper.get(key, "n/a")) for key in ("change_rate", "success_rate", "ppl_intra_delta", "ppl_inter_delta"))
        lines.append(
            f"| {rec['method']} | {rec['edits']} | {_fmt(rec['change_rate'])} | {_fmt(rec['success_rate'])} "
            f"| {_fmt(rec[f'success_at_{k}'])} | {_fmt(rec['para_success_after'])} "
            f"| {_fmt(rec['mrr_before'])} -> {_fmt(rec['mrr_after'])} "
            f"| {_fmt(rec['ppl_intra_before'])} -> {_fmt(rec['ppl_intra_after'])} ({_fmt(rec['ppl_intra_delta'])}) "
            f"| {_fmt(rec['ppl_inter_before'])} -> {_fmt(rec['ppl_inter_after'])} ({_fmt(rec['ppl_inter_delta'])}) "
            f"| {paper_text} |"
        )
    lines += [
        "",
        "Paraphrase success (beyond the paper, SPEC §11.13): share of the edited fact's other prompts whose "
        "top-1 became the new object.",
        "",
        "## Attempts skipped, by reason",
        "",
        "`no_kn`: no knowledge neuron of the fact survived the common-KN filter (or the fact has none); "
        "`incorrect_answer`: the model's top-1 on the drawn prompt is not the gold object; "
        "`new_object_not_one_token`: the new object is not one vocabulary entry; "
        "single-object relations (every fact has the same object) cannot draw a different object and are skipped.",
        "",
        "| method | relation | edits | attempts | " + " | ".join(SKIP_REASONS) + " | single object |",
        "|---|---|---|---|" + "---|" * len(SKIP_REASONS) + "---|",
    ]
    for rec in summary.to_dict("records"):
        lines.append(
            f"| {rec['method']} | {rec['scope']} | {rec['edits']} | {rec['attempts']} | "
            + " | ".join(str(rec[f"skipped_{reason}"]) for reason in SKIP_REASONS)
            + f" | {rec['single_object_relations']} |"
        )
    return "\n".join(lines + _provenance_lines(meta, settings))


def erase_markdown(table: pd.DataFrame, model_name: str, settings: Mapping[str, object], not_selected: Sequence[str],
                   meta: Mapping[str, object]) -> str:
    """Per erased relation: accuracy and PPL before -> after on it and on the others, beside the paper."""
    lines = [
        "# Erasing relations (SPEC §8)",
        "",
        f"Model `{model_name}`; per relation the {settings['top_k']} knowledge neurons in the most facts' IG lists "
        f"(ties by first appearance) get value slots = `{settings['value']}`. Changes are (new - old) / old "
        "(SPEC §11.9: the authors print the PPL change with the opposite sign).",
        "",
        "| relation | neurons | accuracy before -> after (change) | PPL before -> after (change) | others: accuracy "
        "| others: PPL | paper PPL |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in table.to_dict("records"):
        paper = PAPER_ERASE_PPL.get(str(rec["relation"]))
        paper_text = f"{paper[0]:g} -> {paper[1]:g} ({_pct((paper[1] - paper[0]) / paper[0])})" if paper else "n/a"
        lines.append(
            f"| {rec['relation']} | {rec['n_neurons']} "
            f"| {_fmt(rec['acc_before'])} -> {_fmt(rec['acc_after'])} ({_pct(rec['acc_change'])}) "
            f"| {_fmt(rec['ppl_before'])} -> {_fmt(rec['ppl_after'])} ({_pct(rec['ppl_change'])}) "
            f"| {_fmt(rec['other_acc_before'])} -> {_fmt(rec['other_acc_after'])} ({_pct(rec['other_acc_change'])}) "
            f"| {_fmt(rec['other_ppl_before'])} -> {_fmt(rec['other_ppl_after'])} ({_pct(rec['other_ppl_change'])}) "
            f"| {paper_text} |"
        )
    if table.empty:
        lines.append("| (no relation of erase.relations is selected) | | | | | | |")
    lines += ["", "Paper, other relations' PPL: +1.1% to +10.1% (SPEC §12, ranges only)."]
    if not_selected:
        lines += ["", f"Not erased (not among the selected relations): {', '.join(not_selected)}."]
    return "\n".join(lines + _provenance_lines(meta, settings))
