"""kn-tiny training, at a size that runs in seconds: determinism, single-token objects, held-out
templates, and learning beyond the majority-object baseline."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from kn.data.pararel import build_bags, load_relations, read_query_pairs
from kn.models.training import (
    SPECIAL_TOKENS,
    TRAINING_RECORD,
    build_model,
    choose_heldout_templates,
    length_grouped_batches,
    lr_factor,
    mark_heldout,
    mask_other_tokens,
    read_heldout_templates,
    train_organism,
    train_wordpiece_tokenizer,
    filled_sentences,
)
from kn.models.load import load_lm
from kn.probe import accuracy_summary, probe_relation
from kn.schema import TrainConfig

from ..conftest import RESOURCES

RELATIONS = ["P101", "P103", "P19"]  # 13, 4 and 13 templates: P103 is below heldout_min_templates
TINY_RECIPE = TrainConfig(
    seed=3, num_layers=2, hidden_size=64, intermediate_size=128, num_heads=2, dropout=0.0, max_steps=200,
    target_accuracy=None, eval_every=100, eval_sample=64, batch_size=32, lr=3e-3, weight_decay=0.0,
    warmup_steps=10, other_mask_prob=0.15, heldout_templates=1, heldout_min_templates=5, vocab_size=600,
    architecture="bert", tie_word_embeddings=True, freeze_word_embeddings=False, word_embedding_std=None,
    freeze_mlm_transform=False, threads=1,
)
SHORT = replace(TINY_RECIPE, max_steps=12, eval_every=6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two intra-op threads on a shared 2-core machine slow training several-fold; results are per thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prompts() -> pd.DataFrame:
    return build_bags(RESOURCES, RELATIONS, max_facts_per_relation=6)[0]


@pytest.fixture(scope="module")
def all_objects() -> list[str]:
    pairs = read_query_pairs(RESOURCES / "query_pairs.json")
    return sorted({obj for rel in load_relations(RESOURCES) for _, obj in pairs[rel]})


@pytest.fixture(scope="module")
def organism(prompts, all_objects):
    return train_organism(prompts, all_objects, TINY_RECIPE)


def test_every_pararel_object_is_one_token(prompts, all_objects):
    tokenizer = train_wordpiece_tokenizer(filled_sentences(prompts), all_objects, vocab_size=600)
    vocab = tokenizer.get_vocab()
    assert len(all_objects) == 1729
    for obj in all_objects:
        assert tokenizer.tokenize(obj) == [obj]
        assert tokenizer.convert_tokens_to_ids(obj) == vocab[obj]
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    # subjects and templates are tokenised normally: an unseen name splits into pieces, never [UNK]
    pieces = tokenizer.tokenize("Xylophonist Quarkbert")
    assert len(pieces) > 2 and tokenizer.unk_token not in pieces
    encoded = tokenizer("Alan Turing works in the field of [MASK].")["input_ids"]
    assert encoded.count(tokenizer.mask_token_id) == 1 and encoded[0] == tokenizer.cls_token_id


def test_heldout_choice_follows_the_recipe():
    counts = {"P101": 13, "P103": 4, "P937": 5, "P19": 13}
    chosen = choose_heldout_templates(counts, per_relation=2, min_templates=5, seed=7)
    assert chosen["P103"] == []
    for rel in ("P101", "P937", "P19"):
        assert len(chosen[rel]) == 2 and len(set(chosen[rel])) == 2
        assert all(0 <= t < counts[rel] for t in chosen[rel]) and chosen[rel] == sorted(chosen[rel])
    assert chosen == choose_heldout_templates(counts, 2, 5, seed=7)
    # a relation's choice does not depend on which other relations are trained
    assert choose_heldout_templates({"P19": 13}, 2, 5, seed=7)["P19"] == chosen["P19"]
    # seeds differ somewhere across relations
    assert any(choose_heldout_templates(counts, 2, 5, seed=s) != chosen for s in range(8, 12))
    # at least one template always stays in training
    assert len(choose_heldout_templates({"P937": 5}, per_relation=9, min_templates=5, seed=0)["P937"]) == 4


def test_mark_heldout(prompts):
    heldout = {"P101": [0, 2], "P19": [1]}
    marked = mark_heldout(prompts, heldout)
    expected = ((prompts.relation == "P101") & prompts.template_id.isin([0, 2])) | (
        (prompts.relation == "P19") & (prompts.template_id == 1)
    )
    assert marked.tolist() == expected.tolist()


def test_length_grouped_batches_cover_each_example_once():
    lengths = [5, 9, 7, 5, 12, 3, 8, 8, 6, 10, 4]
    batches = length_grouped_batches(lengths, 3, torch.Generator().manual_seed(0))
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 3 for b in batches)
    again = length_grouped_batches(lengths, 3, torch.Generator().manual_seed(0))
    assert again == batches


def test_other_token_masking_spares_object_and_special_tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(len(SPECIAL_TOKENS), 50, (64, 12))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    positions = torch.randint(1, 11, (64,))
    ids[torch.arange(64), positions] = 4  # the object's [MASK]
    attention = torch.ones_like(ids)
    attention[:8, 9:] = 0
    specials = torch.arange(len(SPECIAL_TOKENS))
    corrupted, labels = mask_other_tokens(ids, attention, positions, 0.3, specials, 4, 50, generator)
    chosen = labels != -100
    assert not chosen[torch.arange(64), positions].any()
    assert not chosen[:, 0].any() and not chosen[:, -1].any() and not chosen[:8, 9:].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    rate = chosen.sum().item() / (attention.sum().item() - 3 * 64)
    assert 0.2 < rate < 0.4
    assert (corrupted[chosen] == 4).float().mean() > 0.6
    none_ids, none_labels = mask_other_tokens(ids, attention, positions, 0.0, specials, 4, 50, generator)
    assert torch.equal(none_ids, ids) and (none_labels == -100).all()


def test_lr_schedule_warms_up_then_decays_to_zero():
    warmup, total = 10, 110
    assert lr_factor(0, warmup, total) == pytest.approx(1 / warmup)
    assert lr_factor(warmup - 1, warmup, total) == pytest.approx(1.0)
    assert lr_factor(warmup + 50, warmup, total) == pytest.approx(0.5)
    assert lr_factor(total, warmup, total) == 0.0


def test_training_is_deterministic_under_its_seed(prompts, all_objects):
    short = replace(TINY_RECIPE, max_steps=30, eval_every=15, dropout=0.1)  # dropout draws are seeded too
    first, second = train_organism(prompts, all_objects, short), train_organism(prompts, all_objects, short)
    assert second.heldout == first.heldout
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert second.history.step_loss == first.history.step_loss
    untimed = [[{k: v for k, v in e.items() if k != "seconds"} for e in run.history.evaluations] for run in (first, second)]
    assert untimed[0] == untimed[1]
    weights, again = first.model.state_dict(), second.model.state_dict()
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    other_seed = train_organism(prompts, all_objects, replace(short, seed=4))
    assert other_seed.history.step_loss != first.history.step_loss


def test_two_thread_training_is_deterministic(prompts, all_objects):
    """kn-tiny trains on 2 threads (model.train.threads): at its layer width the parallel kernels
    run, and a rerun still gives the same weights bit for bit."""
    wide = replace(TINY_RECIPE, hidden_size=256, intermediate_size=1024, num_heads=4, batch_size=64, max_steps=6,
                   eval_every=6, threads=2)
    torch.set_num_threads(wide.threads)
    try:
        first, second = train_organism(prompts, all_objects, wide), train_organism(prompts, all_objects, wide)
    finally:
        torch.set_num_threads(1)
    assert second.history.step_loss == first.history.step_loss
    weights, again = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_heldout_templates_are_never_trained_on(organism, prompts):
    counts = prompts.groupby("relation")["template_id"].nunique().to_dict()
    assert organism.heldout == choose_heldout_templates(counts, 1, 5, TINY_RECIPE.seed)
    assert organism.heldout["P103"] == [] and len(organism.heldout["P101"]) == 1
    held = mark_heldout(prompts, organism.heldout)
    assert organism.heldout_prompts == int(held.sum()) == 2 * 6
    assert organism.train_prompts == len(prompts) - organism.heldout_prompts


def test_training_learns_more_than_the_majority_object(organism, prompts):
    probes = pd.concat(
        [probe_relation(organism.model, organism.tokenizer, g, organism.heldout[r]) for r, g in prompts.groupby("relation")]
    )
    summary = accuracy_summary(probes, prompts)
    assert summary["train_accuracy"].mean() > summary["majority_baseline"].mean() + 0.2
    assert organism.history.evaluations[-1]["train_accuracy"] > 0.5
    losses = organism.history.step_loss
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])


def test_target_accuracy_stops_training_early(prompts, all_objects):
    recipe = replace(TINY_RECIPE, target_accuracy=0.0, eval_every=3, max_steps=50)
    stopped = train_organism(prompts, all_objects, recipe)
    assert stopped.history.steps == 3 and "target" in stopped.history.stop_reason


def test_read_heldout_templates(tmp_path):
    assert read_heldout_templates(tmp_path) == {}
    (tmp_path / TRAINING_RECORD).write_text(json.dumps({"heldout_templates": {"P19": [4, 7], "P103": []}}))
    assert read_heldout_templates(tmp_path) == {"P19": [4, 7], "P103": []}
    (tmp_path / TRAINING_RECORD).write_text(json.dumps({"recipe": {}}))
    with pytest.raises(ValueError, match="heldout_templates"):
        read_heldout_templates(tmp_path)


@pytest.fixture(scope="module")
def causal_organism(prompts, all_objects):
    """kn-tiny-gpt's recipe at test size: a GPT-2 causal LM, the object as the next token after the cut prompt."""
    return train_organism(prompts, all_objects, replace(TINY_RECIPE, architecture="gpt2", other_mask_prob=0.0))


