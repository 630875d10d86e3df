"""Bad input stops the run with one clear message that names the culprit and the fix.

Each case goes through what the user runs: a stage CLI (``kn.stages.cli.run_stage``, as
Snakemake calls it) or ``snakemake`` itself, and checks the message the user reads.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kn.config import ConfigError, compose_config
from kn.data.pararel import build_bags
from kn.io import read_parquet, write_parquet
from kn.schema import fraction_keys
from kn.stages import attribute, ingest_relation, probe
from kn.stages.cli import run_stage

from .conftest import RESOURCES
from .snakemake_runs import REPO, offline_env, run_snakemake


def _stage_error(main, argv: list[str]) -> str:
    """The one line a stage CLI exits with."""
    with pytest.raises(SystemExit) as info:
        run_stage(main, argv)
    return str(info.value.code)


# --- malformed resource files -------------------------------------------------------------


def test_malformed_pattern_file_reaches_the_cli_user(broken_patterns: Path, tmp_path: Path) -> None:
    out = tmp_path / "P101.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "kn.stages.ingest_relation", "--relation", "P101", "--out", f"prompts={out}",
         f"data.resources_dir={broken_patterns}"],
        cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "P101.jsonl:2: malformed JSON line" in last_line
    assert 'expected {"pattern": ...}' in last_line and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_malformed_pattern_file_stops_snakemake_before_any_job(broken_patterns: Path, tmp_path: Path) -> None:
    result = run_snakemake(
        [], [f"results_dir={tmp_path / 'results'}", f"data.resources_dir={broken_patterns}"], "-n", timeout=120
    )
    assert result.returncode != 0
    assert "P101.jsonl:2: malformed JSON line" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


def test_fact_file_that_is_not_json_is_named(tmp_path: Path) -> None:
    root = tmp_path / "pararel"
    shutil.copytree(RESOURCES, root, ignore=shutil.ignore_patterns("*.gz"))
    (root / "query_pairs.json").write_text('{"P101": [["Alan Turing", "logic"],\n')
    message = _stage_error(ingest_relation.main, ["--relation", "P101", "--out", f"prompts={tmp_path / 'x.parquet'}",
                                         f"data.resources_dir={root}"])
    assert "query_pairs.json:2: malformed JSON" in message


# --- relations and fact selection ---------------------------------------------------------


def test_unknown_relation_lists_the_valid_ids(tmp_path: Path) -> None:
    message = _stage_error(ingest_relation.main, ["--relation", "P9999", "--out", f"prompts={tmp_path / 'x.parquet'}"])
    assert "unknown relation(s) ['P9999']" in message and "valid ids: P101 P103" in message


@pytest.mark.slow
def test_unknown_relation_stops_snakemake(tmp_path: Path) -> None:
    result = run_snakemake([], [f"results_dir={tmp_path}", "data.relations=[P101,P9999]"], "-n", timeout=120)
    assert result.returncode != 0
    assert "unknown relation(s) ['P9999'] in data.relations; valid ids: P101" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.max_facts_per_relation=0", "'data.max_facts_per_relation' = 0 selects no facts"),
        ("study.facts_per_relation=0", "'study.facts_per_relation' = 0 selects no facts"),
        ("data.relations=[]", "'data.relations' is empty: no facts selected"),
    ],
)
def test_empty_selection_of_facts(override: str, expected: str, tmp_path: Path) -> None:
    message = _stage_error(ingest_relation.main, ["--relation", "P101", "--out", f"prompts={tmp_path / 'x.parquet'}", override])
    assert expected in message


def test_relations_of_the_wrong_type() -> None:
    with pytest.raises(ConfigError, match=r"'data.relations' = \['P101', 5\]; expected 'all' or a list of relation ids"):
        compose_config(["data.relations=[P101,5]"])


# --- config keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("ig.m=abc", "config key 'ig.m': Value 'abc' of type 'str' could not be converted to Integer; its default is 20"),
        ("ig.m=null", "config key 'ig.m': Incompatible value 'None' for field of type 'int'"),
        ("ig.storage_ratio=high", "config key 'ig.storage_ratio': Value 'high' of type 'str' could not be converted to Float"),
        ("ig.mm=3", "unknown config key 'ig.mm'; did you mean 'ig.m'? Valid keys under 'ig': m, alpha_rule"),
        ("igg.m=3", "unknown config key 'igg.m'; did you mean 'ig.m'? Valid keys at the top level"),
        ("model.train.lrr=0.1", "unknown config key 'model.train.lrr'; did you mean 'model.train.lr'?"),
        ("+ig.foo=1", "unknown config key 'ig.foo'. Valid keys under 'ig'"),
        ("ig.dtype=float16", "config key 'ig.dtype' = 'float16'; expected one of ['bfloat16', 'float32']"),
        ("ig.facts_per_shard=0", "config key 'ig.facts_per_shard' = 0; expected >= 1"),
        ("sweep.cores_per_variant=0", "config key 'sweep.cores_per_variant' = 0; expected >= 1"),
    ],
)
def test_bad_config_key_is_named_by_the_stage_cli(override: str, expected: str, tmp_path: Path) -> None:
    message = _stage_error(ingest_relation.main, ["--relation", "P101", "--out", f"prompts={tmp_path / 'x.parquet'}", override])
    assert message.startswith("config error: ") and expected in message
    assert "full_key" not in message and "+ig.mm" not in message  # no OmegaConf debug lines, no Hydra '+' advice


def test_bad_key_in_a_yaml_file_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    with open(conf / "experiment" / "default.yaml", "a", encoding="utf-8") as handle:
        handle.write("refine:\n  tt: 0.3\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KN_CONF_DIR", str(conf))
        with pytest.raises(ConfigError, match=r"unknown config key 'refine.tt'; did you mean 'refine.t'\?"):
            compose_config([])


def test_unset_mandatory_key_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"config key 'model.path' has no value .*model.path=\.\.\."):
        compose_config(["model=hf", "model.name=tiny"])


FRACTIONS = fraction_keys()
THRESHOLDS = ("ig.storage_ratio", "refine.t", "refine.t_base")


def test_the_fraction_keys_are_the_configs() -> None:
    cfg = compose_config([])
    assert {"refine.t", "refine.p", "ig.storage_ratio", "distant.max_unk_share"} <= set(FRACTIONS)
    for key in FRACTIONS:  # each names a key of the composed config (null only where the key is optional)
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key


@pytest.mark.parametrize("value", [1.5, -0.1])
@pytest.mark.parametrize("key", sorted(FRACTIONS))
def test_a_fraction_out_of_range_names_the_key_and_its_range(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config([f"{key}={value}"])
    assert str(info.value) == f"config key {key!r} = {value}; expected a fraction, {FRACTIONS[key]}"


@pytest.mark.parametrize("key", sorted(FRACTIONS))
def test_a_fractions_open_ends_are_enforced(key: str) -> None:
    allowed = FRACTIONS[key]
    for end, is_open in ((0, allowed.low_open), (1, allowed.high_open)):
        overrides = [f"{key}={end}"]
        if key in THRESHOLDS and end == 1:  # thresholds must stay >= the stored ratio
            overrides = [f"{k}=1" for k in THRESHOLDS]
        if is_open:
            with pytest.raises(ConfigError, match=f"config key '{key}' = {end}; expected a fraction"):
                compose_config(overrides)
        else:
            compose_config(overrides)


@pytest.mark.slow
def test_a_fraction_out_of_range_stops_snakemake(tmp_path: Path) -> None:
    result = run_snakemake([], [f"results_dir={tmp_path}", "refine.t=1.5"], "-n", timeout=120)
    assert result.returncode != 0
    assert "config key 'refine.t' = 1.5; expected a fraction, 0 < value <= 1" in result.stdout + result.stderr


def test_threshold_below_the_stored_floor_names_both_keys_and_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(["refine.t=0.05", "ig.storage_ratio=0.1"])
    message = str(info.value)
    assert "'refine.t' = 0.05 is below ig.storage_ratio = 0.1" in message
    assert "Use refine.t >= 0.1 or rerun attribution with a lower ig.storage_ratio" in message
    compose_config(["refine.t=0.05", "ig.storage_ratio=0.05"])  # lowering the floor makes it valid


# --- model and tokenizer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def p937_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """P937's first 4 facts as the ingest stage writes them: London, Paris, Madrid, Gloucester."""
    prompts, _ = build_bags(RESOURCES, ["P937"], max_facts_per_relation=4)
    path = tmp_path_factory.mktemp("data") / "P937.parquet"
    write_parquet(path, prompts)
    return path


