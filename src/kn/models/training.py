"""Train the embedded model organisms from scratch: `kn-tiny` (a BERT masked LM) and `kn-tiny-gpt`
(a GPT-2 causal LM), each with its own word-level tokenizer.

No pretrained English LM is available offline, so the pipeline trains its own on ParaRel:
every fact is shown through its relation's templates, the object masked (kn-tiny) or as the
next token after the template cut just before [Y] (kn-tiny-gpt; templates whose [X] comes
after [Y] are not used, docs/causal.md). The tokenizers keep every object label a single
token, so the paper's gold-id lookup (SPEC §1: the whole object string is one vocabulary
entry) applies unchanged, and both organisms are studied on the same targets. Some templates
per relation are held out of training to measure whether a fact is known across paraphrases
rather than memorised per template.
"""

from __future__ import annotations

import json
import logging
import random
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordLevel, WordPiece
from torch.nn import functional as F
from tqdm import tqdm
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from kn.models.adapters import adapter_for
from kn.models.encoding import EncodedPrompts, PromptCodec, encode_prompts, pad_sequences
from kn.models.forward import score_targets
from kn.schema import TrainConfig

log = logging.getLogger("kn.training")

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CAUSAL_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # kn-tiny-gpt: <s> starts every text (BOS)
MAX_POSITIONS = 512  # the web-sentence stages (SPEC §6) encode up to 512 pieces
IGNORE = -100


def choose_heldout_templates(
    template_counts: Mapping[str, int], per_relation: int, min_templates: int, seed: int,
    template_ids: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, list[int]]:
    """Template ids held out of training, per relation (sorted; empty below ``min_templates``).

    The draw is seeded per relation (string seeds hash deterministically in CPython), so
    adding or removing a relation never changes another relation's held-out templates.
    At least one template per relation always stays in training. ``template_ids``: draw
    among these ids (a causal organism's usable templates) instead of 0..count-1.
    """
    heldout: dict[str, list[int]] = {}
    for relation in sorted(template_counts):
        n_templates = template_counts[relation]
        if n_templates < min_templates or per_relation <= 0:
            heldout[relation] = []
            continue
        rng = random.Random(f"kn-heldout:{seed}:{relation}")
        population = range(n_templates) if template_ids is None else sorted(int(t) for t in template_ids[relation])
        heldout[relation] = sorted(rng.sample(population, min(per_relation, n_templates - 1)))
    return heldout


def mark_heldout(prompts: pd.DataFrame, heldout: Mapping[str, Sequence[int]]) -> pd.Series:
    """Boolean per prompt row: is its template held out of training?"""
    pairs = {(rel, int(t)) for rel, ids in heldout.items() for t in ids}
    return pd.Series(
        [(rel, int(t)) in pairs for rel, t in zip(prompts["relation"], prompts["template_id"])],
        index=prompts.index,
        dtype=bool,
    )


def filled_sentences(prompts: pd.DataFrame) -> list[str]:
    """Prompts with the object written in place of [MASK]: the tokenizer's training text."""
    return [p.replace("[MASK]", o) for p, o in zip(prompts["prompt"], prompts["object"])]


def word_vocabulary(sentences: Iterable[str], objects: Iterable[str], vocab_size: int,
                    special_tokens: Sequence[str] = SPECIAL_TOKENS) -> dict[str, int]:
    """The organisms' vocabulary: special tokens, the ``vocab_size`` most frequent words of ``sentences``
    (BERT normalisation and pre-tokenisation, cased; ties in lexicographic order), every character as
    ``c`` and ``##c``, then every object label, sorted."""
    sentences = list(sentences)
    objects = sorted(set(objects))
    backend = Tokenizer(WordLevel(unk_token=special_tokens[1]))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=list(special_tokens), show_progress=False
    )
    backend.train_from_iterator(sentences, trainer)
    learned = sorted(backend.get_vocab().items(), key=lambda item: item[1])
    vocab = {token: index for index, (token, _) in enumerate(learned)}
    characters = set(string.ascii_letters + string.digits + string.punctuation)
    characters.update(c for text in [*sentences, *objects] for c in text if not c.isspace())
    for token in [*sorted(characters), *(f"##{c}" for c in sorted(characters)), *objects]:
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def train_wordpiece_tokenizer(sentences: Iterable[str], objects: Iterable[str], vocab_size: int) -> BertTokenizerFast:
    """A cased WordPiece tokenizer for ``sentences``, with every object label one whole-word entry.

    Normalisation and pre-tokenisation are BERT's (cased, accents kept). The word vocabulary is
    learned with the ``tokenizers`` WordLevel trainer (the ``vocab_size`` most frequent words,
    ties in lexicographic order). Deviation from a learned multi-character WordPiece vocabulary:
    the ``tokenizers`` WordPiece trainer breaks ties in hash order, so it learns a different
    vocabulary in every process, which would break determinism under the seed. Words outside
    the vocabulary are split into single characters (``c`` + ``##c`` pieces, all present),
    so they never become [UNK]. Objects are appended after the learned words, sorted.
    """
    vocab = word_vocabulary(sentences, objects, vocab_size)
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=False, strip_accents=False)
    tokenizer.model_max_length = MAX_POSITIONS
    return tokenizer


