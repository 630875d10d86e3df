"""The GPU path, executed: the steps of scripts/device_check.sh, one process each (docs/gpu.md).

The shell script runs every step below in its own process under ``timeout`` (a stuck CUDA call
cannot be interrupted from inside its process), each step writes its findings to
``WORK/parts/<step>.json``, and ``report`` turns them into one JSON and one markdown report with
a verdict. ``--cpu`` runs the same steps at tiny sizes on the CPU, so CI keeps the check working.

    python scripts/device_check.py env|standins|agree|timing|pipeline --work DIR [--cpu] [--limit S]
    python scripts/device_check.py report --work DIR --out DIR [--cpu]

* env: torch / transformers / CUDA versions, the GPU, where kn was imported from;
* standins: a bert-base-cased-shaped and a bert-large-cased-shaped stand-in (tests/standins.py:
  random weights, cased WordPiece vocabulary of the shrunk paper run's relations);
* agree: integrated gradients of the same ParaRel prompts on the device (fp32 and the opt-in bf16)
  and on the CPU (fp32): relative difference per prompt and layer, and agreement of the sets of
  neurons above the refinement threshold;
* timing: IG prompts/s on the device at both sizes for a few ``ig.batch_size`` values, the GPU
  memory peak, and the paper's full attribution time projected from the fastest;
* pipeline: the shrunk ``experiment=paper`` run (tests/snakemake_runs.py's overrides) through
  Snakemake with ``device=<the device>`` and ``--resources gpu=1``, every stage to summary.md;
  then every model job's log (Snakemake's ``--summary`` names each job's log) must say it loaded
  the model on that device, and so must every parquet output's provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/ (stand-ins, the shrunk paper run) and benchmarks/ sit beside src/
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kn.io import write_json, write_text  # noqa: E402  (light: no torch)

RESOURCES = REPO / "resources" / "pararel"
LARGE_SHAPE = (24, 1024, 4096, 16, 28996)  # bert-large-cased: layers, hidden, ffn, heads, vocab
FP32_LIMIT = 1e-5  # fp32 on the device vs the CPU: max |diff| / max |CPU score| of each prompt
DEVICE_LINE = re.compile(r"model \S+ loaded on device (\S+)")  # kn.stages.cli.load_model's log line
STEPS = ("install", "env", "standins", "agree", "timing", "pipeline")  # as scripts/device_check.sh names them
MIB = 2**20


@dataclass(frozen=True)
class Mode:
    """What one run checks: the device under test and the sizes (--cpu: tiny, for CI)."""

    device: str  # "cuda", or "cpu" in --cpu mode
    shapes: dict[str, tuple[int, int, int, int, int | None]]  # stand-in -> (layers, hidden, ffn, heads, vocab or None)
    agree_prompts: dict[str, int]  # prompts attributed on both the device and the CPU, per stand-in
    batch_sizes: tuple[int, ...]  # ig.batch_size values timed (the paper's first); the fastest is chosen
    timed_seconds: float  # aim for one timed IG run
    pool: int  # ParaRel prompts encoded for timing, at most
    cores: int  # snakemake --cores
    cpu_threads: int  # torch threads of the CPU reference


def mode_of(cpu: bool) -> Mode:
    if cpu:
        return Mode("cpu", {"base": (2, 32, 64, 2, None), "large": (4, 48, 96, 4, None)}, {"base": 3, "large": 2},
                    (20, 40), 0.5, 48, 2, 1)
    from benchmarks.attribution_benchmark import SHAPES

    cores = os.cpu_count() or 1
    return Mode("cuda", {"base": SHAPES["base"], "large": LARGE_SHAPE}, {"base": 4, "large": 2},
                (20, 160, 640), 3.0, 2048, cores, cores)


def paper_settings() -> Any:
    """The paper's config (m, quadrature, batch size, refinement threshold, LayerNorm epsilon)."""
    from kn.config import compose_config

    return compose_config(["experiment=paper"])