def _attribute_argv(data: Path, out: Path, model_path: Path | str, shard: int) -> list[str]:
    return [
        "--relation", "P937", "--shard", str(shard), "--in", f"data={data}",
        "--out", f"scores={out / 'scores.parquet'}", "--out", f"prompts={out / 'prompts.parquet'}",
        "model=hf", "model.name=tiny", f"model.path={model_path}", "data.max_facts_per_relation=4",
        "study.facts_per_relation=4", "ig.m=2", "ig.facts_per_shard=2",
    ]


def test_model_path_that_does_not_exist(p937_data: Path, tmp_path: Path) -> None:
    message = _stage_error(attribute.main, _attribute_argv(p937_data, tmp_path, tmp_path / "no-such-model", 0))
    assert f"error: model path '{tmp_path / 'no-such-model'}' does not exist" in message
    assert "set model.path to a directory written by save_pretrained()" in message
    assert not (tmp_path / "scores.parquet").exists()


def test_model_without_a_masked_lm_head(p937_data: Path, tmp_path: Path, tiny_bert_dir: Path) -> None:
    from transformers import BertModel

    headless = tmp_path / "headless"
    BertModel.from_pretrained(tiny_bert_dir).save_pretrained(headless)  # encoder only, no cls.* head
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_bert_dir / name).exists():
            shutil.copy(tiny_bert_dir / name, headless / name)
    message = _stage_error(attribute.main, _attribute_argv(p937_data, tmp_path, headless, 0))
    assert f"'{headless}' has no trained masked-LM head (missing ['cls.predictions" in message
    assert "saved from a *ForMaskedLM / *ForPreTraining model" in message