def train_causal_tokenizer(sentences: Iterable[str], objects: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """kn-tiny-gpt's tokenizer: kn-tiny's vocabulary idea (whole words, character pieces, every object one
    token) with causal special tokens, and ``<s>`` (BOS) put before every text.

    Words are split at whitespace and punctuation, so an object after a prompt is always its own
    token: the causal target (the object's first token after the prompt) is the whole object, as
    the masked organism's [MASK] target is.
    """
    vocab = word_vocabulary(sentences, objects, vocab_size, CAUSAL_SPECIAL_TOKENS)
    pad, unk, bos, eos = CAUSAL_SPECIAL_TOKENS
    backend = Tokenizer(WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad)
    tokenizer.model_max_length = MAX_POSITIONS
    return tokenizer


@dataclass
class EncodedExamples:
    """Training prompts as token ids with the object's position and gold id."""

    input_ids: list[list[int]]
    mask_positions: list[int]
    object_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, rows: Sequence[int]) -> "EncodedExamples":
        return EncodedExamples(
            [self.input_ids[i] for i in rows], [self.mask_positions[i] for i in rows], [self.object_ids[i] for i in rows]
        )


def encode_examples(tokenizer: PreTrainedTokenizerBase, prompts: pd.DataFrame, codec: PromptCodec | None = None) -> EncodedExamples:
    """Encode prompt rows; every object must be a single vocabulary entry (guaranteed by the tokenizer).

    A causal ``codec``: the prompt cut before [Y], the object as the next token (its first token
    after the prompt, which the organism's tokenizer makes the whole object).
    """
    vocab = tokenizer.get_vocab()
    missing = sorted({o for o in prompts["object"] if o not in vocab})
    if missing:
        raise ValueError(f"objects not in the tokenizer vocabulary: {missing[:5]} ({len(missing)} in all)")
    if codec is not None and codec.causal:
        encoded = codec.encode(list(prompts["prompt"]))
        targets = codec.target_ids(list(prompts["prompt"]), list(prompts["object"]))
        wrong = [(o, t) for o, t in zip(prompts["object"], targets) if t != vocab[o]]
        if wrong:
            raise ValueError(f"objects not one token after their prompts: {sorted(set(o for o, _ in wrong))[:5]}")
        return EncodedExamples(encoded.input_ids, encoded.mask_positions, targets)
    encoded = encode_prompts(tokenizer, list(prompts["prompt"]))
    return EncodedExamples(encoded.input_ids, encoded.mask_positions, [vocab[o] for o in prompts["object"]])


@dataclass
class NaturalText:
    """Bing web sentences a natural-text recipe reads, and the sentences it must never train on."""

    train: list[str]  # distinct sentences of the training facts, none equal to a held-out sentence
    heldout: list[str]  # distinct sentences of the evaluation facts (masked-token accuracy)
    studied_facts: int  # the first this-many facts of every relation: their sentences are excluded
    train_facts: int  # facts whose sentences train
    heldout_facts: int  # facts drawn (seeded) for evaluation


def split_natural(sentences: pd.DataFrame, studied_facts: int, max_facts: int | None, eval_facts: int,
                  seed: int) -> NaturalText:
    """Which Bing sentences (kn.data.bing's table) train and which evaluate.

    Only facts ``studied_facts <= fact_id < max_facts`` of each relation are read (the organism's own
    facts that the study does not use): the studied facts' head+tail and head-only sentences (the
    §6 study's T1 and T2) never train. ``eval_facts`` of those facts, a seeded draw, are held out to
    score masked-token accuracy on unseen natural text. A sentence text that also belongs to a studied
    or held-out fact (the corpus repeats sentences across facts) is dropped from training.
    """
    if eval_facts < 1:
        raise ValueError(f"model.train.natural_eval_facts = {eval_facts}; expected >= 1")
    fact_id = sentences["fact_id"].to_numpy()
    readable = (fact_id >= studied_facts) & (True if max_facts is None else fact_id < max_facts)
    facts = sorted(set(zip(sentences.loc[readable, "relation"].astype(str), fact_id[readable].tolist())))
    if len(facts) <= eval_facts:
        raise ValueError(f"{len(facts)} non-studied facts have web sentences; model.train.natural_eval_facts = "
                         f"{eval_facts} must leave some for training")
    held = set(random.Random(f"kn-natural:{seed}").sample(facts, eval_facts))
    keys = list(zip(sentences["relation"].astype(str), fact_id.tolist()))
    is_held = np.array([key in held for key in keys])
    texts = sentences["sentence"].astype(str).tolist()
    excluded = {t for t, studied, h in zip(texts, fact_id < studied_facts, is_held) if studied or h}
    train = list(dict.fromkeys(t for t, ok, h in zip(texts, readable, is_held) if ok and not h and t not in excluded))
    heldout = list(dict.fromkeys(t for t, h in zip(texts, is_held) if h))
    return NaturalText(train, heldout, studied_facts, len(facts) - eval_facts, eval_facts)


