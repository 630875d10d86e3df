"""One run of refine -> evaluate -> evaluate_summary and kn_analysis on the hand-wired fact model.

A session fixture shared by the stage tests of those four stages (import ``evaluation_run``
into a test module to use it). Attribution shards are written in the docs/CONTRACTS.md
format from kn.attribution, so the run exercises every file contract these stages read.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kn.attribution import attribute_prompts
from kn.models import adapter_for, load_masked_lm
from kn.tables import SCORES, SHARD_PROMPTS
from kn.stages import evaluate, evaluate_summary, kn_analysis, refine
from kn.stages.cli import run_stage
from tests.fact_model import TEMPLATES, build_fact_model

RELATIONS = {
    "P1": [("Paris", "France"), ("Berlin", "Germany")],
    "P2": [("Rome", "Italy"), ("Madrid", "Spain"), ("London", "England")],
}
SUMMARY_OUTPUTS = {
    "json": "summary.json", "csv": "summary.csv", "markdown": "summary.md", "dose_csv": "dose_response.csv",
    "suppress_png": "suppress.png", "suppress_pdf": "suppress.pdf", "amplify_png": "amplify.png",
    "amplify_pdf": "amplify.pdf", "dose_png": "dose_response.png", "dose_pdf": "dose_response.pdf",
}


def stage_config(model_dir: Path) -> list[str]:
    """Overrides every stage of the run gets: the fact model, all facts studied, small dose/bootstrap."""
    return ["model.source=pretrained", f"model.path={model_dir}", "model.name=fact", "study.facts_per_relation=null",
            "evaluate.dose_ks=[1,2,50]", "evaluate.bootstrap=50", "analysis.inter_draws=3"]


def relation_table(relation: str) -> pd.DataFrame:
    rows = [(relation, "label", "N-1", f, s, o, t, template, template.replace("[X]", s).replace("[Y]", "[MASK]"))
            for f, (s, o) in enumerate(RELATIONS[relation]) for t, template in enumerate(TEMPLATES)]
    return pd.DataFrame(rows, columns=["relation", "relation_label", "lama_type", "fact_id", "subject", "object",
                                       "template_id", "template", "prompt"])


def write_attribution(model, tokenizer, prompts: pd.DataFrame, scores_path: Path, prompts_path: Path) -> None:
    """One attribution shard + prompt table as the attribute stage writes them (docs/CONTRACTS.md)."""
    relation = str(prompts["relation"].iloc[0])
    scores, table = attribute_prompts(model, tokenizer, prompts, relation, m=20, alpha_rule="left", target="gold",
                                      batch_size=64, dtype="float32", storage_ratio=0.1)
    adapter = adapter_for(model)
    record = {"n_layers": adapter.n_layers, "ffn_size": adapter.ffn_size}
    SCORES.write(scores_path, scores, record)
    SHARD_PROMPTS.write(prompts_path, table, record)


def shard_args(root: Path, relation: str) -> list[str]:
    return [f"--in=scores:000={root}/attributions/{relation}/000.parquet",
            f"--in=prompts:000={root}/attributions/{relation}/000.prompts.parquet"]


@pytest.fixture(scope="session")
def evaluation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    model_dir = build_fact_model(root / "model")
    model, tokenizer = load_masked_lm(model_dir)
    config = stage_config(model_dir)
    for relation in RELATIONS:
        table = relation_table(relation)
        table.to_parquet(root / f"data_{relation}.parquet")
        write_attribution(model, tokenizer, table, root / "attributions" / relation / "000.parquet",
                          root / "attributions" / relation / "000.prompts.parquet")
        run_stage(refine.main, ["--relation", relation, *shard_args(root, relation),
                                          f"--out=neurons={root}/neurons/{relation}.parquet",
                                          f"--out=summary={root}/neurons/{relation}.json", *config])
    data = [f"--in=data:{r}={root}/data_{r}.parquet" for r in RELATIONS]
    for relation in RELATIONS:
        run_stage(evaluate.main, ["--relation", relation, f"--in=neurons={root}/neurons/{relation}.parquet",
                                              *shard_args(root, relation), *data,
                                              f"--out=results={root}/evaluate/{relation}.parquet",
                                              f"--out=dose={root}/evaluate/{relation}.dose.parquet", *config])
    run_stage(evaluate_summary.main, [
        *[f"--in=results:{r}={root}/evaluate/{r}.parquet" for r in RELATIONS],
        *[f"--in=dose:{r}={root}/evaluate/{r}.dose.parquet" for r in RELATIONS],
        *[f"--out={name}={root}/summary/{file}" for name, file in SUMMARY_OUTPUTS.items()], *config])
    analysis_outputs = {"stats": "json", "table": "csv", "markdown": "md", "per_relation": "csv", "layers": "csv",
                        "figure_png": "png", "figure_pdf": "pdf"}
    run_stage(kn_analysis.main, [
        *[f"--in=neurons:{r}={root}/neurons/{r}.parquet" for r in RELATIONS],
        *[f"--in=record:{r}={root}/neurons/{r}.json" for r in RELATIONS],
        *[f"--out={name}={root}/analysis/{name}.{ext}" for name, ext in analysis_outputs.items()], *config])
    return root
