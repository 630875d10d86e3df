"""The paper's own path, end to end: ``experiment=paper`` on a bert-base-cased-shaped stand-in, and
``model=hf`` on a RoBERTa stand-in, through every stage and the Snakemake report.

Real checkpoints cannot be downloaded here, so tests/standins.py writes folders that look
like them to the pipeline (random weights, realistic tokenizers). The runs are shrunk (two
relations, three studied facts each, small m) but take every rule a user with the real
weights would take, uncapped ingestion included. The BERT run also carries the provenance
check: a non-default ``ig.m`` must be findable from the attribute, refine and evaluate outputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
import yaml
from transformers import AutoTokenizer

from kn.data.pararel import build_bags
from kn.io import read_provenance

from .snakemake_runs import REPO, run_snakemake, PATH_RELATIONS, PATH_SHRINK, STAGE_OUTPUTS
from .standins import write_bert_standin, write_roberta_standin

pytestmark = pytest.mark.slow

RELATIONS, SHRINK = PATH_RELATIONS, PATH_SHRINK


def run_study(workdir: Path, overrides: list[str], model: str) -> Path:
    """Every target of the workflow, then the report; returns the results folder."""
    results = workdir / "results"
    everything = [f"results_dir={results}", *overrides, *SHRINK]
    run = run_snakemake([], everything, "--cores", "2", workdir=workdir, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = run_snakemake([], everything, "--report", str(workdir / "report.html"), workdir=workdir, timeout=300)
    assert report.returncode == 0, (report.stdout + report.stderr)[-4000:]
    for name in STAGE_OUTPUTS:
        path = results / name if name.startswith("data/") else results / model / name
        assert path.is_file(), f"{path} was not written"
    assert (workdir / "report.html").stat().st_size > 100_000
    return results


def multi_token_counts(tokenizer, one_token) -> tuple[int, int, int, int]:
    """(facts, facts whose object is several tokens, prompts, such prompts) over the ingested relations."""
    prompts, facts = build_bags(REPO / "resources" / "pararel", RELATIONS, None)
    dropped = ~facts["object"].map(lambda obj: one_token(tokenizer, obj))
    dropped_prompts = ~prompts["object"].map(lambda obj: one_token(tokenizer, obj))
    return len(facts), int(dropped.sum()), len(prompts), int(dropped_prompts.sum())


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("paper")
    standin = write_bert_standin(root / "bert-base-cased", RELATIONS)
    return run_study(root, ["experiment=paper", f"model.path={standin}"], "bert-base-cased"), standin


def test_paper_experiment_runs_every_stage_and_counts_multi_token_objects(bert_run: tuple[Path, Path]) -> None:
    results, standin = bert_run
    tokenizer = AutoTokenizer.from_pretrained(standin)
    facts, dropped, prompts, dropped_prompts = multi_token_counts(tokenizer, lambda t, obj: obj in t.get_vocab())
    assert 0 < dropped < facts  # the stand-in splits some objects, as any vocabulary but the paper's would
    summary = (results / "bert-base-cased" / "summary.md").read_text()
    assert (f"{dropped} of {facts} ingested facts ({dropped_prompts} of {prompts} prompts) are left out" in summary)
    accuracy = pd.read_csv(results / "bert-base-cased" / "probe" / "accuracy.csv").set_index("relation")
    assert accuracy.loc["mean", "skipped_facts"] == dropped
    # the paper's ingestion is uncapped: every LAMA fact of the two relations
    assert accuracy.loc["mean", "facts"] == facts


def test_provenance_names_the_config_each_job_ran_under(bert_run: tuple[Path, Path]) -> None:
    """ig.m=4 (not the default 20): attribute received it; refine and evaluate, which do not read it,
    name the run's whole-config file, which holds it."""
    results, _ = bert_run
    model_dir = results / "bert-base-cased"
    attribute = read_provenance(model_dir / "attributions" / "P19" / "000.parquet")
    assert attribute["config"]["ig"]["m"] == 4 and "refine" not in attribute["config"]
    for output in (model_dir / "attributions" / "P19" / "000.parquet", model_dir / "neurons" / "P19.parquet",
                   model_dir / "evaluate" / "P19.parquet"):
        record = read_provenance(output)
        run_config = results.parent / record["run_config"]["path"]
        text = run_config.read_text()
        assert hashlib.sha256(text.encode()).hexdigest() == record["run_config"]["sha256"]
        assert yaml.safe_load(text)["ig"]["m"] == 4, output
    refine = read_provenance(model_dir / "neurons" / "P19.parquet")
    assert set(refine["config"]) == {"seed", "refine", "ig"} and refine["config"]["ig"] == {"storage_ratio": 0.1}


def test_hf_roberta_standin_runs_every_stage(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("roberta")
    standin = write_roberta_standin(root / "roberta-base", RELATIONS)
    results = run_study(root, ["model=hf", "model.name=roberta-standin", f"model.path={standin}",
                               "data.max_facts_per_relation=null"], "roberta-standin")
    tokenizer = AutoTokenizer.from_pretrained(standin)
    facts, dropped, prompts, dropped_prompts = multi_token_counts(
        tokenizer, lambda t, obj: len(t.tokenize(" " + obj)) == 1 or obj in t.get_vocab())
    summary = (results / "roberta-standin" / "summary.md").read_text()
    assert f"{dropped} of {facts} ingested facts ({dropped_prompts} of {prompts} prompts) are left out" in summary
