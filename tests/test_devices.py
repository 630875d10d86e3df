"""One GPU per running job (kn.devices), tested on a CPU machine with a faked device list, and the
``device`` config honoured by every stage that runs the model."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kn.devices import DeviceError, claim_gpu_slot, gpu_ids, resolve_device
from kn.stages.sections import MODEL_STAGE, SECTIONS

from .snakemake_runs import REPO, offline_env

CLAIM = textwrap.dedent("""
    import sys, time
    from kn.devices import claim_gpu_slot, gpu_ids
    slot = claim_gpu_slot(gpu_ids(), poll=0.05)
    print(slot.gpu_id, time.time(), flush=True)
    time.sleep(float(sys.argv[1]))
""")


def claim_in_processes(n: int, hold: float, env: dict[str, str]) -> list[tuple[str, float]]:
    """Start ``n`` processes that each claim a slot and hold it ``hold`` s; (gpu id, seconds until claimed) each."""
    started = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, str(hold)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    claims = []
    for proc in procs:
        gpu, when = proc.stdout.readline().split()
        claims.append((gpu, float(when) - started))
    for proc in procs:
        proc.wait(timeout=60)
        assert proc.returncode == 0
    return claims


def test_concurrent_jobs_claim_distinct_gpus(tmp_path: Path) -> None:
    env = offline_env(KN_GPU_IDS="4,5,7", KN_GPU_LOCK_DIR=str(tmp_path))
    claims = claim_in_processes(3, 2.0, env)
    assert sorted(gpu for gpu, _ in claims) == ["4", "5", "7"]  # three jobs at once: three different GPUs


def test_a_fourth_job_waits_for_a_free_gpu_and_crashed_jobs_free_theirs(tmp_path: Path) -> None:
    env = offline_env(KN_GPU_IDS="0,1", KN_GPU_LOCK_DIR=str(tmp_path))
    claims = claim_in_processes(3, 1.5, env)
    waited = sorted(claims, key=lambda claim: claim[1])
    assert {gpu for gpu, _ in waited[:2]} == {"0", "1"}  # the first two claims take both GPUs
    assert waited[2][1] - waited[0][1] >= 1.4  # the third job waited until one of them ended (1.5 s hold)
    killed = subprocess.Popen([sys.executable, "-c", CLAIM, "60"], env=env, stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().split()[0] == "0"
    killed.kill()
    killed.wait()
    assert claim_in_processes(1, 0.0, env)[0][0] == "0"  # the kernel released the killed job's lock


def test_gpu_ids_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KN_GPU_IDS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert gpu_ids(8) == ["2", "3"]
    monkeypatch.setenv("KN_GPU_IDS", "5")
    assert gpu_ids(8) == ["5"]
    monkeypatch.delenv("KN_GPU_IDS")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_ids(2) == ["0", "1"]
    with pytest.raises(DeviceError, match="no GPU id is known"):
        claim_gpu_slot([])


def test_device_config_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")
    # pretend a 2-GPU machine: auto and cuda claim a slot, cpu stays on the CPU, SLURM jobs take their own cuda:0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("KN_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.delenv("KN_GPU_IDS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:1")  # this process already holds slot 0
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert resolve_device("cuda") == torch.device("cuda:0")


def test_every_rule_that_runs_the_model_passes_device_and_requests_a_gpu() -> None:
    """A stage that loads the model reads the ``device`` section, and its rule asks for ``gpu=GPU``."""
    model_stages = {path.stem for path in (REPO / "src" / "kn" / "stages").glob("*.py")
                    if path.stem != "cli" and "load_model(" in path.read_text()}
    assert model_stages and model_stages <= {stage for stage, sections in SECTIONS.items()
                                             if sections is not None and set(MODEL_STAGE) <= set(sections)}
    rules = "\n".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    for stage in model_stages:
        rule = re.search(rf"rule {stage}:\n(.*?)(?=\nrule |\Z)", rules, flags=re.S)
        assert rule and "gpu=GPU" in rule.group(1) and f'stage_args("{stage}")' in rule.group(1), stage
