"""Natural-text recipes and the embedding readout, at a size that runs in seconds: held-out facts'
web sentences never train, the vocabulary and the weights are deterministic, and an identity head
transform reads a token's embedding as that token."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from kn.data.bing import SENTENCES_FILE, STATS_FILE, load_sentences
from kn.data.pararel import build_bags
from kn.models.encoding import PromptCodec
from kn.models import training
from kn.models.readout import embedding_readout_ranks
from kn.models.training import (
    build_model,
    encode_natural,
    filled_sentences,
    split_natural,
    study_coverage,
    train_organism,
    train_wordpiece_tokenizer,
)

from ..conftest import REPO, RESOURCES
from .test_training import RELATIONS, TINY_RECIPE, one_thread, prompts  # noqa: F401 (fixtures)

BING = REPO / "resources" / "bing_distant"
STUDIED = 2  # facts per relation whose sentences must stay out of training
NATURAL = replace(TINY_RECIPE, max_steps=8, eval_every=4, natural_ratio=0.25, natural_eval_facts=2,
                  natural_max_tokens=32, freeze_word_embeddings=True, word_embedding_std=0.1,
                  freeze_mlm_transform=True, mlm_transform_init="identity")


@pytest.fixture(scope="module")
def sentences() -> pd.DataFrame:
    table, _ = load_sentences(BING / SENTENCES_FILE, BING / STATS_FILE)
    return table[table["relation"].isin(RELATIONS) & (table["fact_id"] < 6)].reset_index(drop=True)


def test_studied_and_evaluation_sentences_never_train(sentences):
    natural = split_natural(sentences, STUDIED, 6, eval_facts=2, seed=0)
    studied = set(sentences.loc[sentences["fact_id"] < STUDIED, "sentence"])
    assert natural.train and natural.heldout and studied
    assert not studied & set(natural.train)
    assert not set(natural.heldout) & set(natural.train)
    assert not studied & set(natural.heldout)  # evaluation facts are never studied ones either
    assert natural.heldout_facts == 2 and natural.train_facts == len(RELATIONS) * (6 - STUDIED) - 2
    assert split_natural(sentences, STUDIED, 6, eval_facts=2, seed=0) == natural
    with pytest.raises(ValueError, match="natural_eval_facts"):
        split_natural(sentences, STUDIED, 6, eval_facts=0, seed=0)


def test_training_stream_holds_no_studied_sentence(prompts, sentences):
    organism = train_organism(prompts, sorted(set(prompts["object"])), NATURAL, sentences=sentences, studied_facts=STUDIED)
    assert organism.natural is not None
    streamed = {tuple(ids) for ids in encode_natural(organism.tokenizer, organism.natural.train, NATURAL.natural_max_tokens)}
    held = sentences.loc[sentences["fact_id"] < STUDIED, "sentence"].tolist() + organism.natural.heldout
    assert not streamed & {tuple(ids) for ids in encode_natural(organism.tokenizer, held, NATURAL.natural_max_tokens)}
    scores = organism.natural_scores
    assert scores["masked_tokens"] > 0 and 0 <= scores["masked_accuracy"] <= 1 and 0 < scores["unigram_baseline"] < 1
    assert scores["masked_perplexity"] > 1


def test_masked_perplexity_is_the_mean_nll_of_every_masked_piece(prompts, sentences):
    organism = train_organism(prompts, sorted(set(prompts["object"])), NATURAL, sentences=sentences, studied_facts=STUDIED)
    model, tokenizer = organism.model, organism.tokenizer
    sentence = encode_natural(tokenizer, organism.natural.heldout[:1], 32)[0]
    scores = training.masked_token_accuracy(model, [sentence], [sentence], 1.0, tokenizer.mask_token_id,
                                            tokenizer.all_special_ids, seed=0)
    ids = torch.tensor([sentence])
    inner = torch.tensor([t not in tokenizer.all_special_ids for t in sentence])
    with torch.no_grad():
        logits = model(input_ids=ids.masked_fill(inner, tokenizer.mask_token_id)).logits[0, inner]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, inner])
    assert scores["masked_tokens"] == int(inner.sum())
    assert scores["masked_perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    assert scores["masked_accuracy"] == pytest.approx(float((logits.argmax(-1) == ids[0, inner]).float().mean()))


def _vocabulary_digest(prompts: pd.DataFrame, texts: list[str]) -> str:
    tokenizer = train_wordpiece_tokenizer(filled_sentences(prompts) + texts, sorted(set(prompts["object"])), 3000)
    return hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def test_vocabulary_is_deterministic_across_processes(prompts, sentences):
    texts = split_natural(sentences, STUDIED, 6, eval_facts=2, seed=0).train
    here = _vocabulary_digest(prompts, texts)
    script = (
        "from tests.models.test_natural import _digest_in_fresh_process; print(_digest_in_fresh_process())"
    )
    other = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                           env={"HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "random", "PATH": ""}).stdout.split()[-1]
    assert here == other
    objects = sorted(set(prompts["object"]))
    tokenizer = train_wordpiece_tokenizer(filled_sentences(prompts) + texts, objects, 3000)
    assert all(tokenizer.tokenize(obj) == [obj] for obj in objects)  # objects stay single tokens
    coverage = study_coverage(tokenizer, sentences, STUDIED, seed=0)
    assert set(coverage) == {"T1", "T2", "T3"} and all(0 <= c["unk_piece_share"] < 0.05 for c in coverage.values())


def _digest_in_fresh_process() -> str:
    table, _ = load_sentences(BING / SENTENCES_FILE, BING / STATS_FILE)
    table = table[table["relation"].isin(RELATIONS) & (table["fact_id"] < 6)].reset_index(drop=True)
    prompts = build_bags(RESOURCES, RELATIONS, max_facts_per_relation=6)[0]
    return _vocabulary_digest(prompts, split_natural(table, STUDIED, 6, eval_facts=2, seed=0).train)


def test_natural_recipe_trains_identical_weights_twice(prompts, sentences):
    runs = [train_organism(prompts, sorted(set(prompts["object"])), NATURAL, sentences=sentences, studied_facts=STUDIED)
            for _ in range(2)]
    first, second = (run.model.state_dict() for run in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert runs[0].history.step_loss == runs[1].history.step_loss
    without = train_organism(prompts, sorted(set(prompts["object"])), replace(NATURAL, natural_ratio=0.0))
    assert without.history.step_loss != runs[0].history.step_loss  # the web sentences did enter training


def test_web_pretraining_reads_training_sentences_only_and_trains_identically_twice(prompts, sentences, monkeypatch):
    recipe = replace(NATURAL, natural_pretrain_steps=3, natural_pretrain_lr=0.001, natural_mask_prob=0.4)
    calls: list[tuple[int, set[tuple[int, ...]]]] = []
    real_loss = training.natural_loss

    def recording_loss(model, head, natural, order, count, *rest):
        calls.append((count, {tuple(ids) for ids in natural}))
        return real_loss(model, head, natural, order, count, *rest)

    monkeypatch.setattr(training, "natural_loss", recording_loss)
    runs = [train_organism(prompts, sorted(set(prompts["object"])), recipe, sentences=sentences, studied_facts=STUDIED)
            for _ in range(2)]
    streamed = {tuple(ids) for ids in encode_natural(runs[0].tokenizer, runs[0].natural.train, recipe.natural_max_tokens)}
    held = sentences.loc[sentences["fact_id"] < STUDIED, "sentence"].tolist() + runs[0].natural.heldout
    held_ids = {tuple(ids) for ids in encode_natural(runs[0].tokenizer, held, recipe.natural_max_tokens)}
    per_run = len(calls) // 2
    assert [count for count, _ in calls[:3]] == [recipe.batch_size] * 3  # web-only steps read a full batch
    assert [count for count, _ in calls[3:per_run]] == [round(recipe.natural_ratio * recipe.batch_size)] * runs[0].history.steps
    assert all(source == streamed and not source & held_ids for _, source in calls)
    assert len(runs[0].history.pretrain_loss) == 3
    first, second = (run.model.state_dict() for run in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert runs[0].history.pretrain_loss == runs[1].history.pretrain_loss
    without = train_organism(prompts, sorted(set(prompts["object"])), NATURAL, sentences=sentences, studied_facts=STUDIED)
    assert without.history.step_loss != runs[0].history.step_loss  # the pretraining changed what the template phase saw
    with pytest.raises(ValueError, match="natural_pretrain_steps"):
        train_organism(prompts, sorted(set(prompts["object"])), replace(recipe, natural_ratio=0.0))


def test_natural_recipe_needs_sentences(prompts):
    with pytest.raises(ValueError, match="natural_ratio"):
        train_organism(prompts, sorted(set(prompts["object"])), NATURAL)


def test_identity_head_transform_reads_embeddings_as_tokens(prompts):
    objects = sorted(set(prompts["object"]))
    tokenizer = train_wordpiece_tokenizer(filled_sentences(prompts), objects, 600)
    codec = PromptCodec(tokenizer, causal=False)
    encoded = codec.encode(list(prompts["prompt"][:40]))
    targets = [tokenizer.convert_tokens_to_ids(objects[k % len(objects)]) for k in range(len(encoded))]
    medians = {}
    for init in ("random", "identity"):
        model = build_model(replace(NATURAL, mlm_transform_init=init), len(tokenizer.get_vocab()), tokenizer.pad_token_id).eval()
        medians[init] = np.median(embedding_readout_ranks(model, encoded, targets, scales=(16.0,))[:, 0])
    assert medians["identity"] == 1
    assert medians["random"] > 10
    with pytest.raises(ValueError, match="mlm_transform_init"):
        build_model(replace(NATURAL, mlm_transform_init="zero"), 100, 0)
