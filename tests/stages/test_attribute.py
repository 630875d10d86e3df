"""The attribute stage CLI on a tiny model: shard contents per contract, round trip, determinism, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import kn.io
from kn.attribution import activation_scores, ig_attribution, sparsify
from kn.io import read_parquet, read_provenance
from kn.models import encode_prompts, load_masked_lm
from kn.stages import attribute as stage
from kn.stages.cli import run_stage

from ..conftest import build_tiny_bert

# "Lisbon" is not in the tiny vocabulary: its prompts are listed but not attributed
FACTS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Lisbon"), ("Spain", "Madrid"), ("England", "London")]
TEMPLATES = ["the capital of [X] is [Y] .", "[X] is located in [Y] .", "[Y] , the city of [X] ."]
COLUMNS = ["relation", "relation_label", "lama_type", "fact_id", "subject", "object", "template_id", "template", "prompt"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("attribute")
    model_dir = build_tiny_bert(root / "model")
    rows = [
        ("P36", "capital", "1-1", f, s, o, t, tpl, tpl.replace("[X]", s).replace("[Y]", "[MASK]"))
        for f, (s, o) in enumerate(FACTS)
        for t, tpl in enumerate(TEMPLATES)
    ]
    data = root / "P36.parquet"
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(data)
    overrides = [
        "model.source=pretrained", f"model.path={model_dir}", "model.name=tiny", f"results_dir={root}",
        "study.facts_per_relation=5", "ig.facts_per_shard=2", "ig.m=4", "ig.batch_size=8", "device=cpu",
    ]
    return {"root": root, "model_dir": model_dir, "data": data, "overrides": overrides}


def run_shard(setup: dict, shard: int, out: Path, *extra: str) -> tuple[Path, Path]:
    scores, prompts = out / f"{shard:03d}.parquet", out / f"{shard:03d}.prompts.parquet"
    argv = ["--relation", "P36", "--shard", str(shard), "--in", f"data={setup['data']}",
            "--out", f"scores={scores}", "--out", f"prompts={prompts}", *setup["overrides"], *extra]
    run_stage(stage.main, argv)
    return scores, prompts


@pytest.mark.parametrize("target", ["gold", "pred"])
def test_shard_round_trips_and_follows_the_contract(setup, tmp_path, target):
    scores_path, prompts_path = run_shard(setup, 1, tmp_path, f"ig.target={target}")  # facts 2, 3
    scores, prompts = read_parquet(scores_path), read_parquet(prompts_path)
    assert list(scores.columns) == ["relation", "fact_id", "template_id", "method", "layer", "neuron", "score"]
    assert [str(t) for t in scores.dtypes[4:]] == ["int16", "int32", "float32"]
    assert list(prompts.columns) == ["relation", "fact_id", "template_id", "gold_id", "gold_prob", "pred_id",
                                     "pred_token", "correct", "ig_max", "base_max"]
    assert prompts[["fact_id", "template_id"]].values.tolist() == [[f, t] for f in (2, 3) for t in range(3)]

    lisbon = prompts[prompts["fact_id"] == 2]
    assert (lisbon["gold_id"] == -1).all() and lisbon["ig_max"].isna().all()
    assert not (scores["fact_id"] == 2).any()

    # recompute the attributed prompts in-process and compare with what the shard stored
    model, tokenizer = load_masked_lm(setup["model_dir"])
    texts = [tpl.replace("[X]", "Spain").replace("[Y]", "[MASK]") for tpl in TEMPLATES]
    encoded = encode_prompts(tokenizer, texts)
    gold = torch.full((3,), tokenizer.convert_tokens_to_ids("Madrid"))
    plain = activation_scores(model, encoded, gold)
    ig = ig_attribution(model, encoded, gold if target == "gold" else plain.pred_ids, m=4, progress=False)
    spain = prompts[prompts["fact_id"] == 3].reset_index(drop=True)
    assert spain["gold_id"].tolist() == gold.tolist()
    assert spain["pred_id"].tolist() == plain.pred_ids.tolist()
    assert spain["pred_token"].tolist() == tokenizer.convert_ids_to_tokens(plain.pred_ids.tolist())
    assert spain["correct"].tolist() == (plain.pred_ids == gold).tolist()
    torch.testing.assert_close(torch.tensor(spain["gold_prob"].to_numpy()), plain.target_prob)
    for method, expected in (("ig", ig), ("base", plain.activations)):
        stored = scores[(scores["method"] == method) & (scores["fact_id"] == 3)]
        want = sparsify(expected, 0.1)
        assert stored[["template_id", "layer", "neuron"]].values.tolist() == want[["prompt", "layer", "neuron"]].values.tolist()
        torch.testing.assert_close(torch.tensor(stored["score"].to_numpy()), torch.tensor(want["score"].to_numpy()),
                                   rtol=1e-5, atol=1e-9)
        maxima = stored.groupby("template_id")["score"].max().to_numpy()  # the max itself is always stored
        assert maxima.tolist() == spain[f"{method}_max"].tolist()

    meta = read_provenance(scores_path)
    assert meta["stage"] == "attribute" and meta["seed"] == 42 and meta["shard"] == 1 and meta["fact_ids"] == [2, 4]
    assert meta["config"]["ig"]["target"] == target and "torch" in meta["versions"]


def test_last_shard_is_short_and_outputs_are_deterministic(setup, tmp_path):
    first = run_shard(setup, 2, tmp_path / "a")  # 5 study facts, 2 per shard: shard 2 = fact 4 only
    second = run_shard(setup, 2, tmp_path / "b")
    assert sorted(set(read_parquet(first[1])["fact_id"])) == [4]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()


def test_study_cap_and_shard_range_are_checked(setup, tmp_path):
    with pytest.raises(SystemExit, match="shard 2 is out of range: 4 study facts in shards of 2 give shards 0..1"):
        run_shard(setup, 2, tmp_path, "study.facts_per_relation=4")


def test_killed_write_leaves_no_file_under_the_final_name(setup, tmp_path, monkeypatch):
    real_write = kn.io.pq.write_table

    def write_then_die(table, where, **kwargs):
        real_write(table, where, **kwargs)
        Path(where).write_bytes(Path(where).read_bytes()[:100])  # a truncated file, then the "kill"
        raise KeyboardInterrupt

    monkeypatch.setattr(kn.io.pq, "write_table", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_shard(setup, 0, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temporary file remains
