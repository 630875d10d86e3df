"""The edit_erase stage CLI on a tiny model: neuron choice, only selected relations, model files untouched."""

from __future__ import annotations

import math

import pandas as pd

from kn.stages import edit_erase as stage
from kn.stages.cli import run_stage

from .test_edit_update import SHARED, SUBJECTS, fact_neurons, study, tree_digest  # noqa: F401  (study is a fixture)


def test_erase_stage_outputs(study, tmp_path):
    model_files = tree_digest(study["model_dir"])
    csv, md = tmp_path / "erase.csv", tmp_path / "erase.md"
    run_stage(stage.main, [*study["inputs"], "--out", f"erase_csv={csv}", "--out", f"erase_md={md}", *study["overrides"]])
    assert tree_digest(study["model_dir"]) == model_files

    table = pd.read_csv(csv)
    assert table["relation"].tolist() == ["P19"]  # P27 is in erase.relations but not selected
    row = table.iloc[0]
    # top-2 by fact count: the shared neuron (12 facts), then a tie of 1 broken by first appearance (fact 0's own)
    assert row["neurons"] == f"{SHARED[0]}:{SHARED[1]} " + ":".join(map(str, fact_neurons(0)[1]))
    n_prompts = len(SUBJECTS) * 3
    assert (row["prompts"], row["other_prompts"]) == (n_prompts, n_prompts)
    assert row["acc_before"] == 0.5  # the model answers Paris everywhere; half the facts are Paris
    assert math.isclose(row["ppl_change"], (row["ppl_after"] - row["ppl_before"]) / row["ppl_before"])
    text = md.read_text()
    assert "P27" in text and "1450 -> 2996" in text
