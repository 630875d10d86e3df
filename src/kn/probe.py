"""What a language model knows about ParaRel facts (SPEC §1 and the "get_pred" part of §3).

For every prompt: P(gold) as a softmax over the full vocabulary at the target position, the
gold token's rank, the top-1 token and whether it is the gold object.

Masked LMs: read at the first [MASK]; objects that are not a single token for the model's
tokenizer are marked skipped and never scored, because a first-piece score would silently
measure something else.

Causal LMs (docs/causal.md): read at the last token of the prompt cut before [Y]; the gold is
the first token of the object as the tokenizer writes it after the prompt, so multi-token
objects are scored (by their first token) and the table adds, per prompt, how the template
was used (``template_use``: text after [Y] dropped or not, subject after [Y]: skipped), the
object's token count, log P(all object tokens | prompt) teacher-forced, and whether greedy
decoding writes exactly the whole object (``greedy_match``).
"""

from __future__ import annotations

import logging
import random
from typing import Collection, Mapping, Sequence

import numpy as np
import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kn.models.encoding import PromptCodec, encode_prompts, object_token_id, template_use
from kn.models.forward import score_continuations, score_targets
from kn.tables import PROBE, PROBE_CAUSAL

log = logging.getLogger("kn.probe")

PROMPT_MAX_LEN = 128  # ParaRel prompts (SPEC §1)


def score_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    gold_ids: Sequence[int],
    batch_size: int = 64,
    progress: bool = False,
    codec: PromptCodec | None = None,
) -> pd.DataFrame:
    """Per prompt: gold_prob, gold_rank (1 = top; ties counted in the gold's favour) and pred_id.

    A negative gold id means "no gold": gold_prob is NaN and gold_rank -1, but the prediction
    is still made. Results come back in input order (kn.models.forward batches by length).
    ``codec`` says how the model reads prompts (default: the model's kind, kn.models.encoding).
    """
    if len(prompts) != len(gold_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(gold_ids)} gold ids")
    codec = codec or PromptCodec.of(model, tokenizer, max_len=PROMPT_MAX_LEN)
    encoded = codec.encode(prompts) if codec.causal else encode_prompts(tokenizer, prompts, max_len=PROMPT_MAX_LEN)
    scores = score_targets(model, encoded, gold_ids, batch_size=batch_size, progress="probe" if progress else None)
    return pd.DataFrame({"gold_prob": scores.prob, "gold_rank": scores.rank, "pred_id": scores.pred.astype(np.int32)})


def gold_token_ids(tokenizer: PreTrainedTokenizerBase, objects: Sequence[str]) -> np.ndarray:
    """Vocabulary id per object string, -1 where the object is not a single token."""
    cache: dict[str, int] = {}
    for obj in set(objects):
        token = object_token_id(tokenizer, obj)
        cache[obj] = -1 if token is None else token
    return np.array([cache[o] for o in objects], dtype=np.int32)


def probe_relation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: pd.DataFrame,
    heldout_templates: Collection[int] = (),
    batch_size: int = 64,
    codec: PromptCodec | None = None,
) -> pd.DataFrame:
    """The probe table (docs/CONTRACTS.md) for ingested prompt rows of one or more relations.

    ``correct`` is "top-1 id == gold id", which for a WordPiece vocabulary equals SPEC §1's
    "predicted wordpiece string == object string" (the gold id is the object's own entry).
    A causal LM (``codec.causal``) gets the PROBE_CAUSAL table (see the module doc).
    """
    for column in ("relation", "fact_id", "template_id", "prompt", "object"):
        if column not in prompts.columns:
            raise ValueError(f"prompt table has no column {column!r}; expected an ingested relation parquet")
    codec = codec or PromptCodec.of(model, tokenizer, max_len=PROMPT_MAX_LEN)
    if codec.causal:
        return _probe_causal(model, codec, prompts, heldout_templates, batch_size)
    gold = gold_token_ids(tokenizer, list(prompts["object"]))
    scores = score_prompts(model, tokenizer, list(prompts["prompt"]), gold.tolist(), batch_size, progress=True)
    skipped = gold < 0
    table = _probe_frame(prompts, heldout_templates, gold, scores, skipped, tokenizer)
    if skipped.any():
        log.warning(
            "%d of %d prompts skipped: objects not one token: %s",
            int(skipped.sum()), len(table), sorted(set(prompts["object"][skipped]))[:10],
        )
    return table[PROBE.columns]


