"""scripts/device_check.sh --cpu: the device check's every step at tiny sizes on the CPU, so the check that a
lent GPU runs (docs/gpu.md) cannot rot between the sessions that get one."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kn.data.pararel import build_bags
from kn.stages.sections import SECTIONS

from .snakemake_runs import REPO

pytestmark = pytest.mark.slow


def device_check_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_check", REPO / "scripts" / "device_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    work = tmp_path_factory.mktemp("device-check")
    out = work / "out"
    run = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--cpu", "--work", str(work), "--out", str(out)],
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    return json.loads((out / "device_check.json").read_text()), (out / "device_check.md").read_text(), out


def test_every_step_ran_and_every_check_passed(check: tuple[dict[str, Any], str, Path]) -> None:
    report, text, out = check
    assert set(report["steps"]) == {"install", "env", "standins", "agree", "timing", "pipeline"}
    assert all(step["rc"] == 0 and step["seconds"] <= step["limit"] for step in report["steps"].values())
    assert report["passed"] and all(c["pass"] for c in report["checks"])
    assert "**Verdict: PASS**" in text and "| FAIL |" not in text
    assert report["parts"]["env"]["kn_file"].startswith(report["steps"]["install"]["site"])
    assert "[device_check] == pipeline: exit 0" in (out / "device_check.log").read_text()


def test_the_same_computation_on_the_cpu_twice_agrees_and_bf16_differs(check: tuple[dict[str, Any], str, Path]) -> None:
    agree = check[0]["parts"]["agree"]
    shapes = check[0]["mode"]["shapes"]
    assert set(agree["sizes"]) == {"base", "large"}
    for size, found in agree["sizes"].items():
        assert found["layers"] == shapes[size][0] and found["ffn"] == shapes[size][2]
        fp32, bf16 = found["fp32"], found["bf16"]
        assert len(fp32["per_prompt_rel_diff"]) == found["prompts"]
        assert fp32["max_rel_diff"] == max(fp32["per_prompt_rel_diff"]) <= fp32["max_rel_diff_layer"] <= 1e-6
        assert fp32["top_sets_identical"] == found["prompts"] and fp32["top_set_jaccard_min"] == 1.0
        assert all(n > 0 for n in fp32["top_set_sizes"])
        assert bf16["finite"] and 0 < bf16["max_rel_diff"] < 1  # autocast changed the numbers, not beyond recognition
        assert bf16["max_rel_diff"] <= bf16["max_rel_diff_layer"]  # a layer's max is at most the prompt's


def test_timing_chooses_the_fastest_batch_and_projects_every_paper_prompt(check: tuple[dict[str, Any], str, Path]) -> None:
    timing = check[0]["parts"]["timing"]
    assert timing["paper_prompts"] == len(build_bags(REPO / "resources" / "pararel", "all", None)[0])
    for found in timing["sizes"].values():
        fp32 = [r for r in found["runs"] if r["dtype"] == "float32"]
        assert [r["batch_size"] for r in fp32] == check[0]["mode"]["batch_sizes"]
        assert found["prompts_per_s"] == max(r["prompts_per_s"] for r in fp32) > 0
        assert found["chosen_batch_size"] == max(fp32, key=lambda r: r["prompts_per_s"])["batch_size"]
        assert all(r["prompts"] / r["seconds"] == pytest.approx(r["prompts_per_s"]) for r in found["runs"])
        assert found["projected_hours"]["float32"] == pytest.approx(timing["paper_prompts"] / found["prompts_per_s"] / 3600)


def test_the_shrunk_paper_run_finished_with_every_model_job_on_the_cpu(check: tuple[dict[str, Any], str, Path]) -> None:
    pipeline = check[0]["parts"]["pipeline"]
    assert pipeline["returncode"] == 0 and Path(pipeline["summary_md"]).is_file()
    model_stages = {stage for stage, sections in SECTIONS.items() if sections and "device" in sections}
    assert set(pipeline["rule_jobs"]) == model_stages and all(n >= 1 for n in pipeline["rule_jobs"].values())
    assert sum(pipeline["rule_jobs"].values()) == len(pipeline["jobs"])
    for job in pipeline["jobs"]:
        assert job["devices"] == ["cpu"], job
        assert "loaded on device cpu" in Path(job["log"]).read_text()
    assert set(pipeline["provenance"]) >= {"attribute", "probe", "evaluate"}
    assert all(device == "cpu" for devices in pipeline["provenance"].values() for device in devices)


def test_the_verdict_fails_when_a_measured_value_is_off(check: tuple[dict[str, Any], str, Path]) -> None:
    """The checks judge the values: an fp32 disagreement, a job on another device or a missing stage fails them."""
    module = device_check_module()
    report = check[0]
    mode = module.mode_of(cpu=True)

    def failed(parts: dict[str, Any]) -> set[str]:
        return {c["check"] for c in module.checks(mode, parts, report["steps"]) if not c["pass"]}

    assert failed(report["parts"]) == set()
    parts = copy.deepcopy(report["parts"])
    parts["agree"]["sizes"]["large"]["fp32"]["max_rel_diff"] = 2 * module.FP32_LIMIT
    parts["pipeline"]["jobs"][0]["ok"] = False
    parts["pipeline"]["provenance"]["attribute"][0] = "cuda:0"
    parts["pipeline"]["rule_jobs"].pop("edit_erase")
    assert failed(parts) == {f"large: fp32 cpu vs CPU, max |diff| / the prompt's max |score| <= {module.FP32_LIMIT:g}",
                             "every model job loaded the model on cpu", "every parquet provenance names cpu",
                             "every model stage ran"}


def test_job_logs_are_read_through_snakemakes_summary(tmp_path: Path) -> None:
    module = device_check_module()
    logs = {name: tmp_path / f"{name}.log" for name in ("probe", "refine", "silent")}
    logs["probe"].write_text("... INFO kn: model /m loaded on device cuda:0\n")
    logs["refine"].write_text("no model here\n")
    logs["silent"].write_text("crashed before loading\n")
    text = "Building DAG of jobs...\noutput_file\tdate\trule\tlog-file(s)\tstatus\tplan\n" + "".join(
        f"{out}\t-\t{rule}\t{log}\tok\tno update\n"
        for out, rule, log in (("a.parquet", "probe", logs["probe"]), ("a.prompts.parquet", "probe", logs["probe"]),
                               ("n.parquet", "refine", logs["refine"]), ("e.parquet", "evaluate", logs["silent"])))
    jobs = module.job_devices(module.summary_rows(text), "cuda")
    assert [(j["rule"], j["devices"], j["ok"]) for j in jobs] == [("probe", ["cuda:0"], True), ("evaluate", [], False)]
    assert not module.job_devices(module.summary_rows(text), "cpu")[0]["ok"]
