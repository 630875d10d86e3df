"""The probe and probe_summary stage CLIs on a tiny model: contract columns, held-out flags from the
training record, skipped objects counted, the summary table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kn.data.pararel import build_bags
from kn.io import read_provenance, write_parquet
from kn.models.training import TRAINING_RECORD
from kn.tables import PROBE
from kn.stages import probe as probe_stage
from kn.stages import probe_summary as summary_stage
from kn.stages.cli import run_stage

from ..conftest import RESOURCES

RELATIONS = ["P101", "P19"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_bert_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe-stage")
    model = root / "model"
    shutil.copytree(tiny_bert_dir, model)
    (model / TRAINING_RECORD).write_text(json.dumps({"heldout_templates": {"P101": [2, 5], "P19": []}}))
    data = root / "relations"
    for rel in RELATIONS:
        prompts, _ = build_bags(RESOURCES, [rel], max_facts_per_relation=3)
        write_parquet(data / f"{rel}.parquet", prompts)
    probes = root / "probe"
    for rel in RELATIONS:
        run_stage(probe_stage.main, ["--relation", rel, f"--in=data={data / rel}.parquet", f"--in=model={model}",
                                              f"--out=probe={probes / rel}.parquet", "device=cpu"])
    return {"root": root, "model": model, "data": data, "probes": probes}


def test_probe_stage_writes_the_contract(workspace):
    table = pd.read_parquet(workspace["probes"] / "P101.parquet")
    prompts = pd.read_parquet(workspace["data"] / "P101.parquet")
    assert list(table.columns) == PROBE.columns and len(table) == len(prompts)
    assert table["heldout"].tolist() == prompts["template_id"].isin([2, 5]).tolist()
    # the tiny vocabulary has "logic" (Alan Turing's field) but not every P101 object
    objects = dict(zip(prompts["fact_id"], prompts["object"]))
    assert not table.loc[table.fact_id == 0, "skipped"].any() and objects[0] == "logic"
    assert table["skipped"].any()
    assert (table.loc[table.skipped, "gold_id"] == -1).all()
    assert read_provenance(workspace["probes"] / "P101.parquet")["relation"] == "P101"
    assert not pd.read_parquet(workspace["probes"] / "P19.parquet")["heldout"].any()


def test_probe_stage_rejects_another_relations_data(workspace, tmp_path):
    with pytest.raises(SystemExit, match=r"P101.parquet: holds relation\(s\) \['P101'\]; expected only P19"):
        run_stage(probe_stage.main, ["--relation", "P19", f"--in=data={workspace['data'] / 'P101.parquet'}",
                                              f"--in=model={workspace['model']}", f"--out=probe={tmp_path / 'x.parquet'}"])


def test_probe_summary_stage(workspace):
    out = workspace["root"] / "summary"
    run_stage(summary_stage.main, [
        *[f"--in=probe:{rel}={workspace['probes'] / rel}.parquet" for rel in RELATIONS],
        *[f"--in=data:{rel}={workspace['data'] / rel}.parquet" for rel in RELATIONS], f"--in=model={workspace['model']}",
        f"--out=csv={out}.csv", f"--out=md={out}.md", "device=cpu",
    ])
    table = pd.read_csv(f"{out}.csv").set_index("relation")
    assert list(table.index) == [*RELATIONS, "mean"]
    for rel in RELATIONS:
        probe = pd.read_parquet(workspace["probes"] / f"{rel}.parquet")
        scored = probe[~probe.skipped]
        expected = scored.loc[~scored.heldout, "correct"].mean()  # NaN when every object was skipped
        assert table.loc[rel, "train_accuracy"] == pytest.approx(expected, nan_ok=True)
        assert table.loc[rel, "skipped_facts"] == probe.loc[probe.skipped, "fact_id"].nunique()
        if probe["skipped"].all():  # no scorable fact: no relation-use prompts either
            assert pd.isna(table.loc[rel, "xrel_prompts"])
        else:
            assert table.loc[rel, "xrel_prompts"] > 0
    assert table.loc["mean", "train_accuracy"] == pytest.approx(table.loc[RELATIONS, "train_accuracy"].mean(), nan_ok=True)
    assert table.loc["mean", "facts"] == table.loc[RELATIONS, "facts"].sum()
    assert table.loc["mean", "train_prompts"] == table.loc[RELATIONS, "train_prompts"].sum()
    markdown = Path(f"{out}.md").read_text()
    assert "| P101 |" in markdown and "majority baseline" in markdown and "provenance" in markdown