def test_causal_organism_reads_cut_prompts_and_learns_its_facts(causal_organism, prompts):
    from kn.models.encoding import TEMPLATE_SUBJECT_AFTER_Y, template_use
    from kn.tables import PROBE_CAUSAL

    organism = causal_organism
    tokenizer, codec = organism.tokenizer, organism.codec
    assert codec is not None and codec.causal and type(organism.model).__name__ == "GPT2LMHeadModel"
    ids = tokenizer("Alan Turing works in the field of")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.mask_token_id is None  # <s> first, no [MASK]
    for prompt, obj in zip(prompts["prompt"], prompts["object"]):  # every object is one token after its prompt
        assert codec.object_tokens(prompt, obj) == (tokenizer.get_vocab()[obj],)
    uses = prompts["template"].map(template_use)
    usable = prompts[uses != TEMPLATE_SUBJECT_AFTER_Y]
    for relation, held in organism.heldout.items():  # held out among the templates a causal LM reads
        assert set(held) <= set(usable.loc[usable["relation"] == relation, "template_id"])
    assert organism.train_prompts + organism.heldout_prompts == len(usable)
    probes = pd.concat([probe_relation(organism.model, tokenizer, g, organism.heldout[r], codec=codec)
                        for r, g in prompts.groupby("relation")])
    assert list(probes.columns) == PROBE_CAUSAL.columns
    assert probes["skipped"].tolist() == (uses == TEMPLATE_SUBJECT_AFTER_Y).tolist()
    summary = accuracy_summary(probes, prompts)
    assert summary["train_accuracy"].mean() > summary["majority_baseline"].mean() + 0.2
    assert (summary["train_exact_match"] == summary["train_accuracy"]).all()  # one-token objects: the same