def _probe_frame(prompts: pd.DataFrame, heldout_templates: Collection[int], gold: np.ndarray, scores: pd.DataFrame,
                 skipped: np.ndarray, tokenizer: PreTrainedTokenizerBase) -> pd.DataFrame:
    heldout = set(int(t) for t in heldout_templates)
    return pd.DataFrame(
        {
            "relation": prompts["relation"].astype("string").to_numpy(),
            "fact_id": prompts["fact_id"].astype("int32").to_numpy(),
            "template_id": prompts["template_id"].astype("int32").to_numpy(),
            "heldout": np.array([int(t) in heldout for t in prompts["template_id"]], dtype=bool),
            "gold_id": gold,
            "gold_prob": scores["gold_prob"].to_numpy(),
            "gold_rank": scores["gold_rank"].to_numpy(),
            "pred_token": pd.array(_tokens(tokenizer, scores["pred_id"].tolist()), dtype="string"),
            "correct": (scores["pred_id"].to_numpy() == gold) & ~skipped,
            "skipped": skipped,
        }
    )


def _tokens(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str | None]:
    """Vocabulary strings of ``ids``; None for -1 (nothing predicted: the prompt was not run)."""
    if all(int(i) >= 0 for i in ids):
        return tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return [tokenizer.convert_ids_to_tokens(int(i)) if int(i) >= 0 else None for i in ids]


def _probe_causal(model: PreTrainedModel, codec: PromptCodec, prompts: pd.DataFrame, heldout_templates: Collection[int],
                  batch_size: int) -> pd.DataFrame:
    """The causal probe: every prompt row listed; rows of unused templates (or whose object cannot be
    separated from the prompt) skipped; the rest scored by first token and by the whole object."""
    if "template" not in prompts.columns:
        raise ValueError("prompt table has no column 'template'; a causal LM needs it to cut prompts before [Y]")
    prompts = prompts.reset_index(drop=True)
    uses = prompts["template"].map(lambda t: template_use(str(t))).to_numpy()
    used = prompts["template"].map(lambda t: codec.uses_template(str(t))).to_numpy(dtype=bool)
    tokens = [codec.object_tokens(p, o) if u else () for p, o, u in zip(prompts["prompt"], prompts["object"], used)]
    skipped = np.array([not t for t in tokens], dtype=bool)
    gold = np.array([t[0] if t else -1 for t in tokens], dtype=np.int32)
    scores = pd.DataFrame({"gold_prob": np.full(len(prompts), np.nan, dtype=np.float32),
                           "gold_rank": np.full(len(prompts), -1, dtype=np.int32),
                           "pred_id": np.full(len(prompts), -1, dtype=np.int64)})
    logprob = np.full(len(prompts), np.nan)
    greedy = np.zeros(len(prompts), dtype=bool)
    scored = np.flatnonzero(~skipped)
    if len(scored):
        encoded = codec.encode([str(p) for p in prompts["prompt"].iloc[scored]])
        whole = score_continuations(model, encoded, [tokens[k] for k in scored], batch_size=batch_size, progress="probe")
        scores.loc[scored, "gold_prob"] = whole.first.prob
        scores.loc[scored, "gold_rank"] = whole.first.rank
        scores.loc[scored, "pred_id"] = whole.first.pred
        logprob[scored] = whole.logprob
        greedy[scored] = whole.greedy
    table = _probe_frame(prompts, heldout_templates, gold, scores, skipped, codec.tokenizer)
    table["template_use"] = pd.array(uses, dtype="string")
    table["object_tokens"] = np.array([len(t) for t in tokens], dtype=np.int32)
    table["object_logprob"] = logprob
    table["greedy_match"] = greedy
    unused = int((~used).sum())
    if skipped.any():
        log.warning("%d of %d prompts skipped: %d of templates not used (%s), %d whose object cannot be separated from "
                    "the prompt's tokens", int(skipped.sum()), len(table), unused,
                    "subject after [Y]" + (" or text after [Y]" if codec.templates_ending_in_y else ""),
                    int(skipped.sum()) - unused)
    return table[PROBE_CAUSAL.columns]


