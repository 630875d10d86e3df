"""The edit_update stage CLI on a tiny model: outputs, attempt accounting, determinism, model files untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
import torch

from kn.io import read_parquet, read_provenance
from kn.stages import edit_update as stage
from kn.stages.cli import run_stage

from ..conftest import build_tiny_bert

SUBJECTS = ["Alan Turing", "Einstein", "London", "a city", "the country", "Madrid", "Spain", "Italy", "Rome", "France", "Germany", "England"]
OBJECTS = ["Paris", "Rome", "Paris", "Berlin", "Paris", "Madrid", "Paris", "Rome", "Paris", "Berlin", "Paris", "London"]
TEMPLATES = {"P101": ["[X] works in [Y] .", "[X] is located in [Y] .", "the field of [X] is [Y] ."],
             "P19": ["[X] was born in [Y] .", "[X] is the capital of [Y] .", "[X] city was born in [Y] ."]}
SHARED = (1, 63)  # in every fact's list: relation-level, so the update filter drops it


def fact_neurons(fact_id: int) -> list[tuple[int, int]]:
    """Hand-built KN lists: the shared neuron, then (for 2 of 3 facts) a neuron of the fact's own."""
    return [SHARED] + ([] if fact_id % 3 == 2 else [(fact_id % 2, fact_id)])


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny model that answers "Paris" to every prompt, two relations of 12 facts, their neuron files."""
    from transformers import BertForMaskedLM, BertTokenizerFast

    root = tmp_path_factory.mktemp("edit-study")
    model_dir = build_tiny_bert(root / "model")
    model = BertForMaskedLM.from_pretrained(model_dir)
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_output_embeddings().bias[tokenizer.convert_tokens_to_ids("Paris")] += 30.0
    model.save_pretrained(model_dir)
    args: list[str] = []
    for relation, templates in TEMPLATES.items():
        rows = [
            (relation, "label", "N-1", f, s, o, t, template, template.replace("[X]", s).replace("[Y]", "[MASK]"))
            for f, (s, o) in enumerate(zip(SUBJECTS, OBJECTS))
            for t, template in enumerate(templates)
        ]
        columns = ["relation", "relation_label", "lama_type", "fact_id", "subject", "object", "template_id", "template", "prompt"]
        data_path = root / "data" / f"{relation}.parquet"
        data_path.parent.mkdir(exist_ok=True)
        pd.DataFrame(rows, columns=columns).to_parquet(data_path)
        neurons = [(relation, "ig", f, layer, unit, k) for f in range(len(SUBJECTS)) for k, (layer, unit) in enumerate(fact_neurons(f))]
        neurons += [(relation, "base", 0, 0, 1, 0)]  # another method's rows are ignored
        neuron_path = root / "neurons" / f"{relation}.parquet"
        neuron_path.parent.mkdir(exist_ok=True)
        pd.DataFrame(neurons, columns=["relation", "method", "fact_id", "layer", "neuron", "order"]).to_parquet(neuron_path)
        args += ["--in", f"data:{relation}={data_path}", "--in", f"neurons:{relation}={neuron_path}"]
    overrides = [
        "model.source=pretrained", f"model.path={model_dir}", f"results_dir={root}", "study.facts_per_relation=null",
        "data.relations=[P101,P19]", "edit.edits_per_relation=3", "edit.max_attempts=60", "edit.kn_filter=paper",
        "device=cpu", "erase.relations=[P19,P27]", "erase.top_k=2",
    ]
    return {"root": root, "model_dir": model_dir, "inputs": args, "overrides": overrides}


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_update_stage(study: dict, out: Path) -> dict[str, Path]:
    outputs = {"update": out / "update.parquet", "summary_csv": out / "update_summary.csv", "summary_md": out / "update_summary.md"}
    argv = [*study["inputs"], *[f"--out={k}={v}" for k, v in outputs.items()], *study["overrides"]]
    run_stage(stage.main, argv)
    return outputs


def test_update_stage_outputs_and_accounting(study, tmp_path):
    model_files = tree_digest(study["model_dir"])
    outputs = run_update_stage(study, tmp_path / "a")
    assert tree_digest(study["model_dir"]) == model_files  # edits never reach the model on disk

    edits = read_parquet(outputs["update"])
    summary = pd.read_csv(outputs["summary_csv"])
    assert set(edits["method"]) == {"kn", "random"}
    assert read_provenance(outputs["update"])["config"]["edit"]["kn_filter"] == "paper"
    kn = edits[edits["method"] == "kn"]
    # only facts whose object the model answers (Paris) can be edited; the shared neuron is filtered out
    assert (kn["object"] == "Paris").all() and (kn["new_object"] != "Paris").all()
    assert not kn["neurons"].str.contains("1:63").any()
    assert all(fact_neurons(f)[1:] == [tuple(map(int, n.split(":")))] for f, n in zip(kn["fact_id"], kn["neurons"]))
    assert (edits["pred_before"] == "Paris").all()
    assert (~edits["success"] | edits["change"]).all()  # a success is always a change (t' != gold)

    per_relation = summary[summary["scope"] != "all"]
    skipped = per_relation[[c for c in summary.columns if c.startswith("skipped_")]].sum(axis=1)
    assert (per_relation["attempts"] == per_relation["edits"] + skipped).all()
    overall = summary[summary["scope"] == "all"].set_index("method")
    assert overall.loc["kn", "edits"] == len(kn) == 6  # 3 per relation
    assert overall.loc["kn", "skipped_no_kn"] > 0 and overall.loc["kn", "skipped_incorrect_answer"] > 0
    assert overall.loc["kn", "change_rate"] == pytest.approx(kn["change"].mean())
    assert "incorrect_answer" in outputs["summary_md"].read_text()


def test_update_stage_is_deterministic(study, tmp_path):
    first = run_update_stage(study, tmp_path / "a")
    second = run_update_stage(study, tmp_path / "b")
    pd.testing.assert_frame_equal(read_parquet(first["update"]), read_parquet(second["update"]))
    assert first["summary_csv"].read_bytes() == second["summary_csv"].read_bytes()


def test_update_stage_rejects_mismatched_inputs(study, tmp_path):
    argv = [*study["inputs"][:2], "--out", f"update={tmp_path / 'u.parquet'}", *study["overrides"]]
    with pytest.raises(SystemExit, match="no --in neurons:<key>=PATH"):
        run_stage(stage.main, argv)
