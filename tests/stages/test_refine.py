"""The refine stage CLI on synthetic attribution shards: contract columns, JSON record, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kn.io import read_provenance
from kn.stages import refine as stage
from kn.stages.cli import run_stage
from kn.tables import SCORES, SHARD_PROMPTS


SHAPE = {"n_layers": 2, "ffn_size": 10}  # what the attribute stage records about the model


def write_shard(folder: Path, name: str, facts: dict[int, int], scores: list[tuple]) -> Path:
    """A shard with ``facts`` {fact_id: n_prompts} and score rows (method, fact, template, layer, neuron, score)."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = pd.DataFrame(
        [("P1", f, t, 7, 0.5, 7, "x", True, 1.0, 1.0) for f, n in facts.items() for t in range(n)],
        columns=SHARD_PROMPTS.columns,
    )
    frame = pd.DataFrame(scores, columns=["method", "fact_id", "template_id", "layer", "neuron", "score"])
    frame.insert(0, "relation", "P1")
    path = folder / f"{name}.parquet"
    SCORES.write(path, frame, SHAPE)
    SHARD_PROMPTS.write(folder / f"{name}.prompts.parquet", prompts, SHAPE)
    return path


def in_all_prompts(method: str, fact: int, n: int, neurons: list[tuple[int, int]]) -> list[tuple]:
    return [(method, fact, t, layer, neuron, 1.0) for t in range(n) for layer, neuron in neurons]


def run(shards: list[Path], out: Path, *overrides: str) -> tuple[pd.DataFrame, dict]:
    argv = ["--relation", "P1", *[f"--in=scores:{k:03d}={p}" for k, p in enumerate(shards)],
            *[f"--in=prompts:{k:03d}={p.with_name(p.stem + '.prompts.parquet')}" for k, p in enumerate(shards)],
            f"--out=neurons={out}.parquet", f"--out=summary={out}.json", *overrides]
    run_stage(stage.main, argv)
    return pd.read_parquet(f"{out}.parquet"), json.loads(Path(f"{out}.json").read_text())


def test_refine_stage_writes_contract_outputs(tmp_path: Path) -> None:
    shard0 = write_shard(
        tmp_path / "attr", "000", {0: 4, 1: 4},
        in_all_prompts("ig", 0, 4, [(1, 2), (0, 5), (1, 3)]) + in_all_prompts("base", 0, 4, [(1, 7), (1, 8)])
        + in_all_prompts("ig", 1, 4, [(1, 2), (1, 4)]) + in_all_prompts("base", 1, 4, [(1, 7), (1, 9)]),
    )
    shard1 = write_shard(tmp_path / "attr", "001", {2: 4}, in_all_prompts("base", 2, 4, [(0, 1), (0, 2)]))
    neurons, summary = run([shard0, shard1], tmp_path / "P1")

    assert neurons.columns.tolist() == ["relation", "method", "fact_id", "layer", "neuron", "order"]
    assert str(neurons["layer"].dtype) == "int16" and str(neurons["neuron"].dtype) == "int32"
    ig = neurons[neurons.method == "ig"]
    assert list(zip(ig.fact_id, ig.layer, ig.neuron)) == [(0, 0, 5), (0, 1, 2), (0, 1, 3), (1, 1, 2), (1, 1, 4)]
    # fact 2 has no IG scores at all but still counts: 5 KNs / 3 facts.
    assert summary["ig"]["avg_kn"] == 5 / 3 and summary["ig"]["n_facts"] == 3
    # With 4 prompts the floor of 3 fixes the threshold for every p <= 0.75: p falls 6 times in vain.
    ps = [0.7]
    for _ in range(5):
        ps.append(ps[-1] - 0.05)
    assert summary["ig"]["evaluations"] == [{"p": p, "avg": 5 / 3} for p in ps]
    assert not summary["ig"]["in_target"] and summary["ig"]["p"] == ps[-1]
    assert summary["ig"]["relation_level"] == [[0, 5], [1, 2], [1, 3], [1, 4]]  # 1 of 3 facts >= 0.1 x 3
    assert summary["base"]["avg_kn"] == 2.0 and summary["base"]["in_target"]
    assert read_provenance(f"{tmp_path / 'P1'}.parquet")["config"]["refine"]["t"] == 0.2

    again, _ = run([shard0, shard1], tmp_path / "again")
    pd.testing.assert_frame_equal(neurons, again)


def test_refine_stage_overrides_change_the_result(tmp_path: Path) -> None:
    shard = write_shard(tmp_path, "000", {0: 4}, in_all_prompts("ig", 0, 4, [(1, 2), (1, 3)]))
    _, summary = run([shard], tmp_path / "P1", "refine.relation_share=1.0", "refine.target_min=0.5")
    assert summary["ig"]["relation_level"] == [[1, 2], [1, 3]]
    assert summary["ig"]["in_target"]


def test_refine_stage_rejects_gaps_in_fact_ids(tmp_path: Path) -> None:
    shard = write_shard(tmp_path, "000", {0: 4, 2: 4}, in_all_prompts("ig", 0, 4, [(1, 2)]))
    with pytest.raises(SystemExit, match="0..N-1"):
        run([shard], tmp_path / "P1")


def test_refine_stage_names_a_missing_column(tmp_path: Path) -> None:
    shard = write_shard(tmp_path, "000", {0: 4}, in_all_prompts("ig", 0, 4, [(1, 2)]))
    pd.read_parquet(shard).drop(columns="score").to_parquet(shard)
    with pytest.raises(SystemExit, match=r"000.parquet: missing columns \['score'\]"):
        run([shard], tmp_path / "P1")