def standin_dir(work: Path, size: str) -> Path:
    return work / "standins" / size


def part_path(work: Path, step: str) -> Path:
    return work / "parts" / f"{step}.json"


def say(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- steps
def step_env(mode: Mode, work: Path) -> dict[str, Any]:
    from importlib.metadata import version

    import torch
    import transformers

    import kn

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "snakemake": version("snakemake"), "hydra-core": version("hydra-core"), "kn": version("kn"),
        "kn_file": kn.__file__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cpu_count": os.cpu_count(),
    }
    if mode.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("torch sees no CUDA device: this check needs one (--cpu runs it on the CPU)")
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, gpu_count=torch.cuda.device_count(),
                    compute_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    say("; ".join(f"{key} {value}" for key, value in info.items()))
    return info


def step_standins(mode: Mode, work: Path) -> dict[str, Any]:
    from tests.snakemake_runs import PATH_RELATIONS
    from tests.standins import write_bert_standin

    made = {}
    for size, (layers, hidden, ffn, heads, vocab) in mode.shapes.items():
        started = time.perf_counter()
        folder = write_bert_standin(standin_dir(work, size), PATH_RELATIONS, layers=layers, hidden=hidden, ffn=ffn,
                                    heads=heads, vocab_size=vocab)
        weights = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
        made[size] = {"path": str(folder), "layers": layers, "hidden": hidden, "ffn": ffn, "heads": heads,
                      "vocab": vocab, "weights_mib": weights / MIB, "seconds": time.perf_counter() - started}
        say(f"stand-in {size}: {layers} x {hidden}, FFN {ffn}, {weights / MIB:.0f} MiB in {made[size]['seconds']:.1f} s")
    return made


def ig_inputs(tokenizer: Any, n: int) -> tuple[Any, Any]:
    """``n`` ParaRel prompts of the shrunk run's relations whose object is one token, spread evenly over them
    (deterministic), encoded, with their gold ids."""
    import torch

    from kn.data.pararel import build_bags
    from kn.models.encoding import encode_prompts, object_token_id
    from tests.snakemake_runs import PATH_RELATIONS

    prompts, _ = build_bags(RESOURCES, PATH_RELATIONS, None)
    gold = {obj: object_token_id(tokenizer, obj) for obj in prompts["object"].unique()}
    usable = prompts[prompts["object"].map(gold).notna()]
    if len(usable) < n:
        raise SystemExit(f"only {len(usable)} prompts of {PATH_RELATIONS} have a one-token object; {n} wanted")
    chosen = usable.iloc[:: len(usable) // n].head(n)
    return encode_prompts(tokenizer, chosen["prompt"].tolist()), torch.tensor([gold[o] for o in chosen["object"]])


def compare(scores: Any, reference: Any, threshold: float) -> dict[str, Any]:
    """How far ``scores`` [prompts, layers, ffn] are from ``reference``: max |diff| over max |reference| per prompt
    (the pass criterion) and per prompt and layer; and per prompt, the Jaccard index of the neurons >=
    ``threshold`` x the prompt's maximum."""
    from kn.attribution import sparsify

    diff, scale = (scores - reference).abs().amax(-1), reference.abs().amax(-1)  # [prompts, layers]
    per_prompt = diff.amax(1) / scale.amax(1).clamp_min(1e-30)
    per_layer = diff / scale.clamp_min(1e-30)
    tops = [sparsify(s, threshold) for s in (scores, reference)]
    sets = [[set(zip(t.loc[t["prompt"] == k, "layer"], t.loc[t["prompt"] == k, "neuron"])) for k in range(len(scores))]
            for t in tops]
    jaccard = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in zip(*sets)]
    return {"max_rel_diff": float(per_prompt.max()), "per_prompt_rel_diff": per_prompt.tolist(),
            "max_rel_diff_layer": float(per_layer.max()), "median_rel_diff_layer": float(per_layer.median()),
            "finite": bool(scores.isfinite().all()),
            "top_set_jaccard_min": min(jaccard), "top_sets_identical": sum(a == b for a, b in zip(*sets)),
            "top_set_sizes": [len(b) for b in sets[1]]}


