"""Activating prompts on web sentences (SPEC §6, stages 4 and 5).

Per fact: T1 = its head+tail sentences with the tail masked, T2 = its head-only sentences
with a random non-head word masked, T3 = as many random pool sentences as T1 with a
random word masked. Each knowledge neuron's activation is read at [MASK] in an unmodified
forward pass and averaged per type.

Departures from the authors' code (SPEC §6, §11), all deliberate:

* Masks are drawn for every fact that has th and h sentences, from one ``random.Random``
  per relation seeded with ``f"{seed}/{relation}"``, whether or not the fact has knowledge
  neurons. The authors draw only for facts with KNs, from one stream over all relations
  and both methods, so IG and base saw different T2/T3 sentences. Here both methods read
  the same sentences (a paired comparison, like SPEC §5's recommendation) and each
  relation is an independent job. The call order within a fact is the authors' (T2
  randints with redraws, one ``sample`` over the pool, T3 randints).
* Head and tail are escaped completely (the authors escape only ``( ) $ .``); no head or
  tail of the data contains another regex character, so the masks are the same.
* A sentence is cut to the model's position limit as well as ``distant.max_len``; a
  sentence whose [MASK] falls outside the kept pieces cannot be read and is dropped and
  counted (the authors' 512 never cuts a Bing sentence, SPEC §1; a small model's can).
* A th sentence in which the tail cannot be found is dropped and counted (the authors'
  code would crash; it never happens on the shipped data).

A causal LM (docs/causal.md) reads each sentence cut just before [MASK] (trailing whitespace
stripped, the tokenizer's BOS first where it adds one), and the activation is read at the last
token before the masked word. A cut text longer than the position limit keeps its last tokens
(the ones next to the masked word); a sentence whose [MASK] is its first word has no token
before it and is not readable. ``n_pieces`` / ``n_unk`` count the tokens of the cut text.
"""

from __future__ import annotations

import logging
import random
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from kn.interventions import bootstrap_counts, percentile_ci, ratio_of_averages
from kn.markdown import format_cell, markdown_table
from kn.tables import DISTANT_ACTIVATIONS, DISTANT_FACTS, DISTANT_SENTENCES, Neuron

if TYPE_CHECKING:  # torch and transformers load only where a model runs (the aggregation needs neither)
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MASK_LITERAL = "[MASK]"  # as kn.models.encoding.MASK_LITERAL, which imports torch

log = logging.getLogger("kn.distant")

TYPES = ("T1", "T2", "T3")  # head+tail, head only, random
TYPE_LABELS = {"T1": "containing head and tail", "T2": "only head", "T3": "random"}
PLACEHOLDER = "@"


# ----------------------------------------------------------------------------- masking


def mask_tail(sentence: str, head: str, tail: str) -> str | None:
    """T1: mask the first occurrence of ``tail`` not touching an ASCII letter, never inside the head.

    Every occurrence of the head is first replaced by a same-length run of '@', so a tail
    that is part of the head ("Paris" in "Paris Hilton") is not masked there; the head is
    restored afterwards. Case-sensitive. None when no such occurrence exists.
    """
    protected = sentence.replace(head, PLACEHOLDER * len(head))
    pattern = re.compile(rf"(?<![a-zA-Z]){re.escape(tail)}(?![a-zA-Z])")
    masked, found = pattern.subn(lambda _match: MASK_LITERAL, protected, count=1)
    if not found:
        return None
    return masked.replace(PLACEHOLDER * len(head), head)


def draw_word(n_words: int, rng: random.Random, max_mask_word: int) -> int:
    """A word index uniform over the first ``max_mask_word`` words, drawn as the authors do."""
    return rng.randint(1, min(n_words, max_mask_word)) - 1