def test_multi_token_objects_are_skipped_and_counted(
    p937_data: Path, tmp_path: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_stage(attribute.main, _attribute_argv(p937_data, tmp_path, tiny_bert_dir, 1))  # facts 2, 3
    table = read_parquet(tmp_path / "prompts.parquet")
    skipped = table[table["gold_id"] == -1]
    assert set(skipped["fact_id"]) == {3} and len(skipped) == 5  # Gloucester: one row per template, kept, marked
    assert (table.loc[table["fact_id"] == 2, "gold_id"] >= 0).all()  # Madrid is one token: attributed
    scores = read_parquet(tmp_path / "scores.parquet")
    assert set(scores["fact_id"]) == {2}
    assert "5 prompts skipped: object(s) not one token of this vocabulary: ['Gloucester']" in capsys.readouterr().err


def test_probe_skips_and_counts_multi_token_objects(
    p937_data: Path, tmp_path: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "probe.parquet"
    run_stage(probe.main, ["--relation", "P937", "--in", f"data={p937_data}", "--out", f"probe={out}",
                                    "model=hf", "model.name=tiny", f"model.path={tiny_bert_dir}"])
    table = read_parquet(out)
    assert set(table.loc[table["skipped"], "fact_id"]) == {3} and int(table["skipped"].sum()) == 5
    assert (table.loc[table["skipped"], "gold_id"] == -1).all() and not table.loc[table["skipped"], "correct"].any()
    err = capsys.readouterr().err
    assert "5 of 20 prompts skipped: objects not one token: ['Gloucester']" in err
    assert "P937: 20 prompts" in err and "5 skipped (object not one token)" in err
