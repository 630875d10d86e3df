"""Every documented config path composes, round-trips through the stage CLIs' key=value params,
and builds the Snakemake DAG: each file under conf/experiment/ and conf/model/, and every key
documented as nullable set to null on the command line."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kn.config import compose_config, conf_dir, flatten_overrides, to_container
from kn.data.pararel import fact_counts

from .snakemake_runs import REPO, run_snakemake

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
NULLABLE = [  # keys conf/ documents as accepting null
    "data.max_facts_per_relation",
    "study.facts_per_relation",
    "model.layer_norm_eps",
    "model.train.target_accuracy",
    "sweep.only",
]


def required_overrides(model: str, tmp_path: Path) -> list[str]:
    """What a user must add for a model group: a weights directory for pretrained models."""
    cfg = compose_config([f"model={model}"] if model != "hf" else ["model=hf", "model.name=x", "model.path=x"])
    if cfg.model.source == "trained":
        return []
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    name = ["model.name=my-model"] if model == "hf" else []
    return [*name, f"model.path={weights}"]


def assert_round_trip(overrides: list[str]) -> None:
    """The Snakefile hands stages every section as key=value; re-composing them gives the same config."""
    cfg = compose_config(overrides)
    sections = [key for key in cfg.keys() if key != "sweep"]  # sweep variants are passed as the user's own overrides
    again = compose_config(flatten_overrides(cfg, sections))
    for section in sections:
        assert to_container(OmegaConf.select(again, section)) == to_container(OmegaConf.select(cfg, section)), section


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_round_trips(experiment: str, tmp_path: Path) -> None:
    model = compose_config([f"experiment={experiment}", "model.path=x"]).model
    extra = [] if model.source == "trained" else [f"model.path={tmp_path}"]
    assert_round_trip([f"experiment={experiment}", *extra])


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_and_round_trips(model: str, tmp_path: Path) -> None:
    assert_round_trip([f"model={model}", *required_overrides(model, tmp_path)])


@pytest.mark.parametrize("key", NULLABLE)
def test_documented_nullable_keys_accept_null(key: str) -> None:
    cfg = compose_config([f"{key}=null"])
    assert OmegaConf.select(cfg, key, default="missing") is None
    parent = key.rsplit(".", 1)[0]
    flat = flatten_overrides(cfg, [parent])
    assert f"{key}=null" in flat
    assert OmegaConf.select(compose_config(flat), key, default="missing") is None


def test_paper_experiment_nulls_survive_flattening() -> None:
    """The bug users hit: experiment=paper sets caps to null, which the Snakefile then failed to pass on."""
    cfg = compose_config(["experiment=paper", "model.path=/models/bert-base-cased"])
    assert cfg.data.max_facts_per_relation is None and cfg.study.facts_per_relation is None
    flat = flatten_overrides(cfg, ["data.max_facts_per_relation", "study"])
    assert flat == ["data.max_facts_per_relation=null", "study.facts_per_relation=null"]


def test_unknown_section_is_still_an_error() -> None:
    from kn.config import ConfigError

    with pytest.raises(ConfigError, match="no section 'data.nope'"):
        flatten_overrides(compose_config([]), ["data.nope"])


def job_counts(stdout: str) -> dict[str, int]:
    """Snakemake's dry-run 'Job stats' table as {rule: count}."""
    table = stdout.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M)}


_DRY_RUNS: dict[tuple[str, ...], dict[str, int]] = {}


def dry_run(overrides: list[str], tmp_path: Path) -> dict[str, int]:
    """Job counts of ``snakemake -n`` (cached per overrides: the paper's DAG takes a while to build)."""
    key = tuple(o for o in overrides if not o.startswith("model.path="))
    if key not in _DRY_RUNS:
        result = run_snakemake([], [f"results_dir={tmp_path / 'results'}", *overrides], "-n", "--cores", "2", timeout=240)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        _DRY_RUNS[key] = job_counts(result.stdout)
    return _DRY_RUNS[key]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds_the_dag(experiment: str, tmp_path: Path) -> None:
    model = compose_config([f"experiment={experiment}", "model.path=x"]).model
    extra = [] if model.source == "trained" else [f"model.path={tmp_path}"]
    counts = dry_run([f"experiment={experiment}", *extra], tmp_path)
    assert counts["total"] >= 2


@pytest.mark.slow
@pytest.mark.parametrize("model", [m for m in MODELS if m != "kn-tiny"])  # kn-tiny: the default, built above
def test_every_model_builds_the_dag(model: str, tmp_path: Path) -> None:
    counts = dry_run([f"model={model}", *required_overrides(model, tmp_path), "data.relations=[P19]"], tmp_path)
    trained = compose_config([f"model={model}", *required_overrides(model, tmp_path)]).model.source == "trained"
    assert counts["attribute"] == 1 and ("train_model" in counts) == trained


@pytest.mark.slow
def test_paper_dry_run_matches_the_readme_shard_table(tmp_path: Path) -> None:
    """experiment=paper: one attribution job per 50 facts of every relation, as docs/scaling.md's table says."""
    counts = dry_run(["experiment=paper", f"model.path={tmp_path}"], tmp_path)
    cfg = compose_config(["experiment=paper", f"model.path={tmp_path}"])
    per = cfg.ig.facts_per_shard
    n_facts = fact_counts(Path(REPO / cfg.data.resources_dir), None)
    assert counts["attribute"] == sum(math.ceil(n / per) for n in n_facts.values())
    assert counts["refine"] == counts["evaluate"] == counts["distant"] == len(n_facts) == 34
    table = (REPO / "docs" / "scaling.md").read_text()
    header, jobs = [line for line in table.splitlines() if line.startswith("| `ig.facts_per_shard`") or
                    line.startswith("| attribution jobs")]
    leading = [re.match(r"\W*([\d,]+)", cell) for cell in header.split("|")]
    column = [m is not None and m.group(1) == str(per) for m in leading].index(True)
    assert jobs.split("|")[column].strip(" *").replace(",", "") == str(counts["attribute"])