def test_causal_training_refuses_other_token_masking(prompts, all_objects):
    with pytest.raises(ValueError, match="other_mask_prob must be 0"):
        train_organism(prompts, all_objects, replace(TINY_RECIPE, architecture="gpt2", max_steps=2))


def test_frozen_word_embeddings_stay_at_their_initialisation(prompts, all_objects):
    recipe = replace(SHORT, freeze_word_embeddings=True, tie_word_embeddings=False)
    trained = train_organism(prompts, all_objects, recipe)
    initial = build_model(recipe, len(trained.tokenizer.get_vocab()), trained.tokenizer.pad_token_id)
    start, end = initial.state_dict(), trained.model.state_dict()
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(start[key], end[key])
    assert not trained.model.get_input_embeddings().weight.requires_grad
    # everything else that gets gradients moved, the untied output layer included
    for name in ("cls.predictions.decoder.weight", "bert.embeddings.position_embeddings.weight",
                 "bert.encoder.layer.0.intermediate.dense.weight"):
        assert not torch.equal(start[name], end[name]), name
    # tied + frozen: the output layer is the frozen matrix
    tied = train_organism(prompts, all_objects, replace(SHORT, freeze_word_embeddings=True))
    assert tied.model.cls.predictions.decoder.weight is tied.model.get_input_embeddings().weight
    assert torch.equal(tied.model.state_dict()[key], initial.state_dict()[key])


