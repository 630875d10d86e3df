"""Causal LMs through the same rules, configs and report (docs/causal.md), end to end with Snakemake:

* ``model=hf model.path=<GPT-2 stand-in>``: every stage and the report;
* ``model=hf model.path=<GPT-NeoX / Llama stand-in>``: attribute -> refine -> evaluate (Llama with the opt-in
  sequence target);
* ``experiment=causal``: every stage on kn-tiny-gpt (trained by the train_model rule, briefly), with kn-tiny's
  masked study run beside it (config key compare) and shown in the summary.

Stand-ins are random weights behind BPE tokenizers trained on ParaRel (tests/standins.py); runs are shrunk to
two relations and three studied facts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kn.io import read_provenance
from kn.tables import PROBE_CAUSAL

from .snakemake_runs import REPO, run_snakemake, PATH_RELATIONS, PATH_SHRINK, STAGE_OUTPUTS
from .standins import write_causal_standin

pytestmark = pytest.mark.slow

RELATIONS, SHRINK = PATH_RELATIONS, PATH_SHRINK


def run(workdir: Path, overrides: list[str], targets: list[str] | None = None, report: bool = True) -> Path:
    results = workdir / "results"
    everything = [f"results_dir={results}", *overrides, *SHRINK]
    done = run_snakemake(targets or [], everything, "--cores", "2", workdir=workdir, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    if report:
        built = run_snakemake([], everything, "--report", str(workdir / "report.html"), workdir=workdir, timeout=300)
        assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
    return results


def assert_causal_study(results: Path, model: str) -> None:
    for name in STAGE_OUTPUTS:
        path = results / name if name.startswith("data/") else results / model / name
        assert path.is_file(), f"{path} was not written"
    probe = pd.read_parquet(results / model / "probe" / "P19.parquet")
    assert list(probe.columns) == PROBE_CAUSAL.columns
    assert read_provenance(results / model / "attributions" / "P19" / "000.parquet")["kind"] == "causal"
    accuracy = pd.read_csv(results / model / "probe" / "accuracy.csv").set_index("relation")
    assert accuracy.loc["P19", "templates"] == 13 and accuracy.loc["P937", "templates_ending_in_y"] == 5
    summary = (results / model / "summary.md").read_text()
    assert "Causal LM (docs/causal.md)" in summary and "| Suppress (×0)" in summary


def test_hf_gpt2_standin_probes_attributes_and_edits(tmp_path_factory: pytest.TempPathFactory) -> None:
    """model=hf on a GPT-2 folder (every stage of a causal study runs in the experiment=causal test below)."""
    root = tmp_path_factory.mktemp("gpt2")
    standin = write_causal_standin("gpt2", root / "gpt2-standin", RELATIONS)
    results = root / "results"  # model.name defaults to the folder's name
    targets = [str(results / "gpt2-standin" / name) for name in
               ("probe/accuracy.csv", "evaluate/summary.csv", "edit/update_summary.md", "localise/ceiling.csv")]
    run(root, ["model=hf", f"model.path={standin}"], targets=targets, report=False)
    assert read_provenance(results / "gpt2-standin" / "attributions" / "P19" / "000.parquet")["kind"] == "causal"
    update = (results / "gpt2-standin" / "edit" / "update_summary.md").read_text()
    assert "token vectors: input embeddings (tied to the output layer)" in update
    multi = pd.read_csv(results / "gpt2-standin" / "probe" / "accuracy.csv").set_index("relation")
    assert multi.loc["mean", "multi_token_facts"] > 0  # BPE splits rare objects; they are scored by first token


@pytest.mark.parametrize("kind,extra", [("gpt_neox", []), ("llama", ["causal.target=sequence"])])
def test_hf_causal_standins_attribute_refine_evaluate(kind: str, extra: list[str],
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp(kind)
    standin = write_causal_standin(kind, root / f"{kind}-standin", RELATIONS)
    model = f"{kind}-standin"
    results = root / "results"
    targets = [str(results / model / "evaluate" / "summary.csv"), str(results / model / "analysis" / "kn_stats.json")]
    run(root, ["model=hf", f"model.path={standin}", *extra], targets=targets, report=False)
    effects = pd.read_csv(results / model / "evaluate" / "summary.csv")
    assert set(effects["method"]) == {"ig", "base", "random"} and effects["ratio"].notna().any()
    record = read_provenance(results / model / "attributions" / "P19" / "000.parquet")
    assert record["kind"] == "causal" and record["config"]["causal"]["target"] == ("sequence" if extra else "first_token")
    shard = pd.read_parquet(results / model / "attributions" / "P19" / "000.prompts.parquet")
    assert (shard["gold_id"] >= 0).all() and shard["gold_prob"].between(0, 1).all()


def test_experiment_causal_studies_kn_tiny_gpt_beside_kn_tiny(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("causal")
    brief = ["model.train.max_steps=40", "model.train.eval_every=20", "model.train.eval_sample=64",
             "data.max_facts_per_relation=4"]  # kept for the companion kn-tiny run too (compare)
    results = run(root, ["experiment=causal", *brief])
    assert_causal_study(results, "kn-tiny-gpt")
    card = (results / "kn-tiny-gpt" / "model_card.md").read_text()
    assert "A GPT-2 causal language model" in card and "Steps: 40" in card
    assert (results / "kn-tiny" / "summary.csv").is_file()  # the masked organism's study, run beside it
    assert "A BERT masked language model" in (results / "kn-tiny" / "model_card.md").read_text()
    summary = (results / "kn-tiny-gpt" / "summary.md").read_text()
    assert "## Beside `kn-tiny`" in summary and "| kn-tiny (IG) |" in summary.replace("kn-tiny-gpt (IG) | ", "")
    assert "Vocabulary coverage of `kn-tiny`'s tokenizer: Objects that are not one token of this tokenizer: 0 of" in summary
    assert "Beside kn-tiny" in (results / "kn-tiny-gpt" / "summary.html").read_text()
