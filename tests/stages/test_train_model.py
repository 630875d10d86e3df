"""The train_model stage at toy size: outputs, model card, held-out record, determinism under the seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kn.data.pararel import load_relations
from kn.models.load import load_masked_lm
from kn.models.training import TRAINING_RECORD, choose_heldout_templates, read_heldout_templates
from kn.stages import train_model as stage
from kn.stages.cli import run_stage

from ..conftest import RESOURCES

TOY = [
    "data.max_facts_per_relation=1", "model.train.num_layers=1", "model.train.hidden_size=32",
    "model.train.intermediate_size=64", "model.train.num_heads=2", "model.train.max_steps=6",
    "model.train.eval_every=3", "model.train.eval_sample=32", "model.train.batch_size=16",
    "model.train.target_accuracy=null", "model.train.seed=5",
]


def train(out: Path, *extra: str) -> dict[str, Path]:
    paths = {"model": out / "model", "card": out / "model_card.md", "metrics": out / "training" / "metrics.json",
             "loss": out / "training" / "loss.png"}
    run_stage(stage.main, ["--threads", "1", *[f"--out={k}={v}" for k, v in paths.items()], *TOY, *extra])
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    return train(tmp_path_factory.mktemp("toy-a"))


def test_outputs_and_model_card(trained):
    model, tokenizer = load_masked_lm(trained["model"])
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 64
    assert trained["loss"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(trained["metrics"].read_text())
    relations = list(load_relations(RESOURCES))
    assert [row["relation"] for row in metrics["per_relation"]] == relations  # all 34, whatever data.relations says
    assert metrics["training"]["steps"] == 6 and len(metrics["training"]["step_loss"]) == 6
    assert metrics["config"]["model"]["train"]["seed"] == 5 and metrics["stage"] == "train_model"
    card = trained["card"].read_text()
    for needle in ("Top-1 accuracy on training-template prompts", "majority-object baseline", "Relation use",
                   "Parameters:", "Wall time:", "training/loss.png", "| P937 |"):
        assert needle in card
    assert metrics["data"]["parameters"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_heldout_record_matches_the_recipe(trained):
    counts = {rel: len(meta.templates) for rel, meta in load_relations(RESOURCES).items()}
    expected = choose_heldout_templates(counts, per_relation=1, min_templates=5, seed=5)
    assert read_heldout_templates(trained["model"]) == expected
    assert json.loads((trained["model"] / TRAINING_RECORD).read_text())["seed"] == 42  # the pipeline seed
    assert expected["P103"] == [] and len(expected["P101"]) == 1


def test_same_config_gives_identical_weights(trained, tmp_path):
    again = train(tmp_path / "toy-b")
    assert (again["model"] / "model.safetensors").read_bytes() == (trained["model"] / "model.safetensors").read_bytes()
    assert (again["model"] / "tokenizer.json").read_bytes() == (trained["model"] / "tokenizer.json").read_bytes()
    first = json.loads(trained["metrics"].read_text())
    second = json.loads(again["metrics"].read_text())
    assert first["per_relation"] == second["per_relation"] and first["training"]["step_loss"] == second["training"]["step_loss"]


def test_pretrained_config_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="model.source=trained"):
        run_stage(stage.main, ["--out=model=x", "model=bert-base-cased"])