def majority_baseline(facts: pd.DataFrame) -> pd.Series:
    """Per relation: accuracy of always answering the relation's most frequent object (over its facts)."""
    return facts.groupby("relation", sort=True)["object"].agg(lambda s: s.value_counts().iloc[0] / len(s))


def accuracy_summary(probe: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    """Per relation: accuracy and mean gold probability on training vs held-out templates, the
    majority-object baseline over the scored facts, and how many facts were skipped."""
    merged = probe.merge(
        prompts[["relation", "fact_id", "template_id", "object"]], on=["relation", "fact_id", "template_id"], how="left"
    )
    causal = "template_use" in probe.columns
    rows = []
    for relation, group in merged.groupby("relation", sort=True):
        scored = group[~group["skipped"]]
        train, held = scored[~scored["heldout"]], scored[scored["heldout"]]
        facts = scored.drop_duplicates(["fact_id"])
        rows.append(
            {
                "relation": relation,
                "facts": int(group["fact_id"].nunique()),
                "skipped_facts": int(group["fact_id"].nunique() - scored["fact_id"].nunique()),  # facts with no scored prompt
                "skipped_prompts": int(group["skipped"].sum()),
                "train_prompts": len(train),
                "heldout_prompts": len(held),
                "train_accuracy": train["correct"].mean() if len(train) else np.nan,
                "heldout_accuracy": held["correct"].mean() if len(held) else np.nan,
                "train_gold_prob": train["gold_prob"].mean() if len(train) else np.nan,
                "heldout_gold_prob": held["gold_prob"].mean() if len(held) else np.nan,
                "majority_baseline": majority_baseline(facts).iloc[0] if len(facts) else np.nan,
                **(_causal_columns(group, scored, train, held) if causal else {}),
            }
        )
    return pd.DataFrame(rows)


CAUSAL_COLUMNS = ("templates", "templates_ending_in_y", "templates_text_after_y", "templates_subject_after_y",
                  "templates_used", "prompts_text_dropped", "multi_token_facts", "train_exact_match",
                  "heldout_exact_match")


def _causal_columns(group: pd.DataFrame, scored: pd.DataFrame, train: pd.DataFrame, held: pd.DataFrame) -> dict:
    """A causal probe's extra per-relation numbers: how its templates were used, multi-token objects, and
    exact match of the greedy continuation for the whole object."""
    templates = group.drop_duplicates("template_id")
    return {
        "templates": len(templates),
        "templates_ending_in_y": int((templates["template_use"] == "ends_in_y").sum()),
        "templates_text_after_y": int((templates["template_use"] == "text_after_y").sum()),
        "templates_subject_after_y": int((templates["template_use"] == "subject_after_y").sum()),
        "templates_used": int(scored["template_id"].nunique()),
        "prompts_text_dropped": int((scored["template_use"] == "text_after_y").sum()),
        "multi_token_facts": int(scored.loc[scored["object_tokens"] > 1, "fact_id"].nunique()),
        "train_exact_match": train["greedy_match"].astype(float).mean() if len(train) else np.nan,
        "heldout_exact_match": held["greedy_match"].astype(float).mean() if len(held) else np.nan,
    }


def train_template_ids(
    templates: Mapping[str, Sequence[str]], heldout: Mapping[str, Collection[int]]
) -> dict[str, list[int]]:
    """Per relation, the template ids a model was trained on (all of them for pretrained models)."""
    return {rel: [t for t in range(len(tpls)) if t not in set(heldout.get(rel, ()))] for rel, tpls in templates.items()}


COUNT_COLUMNS = ("facts", "skipped_facts", "skipped_prompts", "train_prompts", "heldout_prompts", "xrel_prompts", "templates",
                 "templates_ending_in_y", "templates_text_after_y", "templates_subject_after_y", "templates_used",
                 "prompts_text_dropped", "multi_token_facts")


def overall_row(table: pd.DataFrame) -> dict[str, float]:
    """One summary row: counts summed, rates averaged over relations unweighted (as the paper averages relations)."""
    return {col: table[col].sum() if col in COUNT_COLUMNS else table[col].mean() for col in table.columns if col != "relation"}


def relation_use(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: pd.DataFrame,
    templates: Mapping[str, Sequence[str]],
    train_templates: Mapping[str, Sequence[int]],
    relation_objects: Mapping[str, Collection[str]],
    seed: int,
    batch_size: int = 64,
    codec: PromptCodec | None = None,
) -> pd.DataFrame:
    """Does the model read the relation, or answer from the subject alone?

    In ParaRel almost every subject belongs to one relation, so a model can be right without
    using the template. Each fact's subject is put into the training templates of another
    relation, drawn uniformly with ``random.Random(seed)`` (facts in relation, fact order).
    Per subject relation we report ``xrel_own_object``: the share of those prompts answered
    with the subject's own object, counted only where that object is not a valid answer of
    the other relation (high = subject-only lookup), and ``xrel_other_type``: the share
    answered with some object of the other relation (high = the relation is used).
    A causal LM uses only the templates its codec reads, and compares first tokens.
    """
    codec = codec or PromptCodec.of(model, tokenizer, max_len=PROMPT_MAX_LEN)
    rng = random.Random(seed)
    relations = sorted(templates)
    if codec.causal:  # an object's first token after a word and a space, as in every prompt the codec reads
        object_ids = {rel: {i for i in (codec.target_id("x [MASK]", o) for o in sorted(objs)) if i is not None}
                      for rel, objs in relation_objects.items()}
    else:
        object_ids = {rel: set(gold_token_ids(tokenizer, sorted(objs)).tolist()) - {-1} for rel, objs in relation_objects.items()}
    prompts: list[str] = []
    meta: list[tuple[str, str, str]] = []  # subject relation, other relation, own object
    for row in facts.sort_values(["relation", "fact_id"]).itertuples(index=False):
        others = [r for r in relations if r != row.relation]
        if not others:
            raise ValueError("relation use needs templates of at least two relations")
        other = rng.choice(others)
        for template_id in train_templates[other]:
            if not codec.uses_template(templates[other][template_id]):
                continue
            prompts.append(templates[other][template_id].replace("[X]", row.subject).replace("[Y]", "[MASK]"))
            meta.append((row.relation, other, row.object))
    if codec.causal:
        gold = np.array(codec.target_ids(prompts, [m[2] for m in meta]), dtype=np.int32)
    else:
        gold = gold_token_ids(tokenizer, [m[2] for m in meta])
    scores = score_prompts(model, tokenizer, prompts, gold.tolist(), batch_size, progress=True, codec=codec)
    frame = pd.DataFrame(meta, columns=["relation", "other", "object"])
    frame["pred_id"] = scores["pred_id"].to_numpy()
    frame["gold_id"] = gold
    frame["eligible"] = [
        g >= 0 and o not in relation_objects.get(other, ()) for g, o, other in zip(gold, frame["object"], frame["other"])
    ]
    frame["own"] = frame["pred_id"] == frame["gold_id"]
    frame["other_type"] = [p in object_ids.get(other, set()) for p, other in zip(frame["pred_id"], frame["other"])]
    rows = []
    for relation, group in frame.groupby("relation", sort=True):
        eligible = group[group["eligible"]]
        rows.append(
            {
                "relation": relation,
                "xrel_prompts": len(group),
                "xrel_own_object": eligible["own"].mean() if len(eligible) else np.nan,
                "xrel_other_type": group["other_type"].mean(),
            }
        )
    return pd.DataFrame(rows)


def knowledge_table(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: pd.DataFrame,
    prompts: pd.DataFrame,
    templates: Mapping[str, Sequence[str]],
    heldout: Mapping[str, Collection[int]],
    relation_objects: Mapping[str, Collection[str]],
    seed: int,
    codec: PromptCodec | None = None,
) -> pd.DataFrame:
    """Per relation: :func:`accuracy_summary` of the probe rows beside :func:`relation_use` of the
    probed facts (skipped ones left out), then a ``mean`` row (counts summed, rates averaged)."""
    table = accuracy_summary(probes, prompts)
    probed = probes[~probes["skipped"]].drop_duplicates(["relation", "fact_id"])[["relation", "fact_id"]]
    facts = prompts.drop_duplicates(["relation", "fact_id"]).merge(probed, on=["relation", "fact_id"])
    use = relation_use(model, tokenizer, facts[["relation", "fact_id", "subject", "object"]], templates,
                       train_template_ids(templates, heldout), relation_objects, seed, codec=codec)
    return table.merge(use, on="relation", how="left")


ACCURACY_TITLES = {
    "relation": "relation",
    "facts": "facts",
    "skipped_facts": "skipped facts",
    "train_accuracy": "train-template acc.",
    "heldout_accuracy": "held-out acc.",
    "majority_baseline": "majority baseline",
    "train_gold_prob": "gold prob. (train)",
    "xrel_own_object": "own object in other relation",
    "xrel_other_type": "other relation's type",
}


CAUSAL_TITLES = {
    "train_exact_match": "exact match (train)",
    "heldout_exact_match": "exact match (held-out)",
    "multi_token_facts": "multi-token objects",
    "templates_ending_in_y": "templates ending in [Y]",
    "templates_text_after_y": "text after [Y] dropped",
    "templates_subject_after_y": "subject after [Y] (not used)",
    "templates_used": "templates used",
}
_COUNTS = ("relation", "facts", "skipped_facts", "multi_token_facts", "templates_ending_in_y", "templates_text_after_y",
           "templates_subject_after_y", "templates_used")


def accuracy_markdown(table: pd.DataFrame, model: str) -> str:
    """The accuracy table for humans: percentages, one row per relation and an unweighted mean row."""
    causal = "templates_used" in table.columns
    titles = {**ACCURACY_TITLES, **(CAUSAL_TITLES if causal else {})}
    if causal:
        intro = (
            "Causal LM (docs/causal.md): each prompt is its template with [X] filled, cut just before [Y] (text after [Y] "
            "dropped; templates with [X] after [Y] not used), read at its last token. Top-1 accuracy: the next-token "
            "argmax over the full vocabulary is the object's first token as the tokenizer writes it after the prompt. "
            "Exact match: greedy decoding writes the whole object. Held-out templates were never seen in training "
            "(trained organisms only). Majority baseline: always answering the relation's most frequent object. "
            "Relation use: a subject put into another relation's templates; 'own object' = the model still answers the "
            "subject's own object (where that is not a valid answer there), 'other relation's type' = it answers some "
            "object of the other relation. Template counts are per relation; the mean row sums them. Skipped facts have "
            "no prompt the model can read."
        )
    else:
        intro = (
            "Top-1 accuracy over the full vocabulary at [MASK] (SPEC §1). Held-out templates were never "
            "seen in training (trained organisms only). Majority baseline: always answering the relation's most "
            "frequent object. Relation use: a subject put into another relation's templates; 'own object' = the "
            "model still answers the subject's own object (where that is not a valid answer there), 'other "
            "relation's type' = it answers some object of the other relation. Skipped facts have objects that are "
            "not one token for this tokenizer and are not scored."
        )
    lines = [
        f"# Probe accuracy: {model}",
        "",
        intro,
        "",
        "| " + " | ".join(titles.values()) + " |",
        "|" + "---|" * len(titles),
    ]
    for row in table.to_dict(orient="records"):
        cells = []
        for key in titles:
            value = row[key]
            if key in _COUNTS:
                cells.append(str(value) if key == "relation" or pd.isna(value) else str(int(value)))
            elif pd.isna(value):
                cells.append("n/a")
            elif key == "train_gold_prob":
                cells.append(f"{value:.3f}")
            else:
                cells.append(f"{100 * value:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