def step_agree(mode: Mode, work: Path) -> dict[str, Any]:
    import torch

    from kn.attribution import ig_attribution
    from kn.devices import resolve_device
    from kn.models import load_lm

    cfg = paper_settings()
    torch.set_num_threads(mode.cpu_threads)
    device = resolve_device(mode.device)
    found: dict[str, Any] = {"device": str(device), "m": int(cfg.ig.m), "alpha_rule": str(cfg.ig.alpha_rule),
                             "batch_size": int(cfg.ig.batch_size), "threshold": float(cfg.refine.t),
                             "cpu_threads": mode.cpu_threads, "sizes": {}}
    for size in mode.shapes:
        reference_model, tokenizer = load_lm(standin_dir(work, size), "cpu", cfg.model.layer_norm_eps)
        model, _ = load_lm(standin_dir(work, size), device, cfg.model.layer_norm_eps)
        encoded, gold = ig_inputs(tokenizer, mode.agree_prompts[size])

        def scores(on: Any, dtype: torch.dtype) -> torch.Tensor:
            return ig_attribution(on, encoded, gold, m=found["m"], alpha_rule=found["alpha_rule"],
                                  batch_size=found["batch_size"], dtype=dtype, progress=False)

        started = time.perf_counter()
        reference = scores(reference_model, torch.float32)
        cpu_seconds = time.perf_counter() - started
        fp32, bf16 = scores(model, torch.float32), scores(model, torch.bfloat16)
        found["sizes"][size] = {"prompts": len(encoded), "layers": reference.shape[1], "ffn": reference.shape[2],
                                "cpu_seconds": cpu_seconds, "fp32": compare(fp32, reference, found["threshold"]),
                                "bf16": compare(bf16, reference, found["threshold"])}
        say(f"agree {size}: {len(encoded)} prompts, fp32 {device} vs CPU max rel. diff "
            f"{found['sizes'][size]['fp32']['max_rel_diff']:.2e}, bf16 {found['sizes'][size]['bf16']['max_rel_diff']:.2e}")
    return found