def encode_natural(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Natural sentences as token ids ([CLS] ... [SEP]), cut to ``max_tokens`` pieces."""
    return tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]


def vocabulary_coverage(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> dict[str, float]:
    """How a tokenizer reads ``texts``: the share of [UNK] pieces, and of words (BERT pre-tokenisation)
    that are not one vocabulary entry (split into pieces)."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    vocab = tokenizer.get_vocab()
    pieces = [piece for text in texts for piece in tokenizer.tokenize(text)]
    words = [word for text in texts for word, _ in pre.pre_tokenize_str(text)]
    return {"unk_piece_share": sum(p == tokenizer.unk_token for p in pieces) / max(1, len(pieces)),
            "split_word_share": sum(w not in vocab for w in words) / max(1, len(words))}


def study_coverage(tokenizer: PreTrainedTokenizerBase, sentences: pd.DataFrame, studied_facts: int, seed: int,
                   pool_sample: int = 2000) -> dict[str, dict[str, float]]:
    """:func:`vocabulary_coverage` of the §6 study's sentence kinds: T1 (head+tail) and T2 (head-only)
    sentences of the studied facts, T3 a seeded sample of ``pool_sample`` sentences of the whole pool."""
    studied = sentences[sentences["fact_id"] < studied_facts]
    pool = sentences["sentence"].astype(str).tolist()
    sample = random.Random(f"kn-coverage:{seed}").sample(pool, min(pool_sample, len(pool)))
    return {"T1": vocabulary_coverage(tokenizer, studied.loc[studied["kind"] == "th", "sentence"].astype(str).tolist()),
            "T2": vocabulary_coverage(tokenizer, studied.loc[studied["kind"] == "h", "sentence"].astype(str).tolist()),
            "T3": vocabulary_coverage(tokenizer, sample)}


# Every recipe's held-out masked-token accuracy is scored alike, whatever it trained with: BERT's masking
# rate, sentences cut at 64 pieces.
EVAL_MASK_PROB = 0.15
EVAL_MAX_TOKENS = 64


def masked_token_accuracy(model: PreTrainedModel, heldout: Sequence[Sequence[int]], train: Sequence[Sequence[int]],
                          prob: float, mask_id: int, special_ids: Sequence[int], seed: int,
                          batch_size: int = 64) -> dict[str, float]:
    """Top-1 accuracy at ``prob`` of the non-special pieces of ``heldout`` sentences, each replaced by [MASK]
    (seeded), the unigram-frequency baseline (always answering the most frequent piece of ``train``) and the
    masked pieces' perplexity, exp(mean NLL) (natural text's counterpart of the templates' PPL)."""
    specials = set(int(i) for i in special_ids)
    counts = np.bincount([t for seq in train for t in seq if t not in specials], minlength=model.config.vocab_size)
    mode = int(counts.argmax())
    generator = torch.Generator().manual_seed(seed)
    head = adapter_for(model).lm_head()
    was_training = model.training
    model.eval()
    special_tensor = torch.tensor(sorted(specials))
    correct = unigram = total = 0
    nll = 0.0
    for start in range(0, len(heldout), batch_size):
        ids, attention = pad_sequences([list(seq) for seq in heldout[start : start + batch_size]],
                                       int(model.config.pad_token_id))
        chosen = (torch.rand(ids.shape, generator=generator) < prob) & attention.bool()
        chosen &= ~torch.isin(ids, special_tensor)
        if not chosen.any():
            continue
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids.masked_fill(chosen, mask_id), attention_mask=attention).last_hidden_state
            logits = head(hidden[chosen])
        gold = ids[chosen]
        predicted = logits.argmax(-1)
        nll += float(F.cross_entropy(logits, gold, reduction="sum"))
        correct += int((predicted == gold).sum())
        unigram += int((gold == mode).sum())
        total += int(chosen.sum())
    model.train(was_training)
    return {"masked_accuracy": correct / max(1, total), "unigram_baseline": unigram / max(1, total),
            "masked_perplexity": float(np.exp(nll / total)) if total else float("nan"), "masked_tokens": total}


