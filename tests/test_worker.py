"""kn.worker: a job run through the persistent worker is the job run cold (same outputs, exit status,
error line), it reports its usage, it dies with its client, and the server is keyed by what it imported."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kn import worker
from kn.data.pararel import build_bags
from kn.io import write_parquet
from kn.models.training import TRAINING_RECORD

from .conftest import RESOURCES
from .snakemake_runs import REPO, offline_env


@pytest.fixture(scope="module")
def worker_env() -> dict[str, str]:
    """A private worker folder (short: a socket path has ~100 characters at most) and a short idle time."""
    folder = tempfile.mkdtemp(prefix="knwt")
    yield offline_env(KN_WORKER_DIR=folder, KN_WORKER_IDLE="30")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory, tiny_bert_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worker")
    model = root / "model"
    shutil.copytree(tiny_bert_dir, model)
    (model / TRAINING_RECORD).write_text(json.dumps({"heldout_templates": {"P101": [2, 5]}}))
    prompts, _ = build_bags(RESOURCES, ["P101"], max_facts_per_relation=4)
    write_parquet(root / "P101.parquet", prompts)
    return {"root": root, "model": model, "data": root / "P101.parquet"}


def _stage(env: dict[str, str], stage: str, *args: str, warm: bool) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kn.worker" if warm else f"kn.stages.{stage}", *([stage] if warm else []), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def _log_lines(stderr: str) -> list[str]:
    """Log lines without their timestamps, progress bars dropped."""
    return [line.split(" ", 2)[-1] for line in stderr.splitlines() if " INFO " in line or " ERROR " in line]


def test_a_job_through_the_worker_writes_what_the_cold_job_writes(worker_env, probe_inputs) -> None:
    usage = probe_inputs["root"] / "usage.jsonl"
    env = {**worker_env, "KN_WORKER_USAGE": str(usage)}
    runs = {}
    for name, warm in (("cold", False), ("warm", True), ("warm-again", True)):
        out = probe_inputs["root"] / f"{name}.parquet"
        result = _stage(env, "probe", "--relation", "P101", "--threads", "2", f"--in=data={probe_inputs['data']}",
                        f"--in=model={probe_inputs['model']}", f"--out=probe={out}", "device=cpu", warm=warm)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (out.read_bytes(), _log_lines(result.stderr))
    assert runs["warm"] == runs["cold"] and runs["warm-again"] == runs["cold"]
    records = [json.loads(line) for line in usage.read_text().splitlines()]
    jobs = [r for r in records if r["stage"] == "probe"]
    assert len(jobs) == 2 and all(r["exit"] == 0 and r["cpu_s"] > 0 and r["max_rss_mb"] > 0 for r in jobs)
    assert [r["stage"] for r in records].count(worker.STARTUP_STAGE) == 1  # one server served both jobs


def test_a_failing_job_exits_and_reports_as_the_cold_one(worker_env, broken_patterns, tmp_path) -> None:
    args = ("--relation", "P101", f"--out=prompts={tmp_path / 'out.parquet'}", f"data.resources_dir={broken_patterns}")
    cold, warm = (_stage(worker_env, "ingest_relation", *args, warm=w) for w in (False, True))
    assert cold.returncode == warm.returncode == 1
    assert warm.stderr.strip().splitlines()[-1] == cold.stderr.strip().splitlines()[-1]
    assert "P101.jsonl:2: malformed JSON line" in warm.stderr and "Traceback" not in warm.stderr


def test_the_job_dies_with_its_client(worker_env, probe_inputs, monkeypatch) -> None:
    for name, value in worker_env.items():
        monkeypatch.setenv(name, value)
    conn = worker.connect_or_start()
    server_pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    parent_of_server = int(Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent_of_server != os.getpid()  # a daemon: no job's process tree (or benchmark) holds the server
    out = probe_inputs["root"] / "never.parquet"
    # Training 10^6 steps: the job would run for hours unless stopped.
    args = ["--out", f"model={out}", "--out", f"card={out}.md", "--out", f"metrics={out}.json", "--out",
            f"loss={out}.png", "model.train.max_steps=1000000", "model.train.target_accuracy=null"]
    with open(os.devnull, "wb") as sink:
        worker._send(conn, {"stage": "train_model", "args": args, "cwd": str(REPO), "env": worker_env},
                     [sink.fileno()] * 3)
        started, _ = worker._recv(conn)
    pid = started["pid"]
    time.sleep(3)
    assert Path(f"/proc/{pid}").exists()  # training
    conn.close()  # as when Snakemake kills the client
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
    assert not out.exists()


def test_without_the_worker_nothing_is_started(tmp_path) -> None:
    folder = tempfile.mkdtemp(prefix="knwt")
    try:
        env = offline_env(KN_WORKER_DIR=folder, KN_WORKER="0")
        result = _stage(env, "ingest_relation", "--relation", "P101", f"--out=prompts={tmp_path / 'p.parquet'}",
                        warm=True)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "p.parquet").exists() and os.listdir(folder) == []
    finally:
        shutil.rmtree(folder)


def test_an_unknown_stage_is_named() -> None:
    result = subprocess.run([sys.executable, "-m", "kn.worker", "evaluat"], cwd=REPO, env=offline_env(),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "no stage 'evaluat'" in result.stderr and "evaluate" in result.stderr


def test_the_server_key_follows_import_time_environment(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    online = worker.server_key()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert worker.server_key() != online
    monkeypatch.setenv("KN_GPU_IDS", "0,1")  # read when a job runs, not at import: same server
    offline = worker.server_key()
    monkeypatch.setenv("KN_GPU_IDS", "2")
    assert worker.server_key() == offline


@pytest.mark.parametrize(("setting", "slurm", "wanted"), [(None, None, True), (None, "42", False), ("1", "42", True),
                                                          ("0", None, False)])
def test_when_the_worker_is_used(monkeypatch, setting, slurm, wanted) -> None:
    for name, value in (("KN_WORKER", setting), ("SLURM_JOB_ID", slurm)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert worker.worker_wanted() is wanted
    monkeypatch.setenv("KN_WORKER", "yes")
    with pytest.raises(SystemExit, match="KN_WORKER='yes'; expected 0"):
        worker.worker_wanted()