def mask_random_word(
    sentence: str, rng: random.Random, max_mask_word: int, head: str | None = None, head_redraws: int = 4
) -> tuple[str, str]:
    """T2 (with ``head``) / T3 (without): replace one space-separated word by [MASK].

    With a head, the head becomes one '@' word first and a draw that lands exactly on it
    is redrawn, at most ``head_redraws`` times (the last redraw is kept even if it is the
    head again). Attached punctuation goes with the word. Returns (masked sentence, the
    word that was masked, with the head restored).
    """
    placeholder = PLACEHOLDER * len(head) if head else None
    text = sentence.replace(head, placeholder) if head and placeholder else sentence
    words = text.split(" ")
    position = draw_word(len(words), rng, max_mask_word)
    redraws = 0
    while placeholder is not None and words[position] == placeholder and redraws < head_redraws:
        position = draw_word(len(words), rng, max_mask_word)
        redraws += 1
    masked_word = words[position]
    words[position] = MASK_LITERAL
    masked = " ".join(words)
    if head and placeholder:
        masked = masked.replace(placeholder, head)
        masked_word = masked_word.replace(placeholder, head)
    return masked, masked_word


@dataclass
class MaskedSentence:
    type: str  # T1, T2 or T3
    sentence_idx: int  # position within the fact's list of this type
    source_idx: int  # index in the fact's th / h list (T1 / T2) or in the global pool (T3)
    text: str | None  # with [MASK]; None when the tail was not found (T1)
    masked_word: str


def mask_fact_sentences(
    head: str,
    tail: str,
    th: Sequence[str],
    h: Sequence[str],
    pool: Sequence[str],
    rng: random.Random,
    max_mask_word: int,
    head_redraws: int,
) -> list[MaskedSentence]:
    """The fact's T1, T2 and T3 sentences, drawing from ``rng`` in the authors' call order (SPEC §13)."""
    out = [MaskedSentence("T1", k, k, mask_tail(s, head, tail), tail) for k, s in enumerate(th)]
    for k, sentence in enumerate(h):
        text, word = mask_random_word(sentence, rng, max_mask_word, head=head, head_redraws=head_redraws)
        out.append(MaskedSentence("T2", k, k, text, word))
    # sample() over range(len) consumes the same draws as over the pool list itself
    for k, pool_idx in enumerate(rng.sample(range(len(pool)), len(th))):
        text, word = mask_random_word(pool[pool_idx], rng, max_mask_word)
        out.append(MaskedSentence("T3", k, pool_idx, text, word))
    return out


# ----------------------------------------------------------------------------- encoding


def position_limit(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_len: int) -> int:
    """Longest input (special tokens included) the model and its tokenizer accept, at most ``max_len``."""
    from kn.models.adapters import adapter_for

    limit = adapter_for(model).position_limit()
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 10**6:
        limit = min(limit, tokenizer_limit)
    return min(max_len, limit)


@dataclass
class EncodedSentences:
    """Token ids ([CLS] + kept pieces + [SEP]) and what the cut and [UNK] did to each sentence."""

    input_ids: list[list[int]]
    mask_positions: list[int]  # index of the first mask token, counting [CLS] as 0; -1 if cut off
    n_pieces: list[int]  # wordpieces before the cut
    n_unk: list[int]  # unknown pieces before the cut
    truncated: list[bool]

    @property
    def readable(self) -> list[bool]:
        return [pos >= 0 for pos in self.mask_positions]


def encode_sentences(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int,
                     causal: bool = False) -> EncodedSentences:
    """Tokenise like the authors (SPEC §1): keep the first ``max_len - 2`` pieces, add [CLS]/[SEP].

    The literal "[MASK]" becomes the tokenizer's mask token. Unlike the prompt encoder, a
    [MASK] lost to the cut is recorded (position -1) rather than raised: web sentences are
    long and a small model's window is short. ``causal``: see the module doc.
    """
    if causal:
        return _encode_causal_sentences(tokenizer, texts, max_len)
    mask_token, mask_id, unk_id = tokenizer.mask_token, tokenizer.mask_token_id, tokenizer.unk_token_id
    if mask_token is None or mask_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token; a masked LM is required")
    encoded = EncodedSentences([], [], [], [], [])
    if not texts:  # the tokenizer rejects an empty batch
        return encoded
    texts = [t.replace(MASK_LITERAL, mask_token) for t in texts]
    pieces_list = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = tokenizer(texts, add_special_tokens=True, truncation="longest_first", max_length=max_len)["input_ids"]
    n_special = tokenizer.num_special_tokens_to_add()
    for pieces, ids in zip(pieces_list, cut):
        encoded.input_ids.append(list(ids))
        encoded.mask_positions.append(ids.index(mask_id) if mask_id in ids else -1)
        encoded.n_pieces.append(len(pieces))
        encoded.n_unk.append(sum(1 for p in pieces if p == unk_id))
        encoded.truncated.append(len(pieces) + n_special > max_len)
    return encoded