def build_model(recipe: TrainConfig, vocab_size: int, pad_id: int, bos_id: int | None = None,
                eos_id: int | None = None) -> PreTrainedModel:
    """A randomly initialised BERT masked LM, or GPT-2 causal LM (``recipe.architecture``), seeded by ``recipe.seed``.

    GPT-2 keeps its usual layout: pre-LN blocks, learned positions, GELU (tanh approximation),
    unembedding tied to the input embeddings.

    BERT's recipe options decide where a fact can be stored (docs/organism_search.md):
    ``tie_word_embeddings=False`` gives the MLM output layer its own matrix;
    ``freeze_word_embeddings`` keeps the token embeddings at their random init (tied, the output
    layer too), so a subject's embedding cannot learn to carry its object;
    ``word_embedding_std`` redraws the token embeddings from N(0, std^2) (BERT's init: std 0.02)
    with their own seeded generator after every other parameter is initialised, [PAD] row 0 (with
    frozen tied embeddings their scale bounds the logits); ``freeze_mlm_transform`` keeps the MLM
    head's dense transform at its random init, so this hidden-to-hidden layer at [MASK], outside
    every FFN intervention, cannot store facts either (its LayerNorm and the output bias still train);
    ``mlm_transform_init=identity`` starts that transform as the identity, so a token's embedding added
    at [MASK] reads out as that token (the paper's update writes embeddings into value slots).
    """
    if recipe.architecture == "gpt2":
        bert_only = {"tie_word_embeddings": not recipe.tie_word_embeddings,
                     "freeze_word_embeddings": recipe.freeze_word_embeddings,
                     "word_embedding_std": recipe.word_embedding_std is not None,
                     "freeze_mlm_transform": recipe.freeze_mlm_transform,
                     "mlm_transform_init": recipe.mlm_transform_init != "random",
                     "natural_ratio": recipe.natural_ratio > 0}
        if any(bert_only.values()):
            raise ValueError(f"model.train.{next(k for k, v in bert_only.items() if v)} is a BERT recipe option; the "
                             "gpt2 organism keeps true / false / null / false / random / 0")
        gpt = GPT2Config(
            vocab_size=vocab_size, n_embd=recipe.hidden_size, n_layer=recipe.num_layers, n_head=recipe.num_heads,
            n_inner=recipe.intermediate_size, n_positions=MAX_POSITIONS, resid_pdrop=recipe.dropout,
            embd_pdrop=recipe.dropout, attn_pdrop=recipe.dropout, bos_token_id=bos_id, eos_token_id=eos_id,
            pad_token_id=pad_id, tie_word_embeddings=True,
        )
        torch.manual_seed(recipe.seed)
        return GPT2LMHeadModel(gpt)
    if recipe.architecture != "bert":
        raise ValueError(f"model.train.architecture = {recipe.architecture!r}; expected 'bert' or 'gpt2'")
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        intermediate_size=recipe.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=recipe.dropout,
        attention_probs_dropout_prob=recipe.dropout,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=pad_id,
        tie_word_embeddings=recipe.tie_word_embeddings,
    )
    torch.manual_seed(recipe.seed)
    model = BertForMaskedLM(config)
    if recipe.word_embedding_std is not None:
        weight = model.get_input_embeddings().weight
        generator = torch.Generator().manual_seed(recipe.seed + 2_000_003)
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=generator) * recipe.word_embedding_std)
            weight[pad_id] = 0.0
    if recipe.mlm_transform_init == "identity":
        dense = model.cls.predictions.transform.dense
        with torch.no_grad():
            dense.weight.copy_(torch.eye(recipe.hidden_size))
            dense.bias.zero_()
    elif recipe.mlm_transform_init != "random":
        raise ValueError(f"model.train.mlm_transform_init = {recipe.mlm_transform_init!r}; expected 'random' or 'identity'")
    if recipe.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if recipe.freeze_mlm_transform:
        model.cls.predictions.transform.dense.requires_grad_(False)
    return model


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length inside pools of 32 batches (little padding)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        block = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def mask_other_tokens(
    ids: torch.Tensor,
    attention: torch.Tensor,
    mask_positions: torch.Tensor,
    prob: float,
    special_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's usual masking of the non-object tokens: pick ``prob`` of them; 80% [MASK], 10% random, 10% kept.

    Returns (corrupted ids, labels with IGNORE where no loss is taken). The object position
    is already [MASK] and is excluded here.
    """
    labels = torch.full_like(ids, IGNORE)
    if prob <= 0:
        return ids, labels
    candidates = attention.bool() & ~torch.isin(ids, special_ids)
    candidates[torch.arange(ids.shape[0]), mask_positions] = False
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & candidates
    labels[chosen] = ids[chosen]
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, generator=generator)
    corrupted = ids.clone()
    corrupted[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    corrupted[swap] = random_ids[swap]
    return corrupted, labels


def object_accuracy(model: PreTrainedModel, examples: EncodedExamples, batch_size: int = 256) -> float:
    """Top-1 accuracy at the object position (the [MASK], or the last prompt token of a causal LM) over the
    full vocabulary (eval mode, no other masking)."""
    was_training = model.training
    model.eval()
    encoded = EncodedPrompts(examples.input_ids, examples.mask_positions)
    scores = score_targets(model, encoded, examples.object_ids, batch_size=batch_size)
    model.train(was_training)
    return int((scores.pred == np.asarray(examples.object_ids)).sum()) / max(1, len(examples))


@dataclass
class TrainingHistory:
    """Per-step training loss, periodic evaluations, and why training stopped."""

    step_loss: list[float] = field(default_factory=list)
    pretrain_loss: list[float] = field(default_factory=list)  # web-only steps before the template phase
    evaluations: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str = ""
    steps: int = 0
    seconds: float = 0.0


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then linear decay to 0 at ``total`` steps (BERT's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class Optimiser:
    """AdamW with BERT's schedule (:func:`lr_factor`) and gradient clipping at norm 1: one per training phase."""

    def __init__(self, model: PreTrainedModel, lr: float, weight_decay: float, warmup: int, total: int) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, warmup, total))

    def step(self, loss: torch.Tensor) -> float:
        """Back-propagate ``loss``, clip, update, advance the schedule; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())


def train_masked_lm(
    model: PreTrainedModel,
    train: EncodedExamples,
    recipe: TrainConfig,
    pad_id: int,
    mask_id: int | None,
    special_ids: Sequence[int],
    evaluate: Callable[[PreTrainedModel], dict[str, float]],
    natural: Sequence[Sequence[int]] = (),
) -> TrainingHistory:
    """Train until ``recipe.max_steps`` or until ``evaluate(model)["train_accuracy"] >= recipe.target_accuracy``.

    The object position carries the main loss; other tokens add BERT's usual MLM loss at
    ``recipe.other_mask_prob``. Logits are computed only at labelled positions (the
    vocabulary projection dominates the cost otherwise). Stopping short of saturation is
    deliberate: a model trained to ~100% hides its knowledge neurons (the organism sweep measures it).
    A causal LM (kn-tiny-gpt) is trained the same way with the object as the next token after
    the last prompt token (its ``mask_positions``); ``other_mask_prob`` must then be 0.
    With ``recipe.natural_ratio`` > 0, each step also reads ``natural_ratio * batch_size`` of the
    ``natural`` sentences (token ids; shuffled each pass by their own seeded generator, so the template
    stream is today's) with BERT's masking at ``natural_mask_prob``; their loss is added.
    ``recipe.natural_pretrain_steps`` web-only steps (``batch_size`` sentences each) come first
    (:func:`pretrain_on_natural`): the model reads text before it learns facts, as a pretrained LM has.
    """
    adapter = adapter_for(model)
    n_natural = round(recipe.natural_ratio * recipe.batch_size)
    if n_natural > 0 and (not natural or mask_id is None):
        raise ValueError(f"model.train.natural_ratio = {recipe.natural_ratio} needs natural sentences and a masked LM")
    if recipe.natural_pretrain_steps > 0 and n_natural == 0:
        raise ValueError(f"model.train.natural_pretrain_steps = {recipe.natural_pretrain_steps} needs "
                         "model.train.natural_ratio > 0 (the template phase keeps reading the web text)")
    if adapter.causal and recipe.other_mask_prob > 0:
        raise ValueError("model.train.other_mask_prob must be 0 for a causal organism (it has no [MASK] to corrupt with)")
    head = adapter.lm_head()
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)  # dropout draws
    optimiser = Optimiser(model, recipe.lr, recipe.weight_decay, recipe.warmup_steps, recipe.max_steps)
    specials = torch.tensor(list(special_ids), dtype=torch.long)
    vocab_size = model.config.vocab_size
    lengths = [len(seq) for seq in train.input_ids]
    history = TrainingHistory()
    batches: list[list[int]] = []
    natural_generator = torch.Generator().manual_seed(recipe.seed + 1_000_003)
    natural_order: list[int] = []
    start_time = time.perf_counter()
    model.train()
    if recipe.natural_pretrain_steps > 0:
        history.pretrain_loss = pretrain_on_natural(model, head, natural, natural_order, recipe, specials, mask_id, pad_id,
                                                    natural_generator)
    progress = tqdm(total=recipe.max_steps, desc=f"train ({recipe.architecture})", unit="step", mininterval=5.0)
    for step in range(recipe.max_steps):
        if not batches:
            batches = length_grouped_batches(lengths, recipe.batch_size, generator)
        rows = batches.pop()
        ids, attention = pad_sequences([train.input_ids[i] for i in rows], pad_id)
        positions = torch.tensor([train.mask_positions[i] for i in rows])
        gold = torch.tensor([train.object_ids[i] for i in rows])
        ids, other_labels = mask_other_tokens(
            ids, attention, positions, recipe.other_mask_prob, specials, -1 if mask_id is None else mask_id, vocab_size,
            generator,
        )
        hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        loss = F.cross_entropy(head(hidden[torch.arange(len(rows)), positions]), gold)
        other = other_labels != IGNORE
        if other.any():
            loss = loss + F.cross_entropy(head(hidden[other]), other_labels[other])
        if n_natural > 0:
            loss = loss + natural_loss(model, head, natural, natural_order, n_natural, recipe.natural_mask_prob, specials,
                                       mask_id, pad_id, natural_generator)
        history.step_loss.append(optimiser.step(loss))
        history.steps = step + 1
        progress.update(1)
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.max_steps:
            scores = {"step": step + 1, "seconds": round(time.perf_counter() - start_time, 1), **evaluate(model)}
            history.evaluations.append(scores)
            progress.set_postfix(acc=f"{scores['train_accuracy']:.3f}")
            log.info("step %d: %s", step + 1, scores)
            if recipe.target_accuracy is not None and scores["train_accuracy"] >= recipe.target_accuracy:
                history.stop_reason = f"train_accuracy {scores['train_accuracy']:.4f} >= target {recipe.target_accuracy}"
                break
    else:
        history.stop_reason = f"max_steps {recipe.max_steps} reached"
    progress.close()
    history.seconds = time.perf_counter() - start_time
    model.eval()
    return history


def pretrain_on_natural(model: PreTrainedModel, head: Callable[[torch.Tensor], torch.Tensor],
                        natural: Sequence[Sequence[int]], order: list[int], recipe: TrainConfig, specials: torch.Tensor,
                        mask_id: int, pad_id: int, generator: torch.Generator) -> list[float]:
    """``recipe.natural_pretrain_steps`` masked-LM steps on ``batch_size`` natural sentences each, with their
    own AdamW and schedule (warmup, then linear decay to 0 at the last step; peak ``natural_pretrain_lr`` or
    ``lr``), so the template phase that follows starts its optimiser and schedule as a template-only recipe
    does. ``order`` and ``generator`` carry on into the template phase's natural stream. Returns the step losses."""
    steps = recipe.natural_pretrain_steps
    optimiser = Optimiser(model, recipe.natural_pretrain_lr or recipe.lr, recipe.weight_decay, recipe.warmup_steps, steps)
    losses: list[float] = []
    for _ in tqdm(range(steps), desc="pretrain (web text)", unit="step", mininterval=5.0):
        losses.append(optimiser.step(natural_loss(model, head, natural, order, recipe.batch_size, recipe.natural_mask_prob,
                                                  specials, mask_id, pad_id, generator)))
        if len(losses) % 100 == 0:
            log.info("pretrain step %d: loss (mean of the last 100) %.4f", len(losses), sum(losses[-100:]) / 100)
    return losses


def natural_loss(model: PreTrainedModel, head: Callable[[torch.Tensor], torch.Tensor], natural: Sequence[Sequence[int]],
                 order: list[int], count: int, prob: float, specials: torch.Tensor, mask_id: int, pad_id: int,
                 generator: torch.Generator) -> torch.Tensor:
    """BERT's masked-LM loss on the next ``count`` natural sentences of ``order`` (refilled with a fresh
    permutation when empty); zero when nothing was masked."""
    rows = []
    while len(rows) < count:
        if not order:
            order.extend(torch.randperm(len(natural), generator=generator).tolist())
        rows.append(order.pop())
    ids, attention = pad_sequences([list(natural[i]) for i in rows], pad_id)
    ids, labels = mask_other_tokens(ids, attention, torch.zeros(len(rows), dtype=torch.long), prob, specials, mask_id,
                                    model.config.vocab_size, generator)
    chosen = labels != IGNORE
    if not chosen.any():
        return torch.zeros(())
    hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
    return F.cross_entropy(head(hidden[chosen]), labels[chosen])


def evaluation_sample(n: int, size: int, seed: int) -> list[int]:
    """A fixed subset of rows for the periodic evaluation (the full set when ``size`` >= n)."""
    if size >= n:
        return list(range(n))
    return sorted(random.Random(f"kn-eval:{seed}").sample(range(n), size))


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied input/output embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def running_mean(losses: Sequence[float], window: int) -> list[float]:
    """Running mean of the step loss over ``window`` steps (for the loss curve)."""
    out: list[float] = []
    total = 0.0
    for i, value in enumerate(losses):
        total += value
        if i >= window:
            total -= losses[i - window]
        out.append(total / min(i + 1, window))
    return out


TRAINING_RECORD = "kn_training.json"  # in the saved model directory: held-out templates, recipe, data


@dataclass
class TrainedOrganism:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    heldout: dict[str, list[int]]
    history: TrainingHistory
    train_prompts: int
    heldout_prompts: int
    codec: PromptCodec | None = None  # how the organism reads prompts (set for both kinds)
    natural: NaturalText | None = None  # the web sentences a natural-text recipe read and held out
    natural_scores: dict[str, float] = field(default_factory=dict)  # masked-token accuracy, baseline, coverage


def train_organism(prompts: pd.DataFrame, vocabulary_objects: Iterable[str], recipe: TrainConfig,
                   templates_ending_in_y: bool = False, sentences: pd.DataFrame | None = None,
                   studied_facts: int | None = None) -> TrainedOrganism:
    """Tokenizer + LM from ingested ParaRel prompt rows (all templates of every fact).

    The tokenizer is trained on every prompt with its object filled in, held-out templates
    included (vocabulary only: the model never trains on those sequences), and gets every
    label in ``vocabulary_objects`` as a whole-word entry, so any ParaRel fact can be probed.
    A causal organism (``recipe.architecture`` gpt2) trains and holds out only the templates a
    causal LM reads (those whose [X] comes before [Y]; with ``templates_ending_in_y`` only those
    ending in [Y]), each cut before [Y] with the object as the next token.
    With ``recipe.natural_ratio`` > 0, ``sentences`` (kn.data.bing's table) supplies web sentences
    (:func:`split_natural`: never those of the first ``studied_facts`` facts of a relation); the
    vocabulary is then learned from the filled prompts and the training sentences together.
    """
    natural = None
    if recipe.natural_ratio > 0:
        if recipe.architecture != "bert" or sentences is None or studied_facts is None:
            raise ValueError("model.train.natural_ratio > 0 needs a bert organism, the Bing sentences and the studied "
                             "fact count (study.facts_per_relation)")
        max_facts = int(prompts["fact_id"].max()) + 1
        natural = split_natural(sentences, studied_facts, max_facts, recipe.natural_eval_facts, recipe.seed)
    causal = recipe.architecture == "gpt2"
    if causal:
        tokenizer = train_causal_tokenizer(filled_sentences(prompts), vocabulary_objects, recipe.vocab_size)
        codec = PromptCodec(tokenizer, causal=True, templates_ending_in_y=templates_ending_in_y)
        prompts = codec.usable_rows(prompts)
        ids = prompts.groupby("relation")["template_id"].unique().to_dict()
        heldout = choose_heldout_templates({r: len(t) for r, t in ids.items()}, recipe.heldout_templates,
                                           recipe.heldout_min_templates, recipe.seed, template_ids=ids)
    else:
        counts = prompts.groupby("relation")["template_id"].nunique().to_dict()
        heldout = choose_heldout_templates(counts, recipe.heldout_templates, recipe.heldout_min_templates, recipe.seed)
        text = filled_sentences(prompts) + (natural.train if natural else [])
        tokenizer = train_wordpiece_tokenizer(text, vocabulary_objects, recipe.vocab_size)
        codec = PromptCodec(tokenizer, causal=False)
    is_heldout = mark_heldout(prompts, heldout)
    train = encode_examples(tokenizer, prompts[~is_heldout], codec)
    held = encode_examples(tokenizer, prompts[is_heldout], codec)
    log.info("vocabulary %d, %d training prompts, %d held-out prompts", len(tokenizer.get_vocab()), len(train), len(held))
    pad_id = int(tokenizer.pad_token_id)
    mask_id = None if causal else int(tokenizer.mask_token_id)
    model = build_model(recipe, len(tokenizer.get_vocab()), pad_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    train_sample = train.subset(evaluation_sample(len(train), recipe.eval_sample, recipe.seed))
    held_sample = held.subset(evaluation_sample(len(held), recipe.eval_sample, recipe.seed))

    def evaluate(current: PreTrainedModel) -> dict[str, float]:
        scores = {"train_accuracy": object_accuracy(current, train_sample)}
        if len(held_sample):
            scores["heldout_accuracy"] = object_accuracy(current, held_sample)
        return scores

    natural_ids = encode_natural(tokenizer, natural.train, recipe.natural_max_tokens) if natural else []
    history = train_masked_lm(model, train, recipe, pad_id, mask_id, tokenizer.all_special_ids, evaluate, natural_ids)
    organism = TrainedOrganism(model, tokenizer, heldout, history, len(train), len(held), codec, natural)
    if natural is not None and mask_id is not None:
        heldout_ids = encode_natural(tokenizer, natural.heldout, EVAL_MAX_TOKENS)
        organism.natural_scores = masked_token_accuracy(model, heldout_ids, natural_ids, EVAL_MASK_PROB, mask_id,
                                                        tokenizer.all_special_ids, recipe.seed)
    return organism


def read_heldout_templates(model_spec: str | Path) -> dict[str, list[int]]:
    """Held-out template ids recorded by ``train_model``; empty for any other (pretrained) model."""
    record_path = Path(model_spec) / TRAINING_RECORD
    if not record_path.is_file():
        return {}
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        heldout = record["heldout_templates"]
        return {str(rel): [int(t) for t in ids] for rel, ids in heldout.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"{record_path}: cannot read 'heldout_templates' ({exc}); expected {{relation: [template ids]}}"
        ) from exc


def _pct(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{100 * value:.1f}%"


def natural_card_lines(organism: TrainedOrganism, data: dict) -> list[str]:
    """The model card's lines on the web sentences a natural-text recipe read (none for a template-only one)."""
    natural = organism.natural
    if natural is None:
        return []
    scores, coverage = organism.natural_scores, data.get("study_coverage", {})
    lines = [
        f"- Web sentences (Bing, `resources/bing_distant`): {len(natural.train)} distinct sentences of {natural.train_facts} "
        f"facts trained (facts {natural.studied_facts} onwards of each relation, minus the evaluation facts); the "
        f"sentences of the first {natural.studied_facts} facts of every relation (the studied facts) never trained, "
        "nor any sentence text they share. The vocabulary was learned from the filled prompts and these sentences.",
        f"- Held out: {len(natural.heldout)} sentences of {natural.heldout_facts} other facts (seeded draw): masked-token "
        f"accuracy **{_pct(scores['masked_accuracy'])}** on {scores['masked_tokens']} masked pieces; unigram-frequency "
        f"baseline {_pct(scores['unigram_baseline'])}; masked-piece perplexity {scores['masked_perplexity']:.1f}.",
    ]
    if coverage:
        lines.append("- Unknown pieces in the studied facts' web sentences: " + ", ".join(
            f"{kind} {_pct(c['unk_piece_share'])} ([UNK]), {_pct(c['split_word_share'])} of words split into pieces"
            for kind, c in coverage.items()) + " (T3: a seeded sample of 2,000 pool sentences).")
    return lines


def model_card(model_name: str, recipe_yaml: str, recipe: TrainConfig, resources_dir: str, max_facts: int | None,
               organism: TrainedOrganism, table: pd.DataFrame, overall: dict, data: dict, loss_png: str) -> str:
    """The organism's model card: data, recipe, training, what it knows (overall and per relation)."""
    recipe_text = recipe_yaml.strip()
    history = organism.history
    heldout = ", ".join(f"{rel}: {ids}" for rel, ids in organism.heldout.items() if ids)
    if recipe.architecture == "gpt2":
        what = ("A GPT-2 causal language model trained from scratch by the `train_model` rule on ParaRel (LAMA "
                "T-REx facts written through each relation's paraphrase templates, each cut just before [Y], the object "
                "as the next token; templates whose subject comes after [Y] are not used, docs/causal.md). It is the "
                "pipeline's embedded causal model organism: no pretrained English LM is available offline. ")
        tokenizer_text = (f"- Tokenizer: kn-tiny's word-level vocabulary idea (whole words of the filled prompts, "
                          f"character pieces, then the object labels) with `<s>` before every text; vocabulary "
                          f"{len(organism.tokenizer.get_vocab())} entries, every one of the {data['vocabulary_objects']} "
                          "ParaRel object labels a single token (so the first token after a prompt is the whole object).")
    else:
        what = ("A BERT masked language model trained from scratch by the `train_model` rule on ParaRel "
                "(LAMA T-REx facts written through each relation's paraphrase templates, object masked). It is the "
                "pipeline's embedded model organism: no pretrained English masked LM is available offline. ")
        tokenizer_text = (f"- Tokenizer: cased WordPiece trained with `tokenizers` on the filled prompts; vocabulary "
                          f"{len(organism.tokenizer.get_vocab())} entries, every one of the {data['vocabulary_objects']} "
                          "ParaRel object labels a single token.")
    lines = [
        f"# Model card: {model_name}",
        "",
        what + "It knows only these facts and this template language; it is a test subject for knowledge-neuron "
        "methods, not a general language model.",
        "",
        "## Data",
        "",
        f"- Resources: `{resources_dir}`; all {data['relations']} relations, first "
        f"{max_facts} facts each: {data['facts']} facts, {data['distinct_objects']} distinct objects.",
        f"- Training prompts: {organism.train_prompts}; held-out-template prompts: {organism.heldout_prompts}.",
        f"- Held-out templates (relations with >= {recipe.heldout_min_templates} templates, "
        f"{recipe.heldout_templates} each, seeded draw): {heldout or 'none'}.",
        tokenizer_text,
        *natural_card_lines(organism, data),
        "",
        "## Recipe",
        "",
        f"Seed {recipe.seed} (`model.train.seed`); every key below is a Hydra override `model.train.<key>=...`.",
        "",
        "```yaml",
        recipe_text,
        "```",
        "",
        "## Training",
        "",
        f"- Parameters: {data['parameters']:,} (tied input/output embeddings counted once).",
        *([f"- Web-text pretraining: {len(history.pretrain_loss)} masked-LM steps on web sentences only, "
           f"final running-mean loss (50 steps) {running_mean(history.pretrain_loss, 50)[-1]:.3f}; then the template "
           "phase below."] if history.pretrain_loss else []),
        f"- Steps: {history.steps}; stopped because {history.stop_reason}.",
        f"- Wall time: {history.seconds / 60:.1f} min on {data['threads']} CPU thread(s) "
        "(shared machine: timing depends on load).",
        f"- Final running-mean loss (50 steps): {running_mean(history.step_loss, 50)[-1]:.3f}.",
        f"- Loss curve: [{loss_png}]({loss_png})",
        "",
        "## What it knows",
        "",
        f"- Top-1 accuracy on training-template prompts: **{_pct(overall['train_accuracy'])}** (mean over "
        f"{data['relations']} relations, unweighted; {_pct(overall['train_accuracy_pooled'])} pooled over prompts); "
        f"majority-object baseline {_pct(overall['majority_baseline'])}.",
        f"- On held-out templates: **{_pct(overall['heldout_accuracy'])}** (mean over the "
        f"{int((table['heldout_prompts'] > 0).sum())} relations with one; {_pct(overall['heldout_accuracy_pooled'])} pooled); "
        f"majority-object baseline over the same relations {_pct(overall['majority_baseline_heldout_relations'])}.",
        f"- Mean gold probability: {overall['train_gold_prob']:.3f} (training templates), "
        f"{overall['heldout_gold_prob']:.3f} (held-out templates).",
        f"- Relation use: with a subject put into another relation's templates, the model answers the subject's own "
        f"object in {_pct(overall['xrel_own_object'])} of prompts (where that object is not a valid answer there; "
        f"high = answers from the subject alone) and an object of the other relation in {_pct(overall['xrel_other_type'])} "
        "(high = reads the relation).",
        "",
        "## Per relation",
        "",
        "| relation | facts | train acc. | held-out acc. | majority | gold prob. | own object in other relation | other relation's type |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.relation} | {row.facts} | {_pct(row.train_accuracy)} | {_pct(row.heldout_accuracy)} | "
            f"{_pct(row.majority_baseline)} | {row.train_gold_prob:.3f} | {_pct(row.xrel_own_object)} | "
            f"{_pct(row.xrel_other_type)} |"
        )
    return "\n".join(lines) + "\n"


def overall_knowledge(table: pd.DataFrame) -> dict[str, float]:
    """The model card's headline numbers from the per-relation knowledge table (kn.probe.knowledge_table):
    unweighted means over relations, prompt-pooled accuracies, and the majority baseline over
    the relations that have held-out templates."""
    from kn.probe import overall_row

    overall = {key: float(value) for key, value in overall_row(table).items()}
    with_heldout = table["heldout_prompts"] > 0
    overall["majority_baseline_heldout_relations"] = float(table.loc[with_heldout, "majority_baseline"].mean())
    for split in ("train", "heldout"):  # prompt-weighted, next to the unweighted relation means
        weights = table[f"{split}_prompts"]
        overall[f"{split}_accuracy_pooled"] = float((table[f"{split}_accuracy"].fillna(0) * weights).sum() / weights.sum())
    return overall
