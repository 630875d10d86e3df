"""The evaluate stage on the hand-wired fact model: effects, controls, draws, dose curve, determinism."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kn.interventions import draw_other_facts
from kn.stages import evaluate
from kn.stages.cli import run_stage
from tests.fact_model import BERLIN_UNIT, LAST, PARIS_UNIT
from tests.stages.evaluation_run import RELATIONS, evaluation_run, shard_args, stage_config  # noqa: F401 (session fixture)


def test_evaluate_suppresses_the_constructed_neurons(evaluation_run: Path) -> None:
    results = pd.read_parquet(evaluation_run / "evaluate" / "P1.parquet")
    own_ig = results[(results.target == "own") & (results.method == "ig")]
    assert (own_ig.n_neurons == 1).all()
    assert (own_ig.p_suppress < 0.5 * own_ig.p0).all() and (own_ig.p_amplify > own_ig.p0).all()
    control = results[(results.target == "own") & (results.method == "random")]
    assert (control.n_neurons == own_ig.n_neurons.to_numpy()).all()
    assert ((control.p_suppress - control.p0).abs() < (own_ig.p_suppress - own_ig.p0).abs().to_numpy()).all()
    # The other-relation prompts are the replayed single-stream draws, the same for every method.
    draws = draw_other_facts(list(RELATIONS), {r: len(f) for r, f in RELATIONS.items()}, "P1", 42)
    other = results[results.target == "other"].drop_duplicates(["fact_id", "method"])
    for method, group in other.groupby("method"):
        assert list(zip(group.prompt_relation, group.prompt_fact_id)) == draws, method


def test_neurons_and_dose_follow_the_construction(evaluation_run: Path) -> None:
    neurons = pd.read_parquet(evaluation_run / "neurons" / "P1.parquet")
    ig = neurons[neurons.method == "ig"]
    assert list(zip(ig.fact_id, ig.layer, ig.neuron)) == [(0, LAST, PARIS_UNIT), (1, LAST, BERLIN_UNIT)]
    dose = pd.read_parquet(evaluation_run / "evaluate" / "P1.dose.parquet")
    ig_dose = dose[(dose.method == "ig") & (dose.k == 1)]
    assert (ig_dose.p_suppress < 0.5 * ig_dose.p0).all()  # the top-1 neuron by attribution is the constructed one
    assert dose[dose.k == 50].n_neurons.max() <= 2 * 32  # capped by what the shards stored (2 layers x 32 units)


def test_evaluate_is_deterministic(evaluation_run: Path, tmp_path: Path) -> None:
    config = stage_config(evaluation_run / "model")
    run_stage(evaluate.main, ["--relation", "P1", f"--in=neurons={evaluation_run}/neurons/P1.parquet",
                                          *shard_args(evaluation_run, "P1"),
                                          *[f"--in=data:{r}={evaluation_run}/data_{r}.parquet" for r in RELATIONS],
                                          f"--out=results={tmp_path}/P1.parquet", f"--out=dose={tmp_path}/P1.dose.parquet",
                                          *config])
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "P1.parquet"), pd.read_parquet(evaluation_run / "evaluate" / "P1.parquet"))