def _encode_causal_sentences(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int) -> EncodedSentences:
    from kn.models.encoding import bos_prefix, cut_before_mask

    prefix = bos_prefix(tokenizer)
    unk_id = tokenizer.unk_token_id
    encoded = EncodedSentences([], [], [], [], [])
    if not texts:
        return encoded
    cuts = [cut_before_mask(t)[0] for t in texts]
    for pieces in tokenizer(cuts, add_special_tokens=False)["input_ids"]:
        pieces = list(pieces)
        keep = max(0, max_len - len(prefix))
        ids = prefix + (pieces[len(pieces) - keep:] if keep else [])
        encoded.input_ids.append(ids if pieces else prefix)
        encoded.mask_positions.append(len(ids) - 1 if pieces and keep else -1)  # the last token before the masked word
        encoded.n_pieces.append(len(pieces))
        encoded.n_unk.append(sum(1 for p in pieces if unk_id is not None and p == unk_id))
        encoded.truncated.append(len(pieces) + len(prefix) > max_len)
    return encoded


def tail_piece_count(tokenizer: PreTrainedTokenizerBase, tail: str) -> int:
    """Wordpieces the model's tokenizer splits the tail into (T1 masks the whole tail with one [MASK])."""
    return len(tokenizer(tail, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- activations


def read_activations(
    model: PreTrainedModel,
    encoded: EncodedSentences,
    neurons: Sequence[Sequence[Neuron]],
    batch_size: int,
    desc: str | None = None,
) -> list[np.ndarray]:
    """For sentence k, the activations of ``neurons[k]`` at its [MASK] (float32, in list order).

    One unmodified forward pass of the encoder per batch (kn.models.forward; the MLM head is
    not needed). Unreadable sentences (mask cut off) get an empty array.
    """
    import torch

    from kn.models.encoding import EncodedPrompts
    from kn.models.forward import target_passes

    wanted = [k for k, pos in enumerate(encoded.mask_positions) if pos >= 0 and len(neurons[k])]
    out = [np.zeros(0, dtype=np.float32) for _ in encoded.input_ids]
    if not wanted:
        return out
    layers = sorted({int(layer) for k in wanted for layer, _ in neurons[k]})
    layer_row = {layer: row for row, layer in enumerate(layers)}
    readable = EncodedPrompts([encoded.input_ids[k] for k in wanted], [encoded.mask_positions[k] for k in wanted])
    for batch in target_passes(model, readable, batch_size=batch_size, capture=layers, logits=False, progress=desc):
        assert batch.activations is not None
        stacked = batch.activations.float().cpu()  # [B, L, units]
        for row, item in enumerate(batch.items):
            k = wanted[item]
            index_l = torch.tensor([layer_row[int(layer)] for layer, _ in neurons[k]])
            index_i = torch.tensor([int(unit) for _, unit in neurons[k]])
            out[k] = stacked[row, index_l, index_i].numpy().astype(np.float32)
    return out


def relation_study(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    relation: str,
    facts: pd.DataFrame,
    knowledge_neurons: dict[str, dict[int, list[Neuron]]],
    bags: dict[tuple[int, str], list[str]],
    pool: Sequence[str],
    *,
    seed: int,
    max_len: int,
    max_mask_word: int,
    head_redraws: int,
    batch_size: int,
    codec: Any = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, int]:
    """Stage 4 for one relation: the (facts, sentences, activations) tables and the cut used.

    ``facts`` has one row per studied fact (fact_id, subject, object); ``knowledge_neurons``
    maps each method to its facts' neuron lists; ``bags[(fact_id, "th" | "h")]`` are the
    fact's web sentences and ``pool`` every sentence of every relation (T3). Masks come from
    one stream per relation seeded with ``f"{seed}/{relation}"`` (see the module doc).
    """
    from kn.models.encoding import object_token_id

    causal = codec is not None and codec.causal
    methods = list(knowledge_neurons)
    cut = position_limit(model, tokenizer, max_len)
    if cut < max_len:
        log.warning("model takes at most %d positions: sentences are cut there (distant.max_len=%d)", cut, max_len)
    if causal:  # the tail as a causal LM writes it after a word and a space
        def tail_pieces(tail: str) -> int:
            return len(codec.object_tokens("x [MASK]", tail))

        def tail_single(tail: str) -> bool:
            return tail_pieces(tail) == 1
    else:
        def tail_pieces(tail: str) -> int:
            return tail_piece_count(tokenizer, tail)

        def tail_single(tail: str) -> bool:
            return object_token_id(tokenizer, tail) is not None

    rng = random.Random(f"{seed}/{relation}")  # str seeds are hashed deterministically (sha512)
    fact_rows, sentence_rows, sentence_neurons = [], [], []
    for fact_id, subject, obj in facts[["fact_id", "subject", "object"]].itertuples(index=False):
        th, h = bags.get((fact_id, "th"), []), bags.get((fact_id, "h"), [])
        lists = {method: knowledge_neurons[method].get(fact_id, []) for method in methods}
        status = {m: "no_exmp" if not th or not h else ("no_kn" if not lists[m] else "ok") for m in methods}
        fact_rows.append(
            (relation, fact_id, subject, obj, len(th), len(h), tail_pieces(obj), tail_single(obj), len(lists["ig"]),
             len(lists["base"]), status["ig"], status["base"])
        )  # fmt: skip
        if not th or not h:
            continue
        union = list(dict.fromkeys(neuron for m in methods for neuron in lists[m]))
        for masked in mask_fact_sentences(subject, obj, th, h, pool, rng, max_mask_word, head_redraws):
            sentence_rows.append((relation, fact_id, masked.type, masked.sentence_idx, masked.source_idx, masked.text,
                                  masked.masked_word))
            sentence_neurons.append(union)

    sentences = pd.DataFrame(sentence_rows, columns=DISTANT_SENTENCES.columns[:7])
    found = sentences["text"].notna().to_numpy()
    encoded = encode_sentences(tokenizer, sentences.loc[found, "text"].tolist(), cut, causal=causal)
    for column, values in (("n_pieces", encoded.n_pieces), ("n_unk", encoded.n_unk), ("truncated", encoded.truncated)):
        sentences[column] = pd.Series(values, index=sentences.index[found])
        sentences[column] = sentences[column].fillna(0 if column != "truncated" else False)
    sentences["readable"] = False
    sentences.loc[found, "readable"] = encoded.readable
    sentences["max_len"] = cut
    log.info(
        "%s: %d studied facts, %d sentences (%d tail not found, %d truncated, %d [MASK] cut off), max_len %d",
        relation, len(facts), len(sentences), int((~found).sum()), int(sentences["truncated"].sum()),
        int(found.sum() - sum(encoded.readable)), cut,
    )  # fmt: skip

    found_neurons = [n for n, ok in zip(sentence_neurons, found) if ok]
    values = read_activations(model, encoded, found_neurons, batch_size, desc=f"{relation} sentences")
    activation_rows = []
    found_rows = (row for row, ok in zip(sentences.itertuples(index=False), found) if ok)
    for row, neurons, acts in zip(found_rows, found_neurons, values):
        if not len(acts):
            continue
        value_of = dict(zip(neurons, acts.tolist()))
        for method in methods:
            for order, (layer, unit) in enumerate(knowledge_neurons[method].get(row.fact_id, [])):
                activation_rows.append((relation, method, row.fact_id, layer, unit, order, row.type, row.sentence_idx,
                                        value_of[(layer, unit)]))
    return (pd.DataFrame(fact_rows, columns=DISTANT_FACTS.columns), sentences[DISTANT_SENTENCES.columns],
            pd.DataFrame(activation_rows, columns=DISTANT_ACTIVATIONS.columns), cut)


# ----------------------------------------------------------------------------- aggregation


def usable_sentences(sentences: pd.DataFrame, facts: pd.DataFrame, max_unk_share: float) -> pd.Series:
    """Sentences whose numbers mean what they say for this model: [MASK] read, at most
    ``max_unk_share`` of the pieces unknown, and (T1) a tail the model writes as one known piece,
    so the [MASK] stands for exactly the tail token."""
    single = sentences[["relation", "fact_id"]].merge(
        facts[["relation", "fact_id", "tail_single_token"]], on=["relation", "fact_id"], how="left"
    )["tail_single_token"].fillna(False).to_numpy(dtype=bool)
    unk_share = sentences["n_unk"] / sentences["n_pieces"].clip(lower=1)
    ok = sentences["readable"].to_numpy(dtype=bool) & (unk_share <= max_unk_share).to_numpy()
    return pd.Series(ok & ((sentences["type"] != "T1").to_numpy() | single), index=sentences.index)


def fact_means(activations: pd.DataFrame, sentences: pd.DataFrame) -> pd.DataFrame:
    """Per (method, fact, neuron): mean activation over the fact's T1 / T2 / T3 sentences.

    ``sentences`` are those counted (e.g. all readable ones, or the usable ones); a fact is
    kept only if each of the three types has at least one counted sentence, so the three
    means of a relation always come from the same facts.
    """
    keys = ["relation", "fact_id", "type", "sentence_idx"]
    rows = activations.merge(sentences[keys], on=keys, how="inner")
    neuron_keys = ["relation", "method", "fact_id", "layer", "neuron", "order"]
    means = rows.groupby(neuron_keys + ["type"], sort=True)["activation"].mean().unstack("type")
    means = means.reindex(columns=list(TYPES))
    means = means.dropna(how="any").reset_index()
    means.columns.name = None
    return means.sort_values(["relation", "method", "fact_id", "order"], kind="stable").reset_index(drop=True)


def relation_means(per_fact: pd.DataFrame) -> pd.DataFrame:
    """Per relation and method: the mean over every pooled (fact, neuron) value (SPEC §6)."""
    grouped = per_fact.groupby(["relation", "method"], sort=True)
    out = grouped[list(TYPES)].mean()
    out["n_facts"] = grouped["fact_id"].nunique()
    out["n_values"] = grouped.size()
    return out.reset_index()[["relation", "method", "n_facts", "n_values", *TYPES]]


# The paper's claim is T1 > T2 and T1 > T3: their paired differences carry intervals too.
CONTRASTS = (("T1", "T2"), ("T1", "T3"))
_MEASURES = [*TYPES, *(f"{a}_minus_{b}" for a, b in CONTRASTS)]
OVERALL_COLUMNS = ["method", "n_relations", "n_facts", *TYPES,
                   *(f"{kind}_{bound}" for kind in TYPES for bound in ("ci_low", "ci_high")),
                   *(f"{name}{suffix}" for name in _MEASURES[len(TYPES):] for suffix in ("", "_ci_low", "_ci_high"))]


def overall_means(per_fact: pd.DataFrame, resamples: int = 0, seed: int = 0) -> pd.DataFrame:
    """Per method: the unweighted mean over relations of the relation means (SPEC §6: every pooled
    (fact, neuron) value of a relation weighs alike), with 95% percentile bootstrap intervals over facts.

    A relation's mean is sum(values) / count(values) over its facts, so a resample reweights each
    fact's sum and count. One resampling per relation (relations sorted, ``np.random.default_rng(seed)``)
    is shared by both methods and the three sentence types, so their comparisons are paired; the
    overall interval averages the resampled relation means. ``resamples=0``: no intervals (NaN).
    """
    rng = np.random.default_rng(seed)
    points: dict[str, dict[str, list[float]]] = {}
    samples: dict[str, dict[str, list[np.ndarray]]] = {}
    n_facts: dict[str, int] = {}
    for _, rel in per_fact.groupby("relation", sort=True):
        facts = np.sort(rel["fact_id"].unique())
        counts = bootstrap_counts(len(facts), resamples, rng) if resamples > 0 else None
        for method, group in rel.groupby("method", sort=True):
            by_fact = group.groupby("fact_id", sort=True)
            positions = np.searchsorted(facts, np.asarray(list(by_fact.groups)))
            values = np.zeros(len(facts))
            values[positions] = by_fact.size().to_numpy(np.float64)
            n_facts[method] = n_facts.get(method, 0) + len(positions)
            sums = by_fact[list(TYPES)].sum()
            for kind in TYPES:
                total = np.zeros(len(facts))
                total[positions] = sums[kind].to_numpy(np.float64)
                points.setdefault(method, {}).setdefault(kind, []).append(float(ratio_of_averages(total, values)))
                if counts is not None:
                    samples.setdefault(method, {}).setdefault(kind, []).append(ratio_of_averages(total, values, counts))
    rows = []
    for method in sorted(points):
        row: dict[str, object] = {"method": method, "n_relations": len(points[method][TYPES[0]]),
                                  "n_facts": n_facts[method]}
        relation_points = {kind: np.asarray(points[method][kind]) for kind in TYPES}
        relation_samples = {kind: np.stack(samples[method][kind]) for kind in TYPES} if samples else {}
        for first, second in CONTRASTS:
            name = f"{first}_minus_{second}"
            relation_points[name] = relation_points[first] - relation_points[second]
            if relation_samples:
                relation_samples[name] = relation_samples[first] - relation_samples[second]
        for name in _MEASURES:
            with warnings.catch_warnings():  # a resample that drew none of a method's facts anywhere: NaN, left out
                warnings.simplefilter("ignore", RuntimeWarning)
                row[name] = float(np.nanmean(relation_points[name]))
                resampled = np.nanmean(relation_samples[name], axis=0) if relation_samples else None
            low, high = percentile_ci(resampled) if resampled is not None else (float("nan"), float("nan"))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows, columns=OVERALL_COLUMNS)


def trigger_ranking(activations: pd.DataFrame, method: str = "ig") -> pd.DataFrame:
    """Stage 5: per fact and T1 sentence, the sum of its KN activations at [MASK], highest first."""
    rows = activations[(activations["method"] == method) & (activations["type"] == "T1")]
    scores = rows.groupby(["relation", "fact_id", "sentence_idx"], sort=True)["activation"].sum().rename("score")
    scores = scores.reset_index()
    return scores.sort_values(["relation", "fact_id", "score", "sentence_idx"], ascending=[True, True, False, True], kind="stable")


def usability_table(facts: pd.DataFrame, sentences: pd.DataFrame, max_unk_share: float) -> pd.DataFrame:
    """Per relation (and "all"): how many facts and sentences the model at hand can really use.

    Facts: studied, without th or h sentences, with KNs (ig / base), whose tail is one known
    piece. Sentences per type: total, tail not found (T1), cut by the position limit, [MASK]
    cut off (unreadable), mostly unknown pieces, usable (:func:`usable_sentences`); the share
    of unknown pieces and the pieces per space-separated word (about 1.3 for text a vocabulary
    covers; a small vocabulary splits web text into many pieces without [UNK]).
    """
    sentences = sentences.assign(
        usable=usable_sentences(sentences, facts, max_unk_share),
        mostly_unk=sentences["n_unk"] / sentences["n_pieces"].clip(lower=1) > max_unk_share,
        mask_cut_off=sentences["text"].notna() & ~sentences["readable"].astype(bool),
        tail_not_found=sentences["text"].isna(),
    )
    rows = []
    for relation in [*sorted(facts["relation"].unique()), "all"]:
        f = facts if relation == "all" else facts[facts["relation"] == relation]
        s = sentences if relation == "all" else sentences[sentences["relation"] == relation]
        row: dict[str, object] = {
            "relation": relation,
            "facts": len(f),
            "facts_no_exmp": int((f["status_ig"] == "no_exmp").sum()),
            "facts_kn_ig": int((f["n_kn_ig"] > 0).sum()),
            "facts_kn_base": int((f["n_kn_base"] > 0).sum()),
            "tails_single_token": int(f["tail_single_token"].sum()),
        }
        for kind in TYPES:
            t = s[s["type"] == kind]
            row[f"{kind}_sentences"] = len(t)
            for column in ("tail_not_found", "truncated", "mask_cut_off", "mostly_unk", "usable"):
                if column != "tail_not_found" or kind == "T1":
                    row[f"{kind}_{column}"] = int(t[column].astype(bool).sum())
        row["unk_piece_share"] = float(s["n_unk"].sum() / max(1, s["n_pieces"].sum()))
        found = s[s["text"].notna()]  # words split into many pieces: text far from the model's vocabulary
        row["pieces_per_word"] = float(found["n_pieces"].sum() / max(1, found["text"].str.split(" ").str.len().sum()))
        rows.append(row)
    return pd.DataFrame(rows)

SUBSETS = ("all", "usable")


def summarize_relations(facts: pd.DataFrame, sentences: pd.DataFrame, activations: pd.DataFrame, max_unk_share: float,
                        resamples: int = 0, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per-fact means, per-relation means, overall means with ``resamples`` bootstrap intervals, usability)
    for both sentence subsets (SPEC §6)."""
    per_fact = subset_means(facts, sentences, activations, max_unk_share)
    by_relation = pd.concat(
        [relation_means(per_fact[per_fact["subset"] == name]).assign(subset=name) for name in SUBSETS], ignore_index=True
    )[["subset", "relation", "method", "n_facts", "n_values", *TYPES]]
    overall = pd.concat(
        [overall_means(per_fact[per_fact["subset"] == name], resamples, seed).assign(subset=name) for name in SUBSETS],
        ignore_index=True,
    )[["subset", *OVERALL_COLUMNS]]
    return per_fact, by_relation, overall, usability_table(facts, sentences, max_unk_share)


def subset_means(facts: pd.DataFrame, sentences: pd.DataFrame, activations: pd.DataFrame, max_unk_share: float) -> pd.DataFrame:
    """Per-fact means for both sentence subsets, stacked with a ``subset`` column."""
    readable = sentences[sentences["readable"].astype(bool)]
    usable = sentences[usable_sentences(sentences, facts, max_unk_share)]
    return pd.concat(
        [fact_means(activations, chosen).assign(subset=name) for name, chosen in zip(SUBSETS, (readable, usable))],
        ignore_index=True,
    )


def summary_markdown(overall: pd.DataFrame, by_relation: pd.DataFrame, usability: pd.DataFrame, model_name: str,
                     max_len: int, configured_max_len: int, max_unk_share: float, seed: int) -> str:
    """Overall and per-relation means, then how usable the sentences were for this model."""
    types = ", ".join(f"{kind} = {label}" for kind, label in TYPE_LABELS.items())
    compact = usability[["relation", "facts", "facts_no_exmp", "facts_kn_ig", "tails_single_token"]].copy()
    for kind in TYPES:
        compact[kind] = [
            f"{u} / {s - c - (nf if kind == 'T1' else 0)} / {s}"
            for u, s, c, nf in zip(
                usability[f"{kind}_usable"], usability[f"{kind}_sentences"], usability[f"{kind}_mask_cut_off"],
                usability.get(f"{kind}_tail_not_found", pd.Series(0, index=usability.index)),
            )
        ]  # fmt: skip
    compact["unk_piece_share"] = usability["unk_piece_share"]
    compact["pieces_per_word"] = usability["pieces_per_word"]
    return "\n".join(
        [
            "# Activating prompts on web sentences (SPEC §6)",
            "",
            f"Model `{model_name}`; mean activation of each fact's knowledge neurons at [MASK]; {types}. "
            "Per relation: mean over every pooled (fact, neuron) value; overall: unweighted mean over relations, "
            "with 95% percentile bootstrap intervals over facts (one resampling per relation, paired across methods "
            "and types); T1_minus_T2 and T1_minus_T3 are the paired differences the paper's claim (T1 above both) "
            "rests on. "
            f"Sentences cut to {max_len} positions (distant.max_len {configured_max_len}, capped by the model). "
            "Subset `all`: every sentence whose [MASK] the model reads (the authors' procedure); `usable`: at most "
            f"{max_unk_share:.0%} unknown pieces and, for T1, a tail that is one known token. "
            "Both methods read the same masked sentences (seed "
            f"{seed}, one stream per relation).",
            "",
            "## Overall",
            "",
            markdown_table(overall),
            "## Per relation",
            "",
            markdown_table(by_relation),
            "## How usable the web sentences are for this model",
            "",
            "Facts: studied; without th or h sentences (skipped, as in the paper); with IG knowledge neurons; whose tail "
            "is one known token (otherwise the T1 [MASK] stands for several pieces). Per type: usable / readable "
            "([MASK] within the kept pieces and, for T1, the tail found) / all sentences. unk_piece_share: share of "
            "all wordpieces that are unknown to the tokenizer; pieces_per_word: wordpieces per space-separated word (a "
            "vocabulary that covers the text gives about 1.3; a small one splits web words into many pieces).",
            "",
            markdown_table(compact),
        ]
    )


def shown_ranks(n: int, lines: int) -> list[int]:
    """Ranks (0-based) to print: all when n <= lines, else the top and bottom halves."""
    if n <= lines:
        return list(range(n))
    top = (lines + 1) // 2
    return list(range(top)) + list(range(n - (lines - top), n))


def triggers_markdown(
    relation: str, label: str, facts: pd.DataFrame, sentences: pd.DataFrame, activations: pd.DataFrame, lines: int
) -> str:
    """The readable report of one relation (see the module docstring)."""
    ranking = trigger_ranking(activations, "ig")
    kn_rows = activations[(activations["method"] == "ig")].drop_duplicates(["fact_id", "order"]).sort_values(["fact_id", "order"])
    by_key = sentences[sentences["type"] == "T1"].set_index(["fact_id", "sentence_idx"])
    out = [
        f"# Activating sentences: {relation} ({label}), IG knowledge neurons",
        "",
        "SPEC §6, stage 5. Each of the fact's head+tail web sentences has its tail masked (T1); its score is the "
        "sum of the fact's knowledge-neuron activations at [MASK]. Sentences are ranked highest first; "
        f"with more than {lines} sentences the top and bottom {lines // 2} are shown. Neurons are `layer:neuron`, "
        "layers counted from 0. `unk` is the share of the sentence's wordpieces unknown to the model's tokenizer; "
        "`cut` marks a sentence cut to the model's window (only its kept pieces were read).",
        "",
    ]
    shown = 0
    for fact in facts.sort_values("fact_id").itertuples(index=False):
        ranked = ranking[ranking["fact_id"] == fact.fact_id]
        if fact.status_ig != "ok" or ranked.empty:
            continue
        shown += 1
        neurons = kn_rows[kn_rows["fact_id"] == fact.fact_id]
        out += [
            f"## Fact {fact.fact_id}: ⟨{fact.subject}, {label}, {fact.object}⟩",
            "",
            "Knowledge neurons: " + ", ".join(f"`{layer}:{unit}`" for layer, unit in zip(neurons["layer"], neurons["neuron"])),
            "",
            "| rank | score | sentence | unk | cut |",
            "|---|---|---|---|---|",
        ]
        for rank in shown_ranks(len(ranked), lines):
            row = ranked.iloc[rank]
            sentence = by_key.loc[(row["fact_id"], row["sentence_idx"])]
            unk = sentence["n_unk"] / max(1, sentence["n_pieces"])
            out.append(
                f"| {rank + 1} | {row['score']:.4f} | {format_cell(sentence['text'])} | {unk:.0%} "
                f"| {'yes' if sentence['truncated'] else ''} |"
            )
        out.append("")
    if not shown:
        out.append("No fact of this relation has both IG knowledge neurons and a readable head+tail sentence.\n")
    log.info("%s: %d facts written", relation, shown)
    return "\n".join(out)