def test_word_embedding_scale_redraws_only_the_embeddings():
    base = build_model(SHORT, 300, pad_id=0)
    scaled = build_model(replace(SHORT, word_embedding_std=0.5), 300, pad_id=0)
    weight = scaled.get_input_embeddings().weight.detach()
    assert float(weight[1:].std()) == pytest.approx(0.5, rel=0.05)
    assert float(base.get_input_embeddings().weight.detach().std()) < 0.03
    assert torch.equal(weight[0], torch.zeros(weight.shape[1]))
    assert scaled.cls.predictions.decoder.weight is scaled.get_input_embeddings().weight  # still tied
    a, b = base.state_dict(), scaled.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["bert.embeddings.word_embeddings.weight",
                                                              "cls.predictions.decoder.weight"]
    assert torch.equal(build_model(replace(SHORT, word_embedding_std=0.5), 300, pad_id=0).get_input_embeddings().weight,
                       weight)


def test_frozen_mlm_transform_stays_at_its_initialisation(prompts, all_objects):
    recipe = replace(SHORT, freeze_mlm_transform=True)
    trained = train_organism(prompts, all_objects, recipe)
    start = build_model(recipe, len(trained.tokenizer.get_vocab()), trained.tokenizer.pad_token_id).state_dict()
    end = trained.model.state_dict()
    for name in ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias"):
        assert torch.equal(start[name], end[name]), name
    for name in ("cls.predictions.transform.LayerNorm.weight", "bert.embeddings.word_embeddings.weight",
                 "bert.encoder.layer.1.output.dense.weight"):
        assert not torch.equal(start[name], end[name]), name


def test_untied_output_layer_is_its_own_matrix_and_survives_saving(prompts, all_objects, tmp_path):
    untied = train_organism(prompts, all_objects, replace(SHORT, tie_word_embeddings=False))
    model = untied.model
    decoder, embeddings = model.cls.predictions.decoder.weight, model.get_input_embeddings().weight
    assert decoder.data_ptr() != embeddings.data_ptr() and not torch.allclose(decoder, embeddings)
    model.save_pretrained(tmp_path)
    untied.tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_lm(tmp_path)
    assert torch.equal(loaded.cls.predictions.decoder.weight, decoder)
    assert torch.equal(loaded.get_input_embeddings().weight, embeddings)


def test_the_gpt2_organism_refuses_bert_recipe_options():
    with pytest.raises(ValueError, match="freeze_mlm_transform is a BERT recipe option"):
        build_model(replace(SHORT, architecture="gpt2", freeze_mlm_transform=True), 300, pad_id=0)