def time_ig(model: Any, encoded: Any, gold: Any, cfg: Any, batch_size: int, dtype: Any, seconds: float) -> dict[str, Any]:
    """Prompts/s of ig_attribution on about ``seconds`` worth of prompts (at least two chunks), sized from a
    calibration run on one chunk after a warm-up run on one chunk, and the device memory peak of the timed run."""
    import torch

    from kn.attribution import ig_attribution
    from kn.models.adapters import model_device
    from kn.models.encoding import EncodedPrompts

    cuda = model_device(model).type == "cuda"

    def run(n: int) -> float:
        part = EncodedPrompts(encoded.input_ids[:n], encoded.mask_positions[:n])
        started = time.perf_counter()
        ig_attribution(model, part, gold[:n], m=int(cfg.ig.m), alpha_rule=str(cfg.ig.alpha_rule), batch_size=batch_size,
                       dtype=dtype, progress=False)  # returns CPU tensors: the device is done when it returns
        return time.perf_counter() - started

    row: dict[str, Any] = {"batch_size": batch_size, "dtype": str(dtype).removeprefix("torch.")}
    chunk = min(len(encoded), max(1, batch_size // int(cfg.ig.m)))
    try:
        run(chunk)  # one-off costs (CUDA and cuBLAS start-up, kernel selection, allocator growth)
        n = min(len(encoded), max(2 * chunk, int(chunk * seconds / run(chunk))))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        wall = run(n)
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return {**row, "error": f"out of memory: {exc}"}
    row.update(prompts=n, seconds=wall, prompts_per_s=n / wall,
               peak_gpu_mib=torch.cuda.max_memory_allocated() / MIB if cuda else None)
    say(f"  batch {batch_size} {row['dtype']}: {n} prompts in {wall:.2f} s = {n / wall:.2f} prompts/s"
        + (f", peak {row['peak_gpu_mib']:.0f} MiB" if cuda else ""))
    return row


def step_timing(mode: Mode, work: Path) -> dict[str, Any]:
    import torch

    from kn.data.pararel import build_bags
    from kn.devices import resolve_device
    from kn.models import load_lm

    cfg = paper_settings()
    torch.set_num_threads(mode.cpu_threads)
    device = resolve_device(mode.device)
    paper_prompts = len(build_bags(RESOURCES, "all", None)[0])  # every prompt of every fact: the paper's attribution
    found: dict[str, Any] = {"device": str(device), "m": int(cfg.ig.m), "paper_prompts": paper_prompts, "sizes": {}}
    for size in mode.shapes:
        model, tokenizer = load_lm(standin_dir(work, size), device, cfg.model.layer_norm_eps)
        encoded, gold = ig_inputs(tokenizer, mode.pool)
        say(f"timing {size} on {device}")
        runs = [time_ig(model, encoded, gold, cfg, b, torch.float32, mode.timed_seconds) for b in mode.batch_sizes]
        done = [r for r in runs if "prompts_per_s" in r]
        if not done:
            raise SystemExit(f"no IG run of the {size} stand-in finished: {runs}")
        best = max(done, key=lambda r: r["prompts_per_s"])
        bf16 = time_ig(model, encoded, gold, cfg, best["batch_size"], torch.bfloat16, mode.timed_seconds)
        projection = {dtype: paper_prompts / r["prompts_per_s"] / 3600 for dtype, r in (("float32", best), ("bfloat16", bf16))
                      if "prompts_per_s" in r}
        found["sizes"][size] = {"runs": runs + [bf16], "chosen_batch_size": best["batch_size"],
                                "prompts_per_s": best["prompts_per_s"], "projected_hours": projection}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return found


def model_stages() -> set[str]:
    """The stages (= rule names) that load the model: those whose config sections include the device."""
    from kn.stages.sections import SECTIONS

    return {stage for stage, sections in SECTIONS.items() if sections and "device" in sections}


def summary_rows(text: str) -> list[dict[str, str]]:
    """Snakemake ``--summary`` output (tab-separated, one row per output file) as dicts."""
    lines = text.splitlines()
    start = next((k for k, line in enumerate(lines) if line.startswith("output_file\t")), None)
    if start is None:
        raise ValueError(f"no summary table in snakemake's output: {text[-2000:]!r}")
    header = lines[start].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[start + 1:] if line.count("\t") == len(header) - 1]


def job_devices(rows: list[dict[str, str]], expected: str) -> list[dict[str, Any]]:
    """Each model job (one log per job) with the devices its log says it loaded the model on."""
    stages = model_stages()
    jobs: dict[str, dict[str, Any]] = {}
    for row in rows:
        log = row.get("log-file(s)", "-")
        if row["rule"] in stages and log != "-" and log not in jobs:
            text = Path(log).read_text(encoding="utf-8", errors="replace") if Path(log).is_file() else ""
            devices = DEVICE_LINE.findall(text)
            jobs[log] = {"rule": row["rule"], "log": log, "devices": devices,
                         "ok": bool(devices) and all(d.split(":")[0] == expected for d in devices)}
    return list(jobs.values())


def provenance_devices(model_dir: Path) -> dict[str, list[str]]:
    """The device every parquet output under ``model_dir`` records in its provenance, by stage."""
    from kn.io import read_provenance

    found: dict[str, list[str]] = {}
    for path in sorted(model_dir.rglob("*.parquet")):
        record = read_provenance(path)
        if "device" in record:
            found.setdefault(str(record.get("stage")), []).append(str(record["device"]))
    return found


def unfinished(results: Path, keep: int = 3) -> dict[str, Any]:
    """What a failed or stopped run leaves to read: the ends of (at most ``keep``) job logs that hold a
    traceback, and the device each job that got as far as loading the model logged."""
    logs = {str(p): p.read_text(errors="replace") for p in sorted((results / "logs").rglob("*.log"))}
    failed = [path for path, text in logs.items() if "Traceback" in text][:keep]
    return {"failed_logs": {path: logs[path][-1500:] for path in failed},
            "loaded_on": {path: DEVICE_LINE.findall(text) for path, text in logs.items() if DEVICE_LINE.search(text)}}


def step_pipeline(mode: Mode, work: Path, limit: float) -> dict[str, Any]:
    from tests.snakemake_runs import PATH_SHRINK, run_snakemake

    root = work / "pipeline"
    shutil.rmtree(root, ignore_errors=True)  # a fresh run: every job executes on this device
    root.mkdir(parents=True)
    results = root / "results"
    overrides = ["experiment=paper", f"model.path={standin_dir(work, 'base')}", f"device={mode.device}",
                 f"results_dir={results}", *PATH_SHRINK]
    options = ("--cores", str(mode.cores), "--resources", "gpu=1")
    found: dict[str, Any] = {"overrides": overrides, "options": list(options), "device": mode.device}
    say(f"snakemake {' '.join(options)} on {mode.device} (limit {limit:.0f} s)")
    started = time.perf_counter()
    try:
        run = run_snakemake([], overrides, *options, workdir=root, timeout=limit)
    except subprocess.TimeoutExpired:
        return {**found, "returncode": None, "error": f"snakemake ran past {limit:.0f} s",
                "seconds": time.perf_counter() - started, **unfinished(results)}
    found.update(returncode=run.returncode, seconds=time.perf_counter() - started)
    if run.returncode != 0:
        return {**found, "stderr_tail": run.stderr[-3000:], **unfinished(results)}
    summary = run_snakemake([], overrides, "--summary", workdir=root, timeout=300)
    rows = summary_rows(summary.stdout)
    model_dir = results / str(paper_settings().model.name)
    jobs = job_devices(rows, mode.device)
    found.update(
        summary_md=str(model_dir / "summary.md"), summary_md_written=(model_dir / "summary.md").is_file(),
        outputs=len(rows), outputs_not_ok=[r["output_file"] for r in rows if r.get("status") != "ok"],
        rule_jobs={rule: sum(j["rule"] == rule for j in jobs) for rule in sorted({j["rule"] for j in jobs})},
        model_stages=sorted(model_stages()), jobs=jobs, provenance=provenance_devices(model_dir),
    )
    say(f"pipeline: {len(rows)} outputs in {found['seconds']:.0f} s; model jobs per rule {found['rule_jobs']}")
    return found


# ---------------------------------------------------------------------------------------------- verdict
def checks(mode: Mode, parts: dict[str, Any], steps: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pass criterion of the check, each with the value it judged."""
    out: list[dict[str, Any]] = []

    def check(name: str, value: Any, passed: bool) -> None:
        out.append({"check": name, "value": value, "pass": bool(passed)})

    for step in STEPS:
        rc = steps.get(step, {}).get("rc")
        check(f"step {step} exited 0", rc, rc == 0)
    env = parts.get("env") or {}
    check("kn imported from the installed copy", env.get("kn_file"), str(env.get("kn_file", "")).startswith(
        str(steps.get("install", {}).get("site", "\0"))))
    for size, found in ((parts.get("agree") or {}).get("sizes") or {}).items():
        fp32, bf16 = found["fp32"], found["bf16"]
        check(f"{size}: fp32 {mode.device} vs CPU, max |diff| / the prompt's max |score| <= {FP32_LIMIT:g}",
              fp32["max_rel_diff"], fp32["max_rel_diff"] <= FP32_LIMIT and fp32["finite"])
        check(f"{size}: bf16 scores finite and differ from fp32 (autocast took effect)", bf16["max_rel_diff"],
              bf16["finite"] and bf16["max_rel_diff"] > 0)
    for size, found in ((parts.get("timing") or {}).get("sizes") or {}).items():
        check(f"{size}: IG prompts/s on {mode.device} > 0", found["prompts_per_s"], found["prompts_per_s"] > 0)
    pipeline = parts.get("pipeline") or {}
    check("snakemake run finished", pipeline.get("returncode"), pipeline.get("returncode") == 0)
    check("summary.md written", pipeline.get("summary_md"), bool(pipeline.get("summary_md_written")))
    check("every DAG output is there", pipeline.get("outputs_not_ok"), pipeline.get("outputs_not_ok") == [])
    missing = sorted(set(pipeline.get("model_stages", ["?"])) - set(pipeline.get("rule_jobs", {})))
    check("every model stage ran", missing, not missing)
    jobs = pipeline.get("jobs") or []
    wrong = [j["log"] for j in jobs if not j["ok"]]
    check(f"every model job loaded the model on {mode.device}", {"jobs": len(jobs), "not": wrong}, jobs and not wrong)
    records = pipeline.get("provenance") or {}
    off = {stage: d for stage, d in records.items() if any(x.split(":")[0] != mode.device for x in d)}
    check(f"every parquet provenance names {mode.device}", {"records": sum(map(len, records.values())), "not": off},
          records and not off)
    return out


def read_steps(path: Path) -> dict[str, dict[str, Any]]:
    """scripts/device_check.sh's step log: name, exit status, seconds, limit (and, for install, the site dir)."""
    steps: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds, limit, *extra = line.split("\t")
        steps[name] = {"rc": int(rc), "seconds": int(seconds), "limit": int(limit), **({"site": extra[0]} if extra else {})}
    return steps


def git_commit() -> str | None:
    """The checked-out commit, ``-dirty`` when the tree differs from it; None where there is no git checkout."""
    try:
        run = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def markdown(report: dict[str, Any]) -> str:
    mode, env, parts = report["mode"], report["parts"].get("env") or {}, report["parts"]
    lines = [f"# Device check ({mode['device']})", "",
             f"{report['finished']}; commit {report['commit'] or 'unknown (no git here)'}; "
             f"GPU {env.get('gpu', 'none')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"transformers {env.get('transformers')}, snakemake {env.get('snakemake')}, Python {env.get('python')}; "
             f"fp32 matmul precision {env.get('float32_matmul_precision')}.", "",
             f"**Verdict: {'PASS' if report['passed'] else 'FAIL'}**", "", "| step | exit | seconds | limit |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {s['rc']} | {s['seconds']} | {s['limit']} |" for name, s in report["steps"].items()]
    agree = parts.get("agree") or {}
    if agree:
        lines += ["", f"## Agreement: IG on {agree['device']} vs the CPU (fp32), m={agree['m']}, batch "
                      f"{agree['batch_size']}", "",
                  "Relative difference: max |diff| / max |CPU score| of each prompt (its max over prompts: the "
                  "criterion), and of each prompt and layer (max over both); top set: neurons >= "
                  f"{agree['threshold']} x the prompt's max.", "",
                  "| stand-in | prompts | layers | fp32 rel. diff | fp32 per layer | bf16 rel. diff | bf16 per layer "
                  "| fp32 top sets identical | bf16 top-set Jaccard (min) | CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for size, s in agree["sizes"].items():
            lines.append(f"| {size} | {s['prompts']} | {s['layers']} | {s['fp32']['max_rel_diff']:.2e} "
                         f"| {s['fp32']['max_rel_diff_layer']:.2e} | {s['bf16']['max_rel_diff']:.2e} "
                         f"| {s['bf16']['max_rel_diff_layer']:.2e} | {s['fp32']['top_sets_identical']}/{s['prompts']} "
                         f"| {s['bf16']['top_set_jaccard_min']:.3f} | {s['cpu_seconds']:.1f} |")
    timing = parts.get("timing") or {}
    if timing:
        lines += ["", f"## IG throughput on {timing['device']}, m={timing['m']}", "",
                  "| stand-in | batch | dtype | prompts | s | prompts/s | peak GPU MiB |", "|---|---|---|---|---|---|---|"]
        for size, s in timing["sizes"].items():
            for r in s["runs"]:
                if "error" in r:
                    lines.append(f"| {size} | {r['batch_size']} | {r['dtype']} | {r['error'][:80]} | | | |")
                    continue
                peak = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
                lines.append(f"| {size} | {r['batch_size']} | {r['dtype']} | {r['prompts']} | {r['seconds']:.2f} "
                             f"| {r['prompts_per_s']:.2f} | {peak} |")
        lines += ["", f"Projected IG time of the paper's {timing['paper_prompts']:,} prompts on one such device "
                      "(attribution only, every prompt of every fact):", ""]
        for size, s in timing["sizes"].items():
            hours = ", ".join(f"{dtype} {h:.2f} h" for dtype, h in s["projected_hours"].items())
            lines.append(f"- {size} (batch {s['chosen_batch_size']}): {hours}")
    pipeline = parts.get("pipeline") or {}
    if pipeline:
        lines += ["", f"## Shrunk experiment=paper through Snakemake (device={pipeline['device']}, "
                      f"{' '.join(pipeline['options'])})", "",
                  f"Exit {pipeline.get('returncode')} after {pipeline.get('seconds', 0):.0f} s; "
                  f"{pipeline.get('outputs', 0)} outputs; model jobs per rule: {pipeline.get('rule_jobs')}."]
        if "loaded_on" in pipeline:
            devices = sorted({d for found in pipeline["loaded_on"].values() for d in found})
            lines += ["", f"Unfinished: {len(pipeline['loaded_on'])} jobs had loaded the model (on {devices})."]
        if pipeline.get("failed_logs") or pipeline.get("stderr_tail"):
            lines += ["", "```", pipeline.get("stderr_tail", "")[-1500:], *pipeline.get("failed_logs", {}).values(), "```"]
    lines += ["", "## Checks", "", "| check | value | result |", "|---|---|---|"]
    for c in report["checks"]:
        name = c["check"].replace("|", "\\|")  # a bare | would end the table cell
        lines.append(f"| {name} | `{json.dumps(c['value'], default=str)[:120]}` | {'PASS' if c['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def step_report(mode: Mode, work: Path, out: Path) -> int:
    parts = {}
    for step in STEPS:
        path = part_path(work, step)
        parts[step] = json.loads(path.read_text()) if path.is_file() else None
    steps = read_steps(work / "steps.tsv")
    verdict = checks(mode, parts, steps)
    report = {"mode": asdict(mode), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(),
              "steps": steps, "parts": parts, "checks": verdict, "passed": all(c["pass"] for c in verdict)}
    text = markdown(report)
    write_json(out / "device_check.json", report)
    write_text(out / "device_check.md", text)
    print(text, flush=True)
    return 0 if report["passed"] else 1


STEP_FUNCTIONS: dict[str, Callable[[Mode, Path], dict[str, Any]]] = {
    "env": step_env, "standins": step_standins, "agree": step_agree, "timing": step_timing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=[*STEP_FUNCTIONS, "pipeline", "report"])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder shared by the steps")
    parser.add_argument("--out", type=Path, help="report folder (report step)")
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--limit", type=float, default=600, help="seconds the pipeline step gives snakemake")
    args = parser.parse_args()
    mode = mode_of(args.cpu)
    if args.step == "report":
        if args.out is None:
            raise SystemExit("report needs --out DIR")
        raise SystemExit(step_report(mode, args.work, args.out))
    found = step_pipeline(mode, args.work, args.limit) if args.step == "pipeline" else STEP_FUNCTIONS[args.step](mode, args.work)
    write_json(part_path(args.work, args.step), found)
    if args.step == "pipeline" and found.get("returncode") != 0:
        raise SystemExit(f"snakemake failed: {found.get('error') or found.get('stderr_tail', '')[-1500:]}")


if __name__ == "__main__":
    main()
