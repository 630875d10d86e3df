"""Integrated-gradients throughput: the naive authors'-style reference vs the fast path, in one run.

For a kn-tiny-shaped model (results/kn-tiny/model when it exists, else a random init of
that shape), a randomly initialised bert-base-size model (12 x 768, FFN 3072, vocab
28,996), and the causal models (``tiny-gpt``: results/kn-tiny-gpt/model or a random GPT-2 of
that shape; ``gpt2``: a random GPT-2-small-size model, 12 x 768, FFN 3072, vocab 50,257; their
reference is ``tests/naive_ig.py``'s one-prompt, unpadded, every-position pass per layer),
this measures prompts/s of ``tests/naive_ig.py`` and of
``kn.attribution.ig_attribution`` (m = 20, fp32), their ratio, the GFLOP/s each achieves
(FLOPs counted by torch's FlopCounterMode on the operations actually executed), and the
machine's dense-matmul GFLOP/s for comparison; it also measures the opt-in bf16 mode's
error against fp32. Wall and CPU (process) time are both recorded: on a shared machine
wall time includes waiting for a core. Writes benchmarks/out/attribution.{json,md}.

    python benchmarks/attribution_benchmark.py               # both models, 3 repeats, 1 thread
    python benchmarks/attribution_benchmark.py --models tiny --repeats 5
    python benchmarks/attribution_benchmark.py --models gpt2 --gpt-prompts 3 --gpt-ref-prompts 1

``--eleuther`` (opt-in) also times EleutherAI's ``knowledge-neurons`` 0.0.2 (``KnowledgeNeurons.get_scores``)
against the fast path on a bert-base-cased-shaped stand-in (tests/standins.py: SHAPES["base"], a cased
WordPiece vocabulary padded to 28,996, random weights) and the same ParaRel prompts, at 1 and 2 torch
threads (``--eleuther-threads``). Their package is installed with ``pip install --no-deps`` into a throwaway
venv (benchmarks/out/eleuther-venv, reusing this environment's torch and transformers through a .pth file)
and run there in a subprocess (benchmarks/eleuther_worker.py); when it cannot be installed (offline) the
comparison is skipped with a message. ``--models ''`` runs only that comparison:

    python benchmarks/attribution_benchmark.py --models base --eleuther --eleuther-prompts 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/naive_ig.py (the reference lives with the tests)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kn.attribution  # noqa: E402
from kn.attribution import Quadrature, ig_attribution  # noqa: E402
from kn.models.encoding import MASK_LITERAL, EncodedPrompts, PromptCodec  # noqa: E402
from tests.naive_ig import naive_ig  # noqa: E402

M = 20
PROMPT_LENGTHS = (13, 14, 15, 16, 17)  # wordpieces incl. [CLS]/[SEP]; ParaRel prompts are ~15
SHAPES = {  # name: (layers, hidden, ffn, heads, vocab)
    "tiny": (6, 256, 1024, 4, 8000),
    "base": (12, 768, 3072, 12, 28996),
    "tiny-gpt": (6, 256, 1024, 4, 8000),
    "gpt2": (12, 768, 3072, 12, 50257),  # GPT-2 small's shape
}
CAUSAL = {"tiny-gpt", "gpt2"}
TRAINED = {"tiny": "kn-tiny", "tiny-gpt": "kn-tiny-gpt"}


def build_model(name: str) -> tuple[torch.nn.Module, str]:
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    trained = REPO / "results" / TRAINED.get(name, "-") / "model"
    if name in TRAINED and (trained / "config.json").is_file():
        from kn.models import load_lm

        model, _ = load_lm(trained)
        return model, f"{TRAINED[name]} ({trained})"
    layers, hidden, ffn, heads, vocab = SHAPES[name]
    torch.manual_seed(0)
    if name in CAUSAL:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn,
                                           n_positions=1024)).eval()
    else:
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=ffn, max_position_embeddings=512)
        model = BertForMaskedLM(config).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    kind = "GPT-2" if name in CAUSAL else "BERT"
    return model, f"random init {kind} {layers}x{hidden}, FFN {ffn}, vocab {vocab}"


def make_prompts(n: int, vocab: int, seed: int = 0, causal: bool = False) -> tuple[EncodedPrompts, torch.Tensor]:
    """Masked: [CLS] ... [MASK] . [SEP]; causal: the prompt before [Y], read at its last token."""
    gen = torch.Generator().manual_seed(seed)
    ids, positions = [], []
    for k in range(n):
        length = PROMPT_LENGTHS[k % len(PROMPT_LENGTHS)]
        seq = torch.randint(5, vocab, (length,), generator=gen).tolist()
        if causal:
            ids.append(seq[: length - 2])  # the same token count as the masked prompt's text before [MASK]
            positions.append(length - 3)
            continue
        seq[0], seq[-1], seq[length - 3] = 2, 3, 4  # [CLS] ... [MASK] . [SEP]
        ids.append(seq)
        positions.append(length - 3)
    return EncodedPrompts(ids, positions), torch.randint(5, vocab, (n,), generator=gen)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def counted_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_gflops(size: int = 2048, reps: int = 10) -> tuple[float, float]:
    """Dense fp32 matmul throughput (wall, CPU time) of this process and thread count, medians of ``reps``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    wall, cpu = [], []
    for _ in range(reps):
        seconds_wall, seconds_cpu, _ = timed(lambda: a @ b)
        wall.append(2 * size**3 / seconds_wall / 1e9)
        cpu.append(2 * size**3 / seconds_cpu / 1e9)
    return statistics.median(wall), statistics.median(cpu)


def rel_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """max over prompts and layers of max|x - ref| / max|ref| (the tests' measure)."""
    return float(((x - reference).abs().amax(-1) / reference.abs().amax(-1)).max())


def bench_model(name: str, n_fast: int, n_ref: int, repeats: int, batch_size: int) -> dict:
    model, description = build_model(name)
    vocab = model.config.vocab_size
    causal = name in CAUSAL
    fast_prompts, fast_targets = make_prompts(n_fast, vocab, causal=causal)
    ref_prompts, ref_targets = make_prompts(n_ref, vocab, causal=causal)

    def fast(encoded=fast_prompts, targets=fast_targets, dtype=torch.float32):
        return ig_attribution(model, encoded, targets, m=M, batch_size=batch_size, dtype=dtype, progress=False)

    def reference():
        return naive_ig(model, ref_prompts, ref_targets, m=M)

    # FLOPs: the fast path counted directly; the reference (all its ops linear in m) from m = 1 and m = 2,
    # on the reference prompts themselves (the masked reference pads to 128: every prompt costs the same)
    fast_flops = counted_flops(fast) / n_fast
    f1 = counted_flops(lambda: naive_ig(model, ref_prompts, ref_targets, m=1)) / n_ref
    f2 = counted_flops(lambda: naive_ig(model, ref_prompts, ref_targets, m=2)) / n_ref
    ref_flops = f1 + (M - 1) * (f2 - f1)

    runs = []
    for repeat in range(repeats):
        matmul_wall, matmul_cpu = matmul_gflops()
        ref_wall, ref_cpu, ref_scores = timed(reference)
        fast_wall, fast_cpu, _ = timed(fast)
        runs.append({
            "matmul_gflops": matmul_wall, "matmul_cpu_gflops": matmul_cpu,
            "ref_s_per_prompt": ref_wall / n_ref, "ref_cpu_s_per_prompt": ref_cpu / n_ref,
            "fast_s_per_prompt": fast_wall / n_fast, "fast_cpu_s_per_prompt": fast_cpu / n_fast,
            "load_avg_1min": os.getloadavg()[0],
        })
        print(f"{name} run {repeat}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)

    fast_on_ref = ig_attribution(model, ref_prompts, ref_targets, m=M, batch_size=batch_size, progress=False)
    fp32 = fast()
    bf16_wall, _, bf16 = timed(lambda: fast(dtype=torch.bfloat16))
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    ratios = [run["ref_s_per_prompt"] / run["fast_s_per_prompt"] for run in runs]
    cpu_ratios = [run["ref_cpu_s_per_prompt"] / run["fast_cpu_s_per_prompt"] for run in runs]
    fast_rates = [fast_flops / run["fast_s_per_prompt"] / 1e9 for run in runs]
    fast_cpu_rates = [fast_flops / run["fast_cpu_s_per_prompt"] / 1e9 for run in runs]
    return {
        "model": name, "description": description, "m": M, "batch_size": batch_size,
        "prompts_fast": n_fast, "prompts_ref": n_ref, "prompt_lengths": list(PROMPT_LENGTHS),
        "ref_gflop_per_prompt": ref_flops / 1e9, "fast_gflop_per_prompt": fast_flops / 1e9,
        "ref_prompts_per_s": 1 / med["ref_s_per_prompt"], "fast_prompts_per_s": 1 / med["fast_s_per_prompt"],
        "ref_prompts_per_cpu_s": 1 / med["ref_cpu_s_per_prompt"], "fast_prompts_per_cpu_s": 1 / med["fast_cpu_s_per_prompt"],
        "fast_s_per_prompt": med["fast_s_per_prompt"], "ref_s_per_prompt": med["ref_s_per_prompt"],
        "fast_cpu_s_per_prompt": med["fast_cpu_s_per_prompt"], "ref_cpu_s_per_prompt": med["ref_cpu_s_per_prompt"],
        "speedup_wall": statistics.median(ratios), "speedup_cpu": statistics.median(cpu_ratios),
        "ref_gflops": ref_flops / med["ref_s_per_prompt"] / 1e9,
        "ref_cpu_gflops": ref_flops / med["ref_cpu_s_per_prompt"] / 1e9,
        "fast_gflops": statistics.median(fast_rates),
        "fast_cpu_gflops": statistics.median(fast_cpu_rates),
        "matmul_gflops": med["matmul_gflops"],
        "matmul_cpu_gflops": med["matmul_cpu_gflops"],
        "fast_share_of_matmul": statistics.median(r / run["matmul_gflops"] for r, run in zip(fast_rates, runs)),
        "fast_cpu_share_of_matmul": statistics.median(
            r / run["matmul_cpu_gflops"] for r, run in zip(fast_cpu_rates, runs)
        ),
        "fast_vs_ref_rel_error": rel_error(fast_on_ref, ref_scores),
        "bf16_vs_fp32_rel_error": rel_error(bf16, fp32),
        "bf16_s_per_prompt": bf16_wall / n_fast,
        "runs": runs,
    }


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"IG benchmark, m={M}, fp32, {meta['threads']} thread(s), {meta['cpu']}, torch {meta['torch']}; "
        f"medians of {meta['repeats']} runs. Load average at start/end: {meta['load_start']:.1f} / "
        f"{meta['load_end']:.1f}. Rates are per CPU-second of this process (wall-clock in parentheses): on a "
        "shared machine wall time includes waiting for a core.",
        "",
        "| model | ref prompts/s | fast prompts/s | speedup | ref GFLOP/prompt | fast GFLOP/prompt "
        "| ref GFLOP/s | fast GFLOP/s | matmul GFLOP/s | fast / matmul | fast vs ref rel. err | bf16 vs fp32 rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} ({r['description']}) "
            f"| {r['ref_prompts_per_cpu_s']:.4f} ({r['ref_prompts_per_s']:.4f}) "
            f"| {r['fast_prompts_per_cpu_s']:.3f} ({r['fast_prompts_per_s']:.3f}) "
            f"| {r['speedup_cpu']:.1f}x ({r['speedup_wall']:.1f}x) "
            f"| {r['ref_gflop_per_prompt']:.0f} | {r['fast_gflop_per_prompt']:.1f} "
            f"| {r['ref_cpu_gflops']:.1f} ({r['ref_gflops']:.1f}) | {r['fast_cpu_gflops']:.1f} ({r['fast_gflops']:.1f}) "
            f"| {r['matmul_cpu_gflops']:.1f} ({r['matmul_gflops']:.1f}) "
            f"| {100 * r['fast_cpu_share_of_matmul']:.0f}% ({100 * r['fast_share_of_matmul']:.0f}%) "
            f"| {r['fast_vs_ref_rel_error']:.1e} | {r['bf16_vs_fp32_rel_error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ EleutherAI knowledge-neurons 0.0.2
ELEUTHER_REQUIREMENT = "knowledge-neurons==0.0.2"
ELEUTHER_EXTRAS = ("einops",)  # their one import this environment lacks (seaborn is declared but never imported)
ELEUTHER_WORKER = REPO / "benchmarks" / "eleuther_worker.py"
BRIDGE_PTH = "_kn_benchmark_parent_env.pth"
ELEUTHER_BAR = 2.5  # the issue's bar: the fast path at least 2.5x their prompts/s at 1 thread
PARAREL = REPO / "resources" / "pararel"


def bridge_pth_text(site_dirs: Sequence[str]) -> str:
    """A .pth that puts ``site_dirs`` (this environment's site-packages) after the throwaway venv's own, so its
    python imports our torch and transformers while what pip installed there stays out of our environment."""
    return "".join(f"import site; site.addsitedir({str(d)!r})\n" for d in site_dirs)


def eleuther_rule(m: int) -> Quadrature:
    """Their quadrature as a :class:`kn.attribution.Quadrature`: alpha_k = k / (m - 1), k = 0..m-1 (torch.linspace(0, 1,
    m), both ends included), weight 1/m each (IG = a/m ⊙ Σ_k g_k); the authors' (our default, ``left``) is
    alpha_k = k / m."""
    if m < 2:
        raise ValueError(f"m = {m}; their rule needs m >= 2 points")
    return Quadrature(float(m - 1), torch.arange(m, dtype=torch.float32), torch.full((m,), (m - 1) / m))


def eleuther_python(venv: Path) -> tuple[Path | None, str]:
    """The throwaway venv's python, with knowledge-neurons 0.0.2 importable (installed there on first use), or
    (None, why not). pip runs before the bridge .pth exists and with --ignore-installed, so it never sees (nor
    touches) this environment; --no-deps keeps it from pulling another torch."""
    python = venv / "bin" / "python"
    probe_code = "import knowledge_neurons, einops, torch, transformers; print(torch.__version__, transformers.__version__)"

    def probe() -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-c", probe_code], capture_output=True, text=True, timeout=600)

    ours = f"{torch.__version__} {__import__('transformers').__version__}"
    try:
        if not (python.is_file() and probe().returncode == 0):
            if not python.is_file():
                print(f"creating {venv} (python -m venv --system-site-packages)", file=sys.stderr, flush=True)
                subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                               capture_output=True, text=True, timeout=600)
            purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     check=True, capture_output=True, text=True, timeout=120).stdout.strip()
            bridge = Path(purelib) / BRIDGE_PTH
            bridge.unlink(missing_ok=True)
            print(f"pip install --no-deps {ELEUTHER_REQUIREMENT} {' '.join(ELEUTHER_EXTRAS)} into {venv}",
                  file=sys.stderr, flush=True)
            pip = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-input",
                                  "--disable-pip-version-check", ELEUTHER_REQUIREMENT, *ELEUTHER_EXTRAS],
                                 capture_output=True, text=True, timeout=900)
            if pip.returncode != 0:
                tail = (pip.stderr or pip.stdout).strip().splitlines()[-3:]
                return None, f"pip install {ELEUTHER_REQUIREMENT} failed (offline?): {' | '.join(tail)}"
            bridge.write_text(bridge_pth_text(site.getsitepackages()))
        check = probe()
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot set up {venv}: {exc}"
    if check.returncode != 0:
        return None, f"knowledge_neurons does not import in {venv}: {check.stderr.strip().splitlines()[-1:]}"
    if check.stdout.strip() != ours:
        return None, f"{venv} imports torch/transformers {check.stdout.strip()}, not this environment's {ours}"
    return python, f"{venv} (torch/transformers {ours} shared with this environment)"


def eleuther_standin(directory: Path) -> Path:
    """A bert-base-cased-shaped stand-in (SHAPES["base"], random weights, cased WordPiece vocabulary padded to
    28,996), written once by tests/standins.py and reused."""
    layers, hidden, ffn, heads, vocab = SHAPES["base"]
    want = {"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
            "vocab_size": vocab}
    config = directory / "config.json"
    if config.is_file() and (directory / "model.safetensors").is_file() and (directory / "tokenizer_config.json").is_file():
        if all(json.loads(config.read_text()).get(k) == v for k, v in want.items()):
            return directory
    from tests.standins import write_bert_standin

    print(f"writing the bert-base-size stand-in to {directory}", file=sys.stderr, flush=True)
    return write_bert_standin(directory, layers=layers, hidden=hidden, ffn=ffn, heads=heads, vocab_size=vocab, seed=0)


def pararel_prompts(codec: PromptCodec, n: int) -> tuple[list[str], list[str]]:
    """n ParaRel prompts whose object is one token: template 0 of each relation's first fact, then fact 1, ..."""
    from kn.data.pararel import build_bags

    prompts, _ = build_bags(PARAREL, "all", max(3, n))
    prompts = prompts.sort_values(["template_id", "fact_id", "relation"], kind="stable")
    chosen = [(row.prompt, row.object) for row in prompts.itertuples() if codec.target_id(row.prompt, row.object) is not None]
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} ParaRel prompts with a one-token object; asked for {n}")
    return [p for p, _ in chosen[:n]], [o for _, o in chosen[:n]]


def run_eleuther_worker(python: Path, folder: Path, prompts: list[str], truths: list[str], threads: int, steps: int,
                        batch_size: int, repeats: int, count_flops: bool = False) -> tuple[dict, torch.Tensor]:
    with tempfile.TemporaryDirectory(prefix="eleuther-") as tmp:
        spec = {"model": str(folder), "prompts": prompts, "ground_truths": truths, "threads": threads, "steps": steps,
                "batch_size": batch_size, "repeats": repeats, "count_flops": count_flops, "scores_out": f"{tmp}/scores.pt",
                "result_out": f"{tmp}/result.json"}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
        done = subprocess.run([str(python), str(ELEUTHER_WORKER), f"{tmp}/spec.json"], env=env, stdout=subprocess.PIPE,
                              stderr=None, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{ELEUTHER_WORKER.name} failed (exit {done.returncode}); its stderr is above")
        return json.loads((Path(tmp) / "result.json").read_text()), torch.load(f"{tmp}/scores.pt")


def summarise_speed(ours: list[dict], theirs: list[dict]) -> dict:
    """Median per-prompt times (wall, CPU) of each side's runs, prompts/s and ours / theirs."""
    med = {f"{side}_{key}": statistics.median(run[key] for run in runs)
           for side, runs in (("ours", ours), ("theirs", theirs)) for key in ("s_per_prompt", "cpu_s_per_prompt")}
    return {
        "theirs_prompts_per_s": 1 / med["theirs_s_per_prompt"], "ours_prompts_per_s": 1 / med["ours_s_per_prompt"],
        "theirs_prompts_per_cpu_s": 1 / med["theirs_cpu_s_per_prompt"],
        "ours_prompts_per_cpu_s": 1 / med["ours_cpu_s_per_prompt"],
        "ratio_wall": med["theirs_s_per_prompt"] / med["ours_s_per_prompt"],
        "ratio_cpu": med["theirs_cpu_s_per_prompt"] / med["ours_cpu_s_per_prompt"],
        **med,
    }


def bench_eleuther(out: Path, n_prompts: int, threads_list: Sequence[int], repeats: int, batch_size: int,
                   their_batch_size: int, restore_threads: int) -> dict:
    from kn.models import load_lm

    out = out.resolve()
    python, how = eleuther_python(out / "eleuther-venv")
    if python is None:
        print(f"\nSKIPPED the EleutherAI knowledge-neurons comparison: {how}\n", file=sys.stderr, flush=True)
        return {"skipped": how}
    if M % their_batch_size:
        raise ValueError(f"--eleuther-batch-size {their_batch_size} must divide m = {M} (their get_scores asserts it)")
    folder = eleuther_standin(out / "eleuther-base-standin")
    model, tokenizer = load_lm(folder)
    codec = PromptCodec(tokenizer, causal=False)
    texts, objects = pararel_prompts(codec, n_prompts)
    encoded = codec.encode(texts)
    targets = torch.tensor(codec.target_ids(texts, objects))
    their_prompts = [t.replace(MASK_LITERAL, str(tokenizer.mask_token)) for t in texts]
    truths = [str(t) for t in tokenizer.convert_ids_to_tokens(targets.tolist())]
    top = [model.config.num_hidden_layers - 1]

    def ours(rule: str = "left") -> torch.Tensor:
        return ig_attribution(model, encoded, targets, m=M, alpha_rule=rule, batch_size=batch_size, progress=False)

    rows, flops = [], {}
    first = EncodedPrompts(encoded.input_ids[:1], encoded.mask_positions[:1])
    for threads in threads_list:
        print(f"eleuther: {threads} thread(s), theirs ...", file=sys.stderr, flush=True)
        theirs_result, theirs_scores = run_eleuther_worker(python, folder, their_prompts, truths, threads, M,
                                                           their_batch_size, repeats, count_flops=not flops)
        if theirs_result["input_ids"] != encoded.input_ids or theirs_result["target_ids"] != targets.tolist():
            raise RuntimeError("their tokenizer call gave other input ids / targets than PromptCodec: not like for like")
        torch.set_num_threads(threads)
        ig_attribution(model, first, targets[:1], m=M, layers=top, batch_size=batch_size, progress=False)  # warm-up
        our_runs = []
        for _ in range(repeats):
            load = os.getloadavg()[0]
            wall, cpu, scores = timed(ours)
            our_runs.append({"s_per_prompt": wall / len(texts), "cpu_s_per_prompt": cpu / len(texts),
                             "load_avg_1min": load, "load_avg_1min_end": os.getloadavg()[0]})
            print(f"eleuther: {threads} thread(s), ours {json.dumps(our_runs[-1])}", file=sys.stderr, flush=True)
        with mock.patch.object(kn.attribution, "quadrature", lambda m, rule: eleuther_rule(m)):
            ours_their_rule = ours()
        if not flops:  # the first prompt's operations on each side (load-independent; the same at any thread count)
            ours_gflop = counted_flops(lambda: ig_attribution(model, first, targets[:1], m=M, batch_size=batch_size,
                                                              progress=False)) / 1e9
            flops = {"theirs_gflop_first_prompt": theirs_result["gflop_first_prompt"], "ours_gflop_first_prompt": ours_gflop,
                     "flop_ratio": theirs_result["gflop_first_prompt"] / ours_gflop}
        loads = [run[key] for run in (*our_runs, *theirs_result["runs"]) for key in ("load_avg_1min", "load_avg_1min_end")]
        rows.append({
            "threads": threads, **summarise_speed(our_runs, theirs_result["runs"]),
            "load_avg_1min_min": min(loads), "load_avg_1min_max": max(loads),
            "ours_runs": our_runs, "theirs_runs": theirs_result["runs"],
            "their_torch_threads": theirs_result["torch_threads"],
            "ours_vs_theirs_rel_diff": rel_error(scores, theirs_scores),
            "ours_with_their_rule_vs_theirs_rel_error": rel_error(ours_their_rule, theirs_scores),
        })
    torch.set_num_threads(restore_threads)
    one = next((row for row in rows if row["threads"] == 1), None)
    return {
        "package": ELEUTHER_REQUIREMENT, "venv": how, "model": f"{folder} (bert-base-cased shape {SHAPES['base']}, "
        "random init, cased WordPiece vocabulary padded with [unusedK])", "m": M,
        "prompts": n_prompts, "prompt_texts": their_prompts, "ground_truths": truths,
        "prompt_lengths": [len(ids) for ids in encoded.input_ids], "repeats": repeats,
        "ours_batch_size": batch_size, "their_batch_size": their_batch_size, "bar": ELEUTHER_BAR,
        "bar_met_1_thread_wall": None if one is None else one["ratio_wall"] >= ELEUTHER_BAR,
        "bar_met_1_thread_cpu": None if one is None else one["ratio_cpu"] >= ELEUTHER_BAR,
        **flops, "rows": rows,
    }


ELEUTHER_NOTES = """\
What each side computes (m = {m}, fp32, the same stand-in and the same token ids, checked):

* Theirs (`KnowledgeNeurons.get_scores(prompt, ground_truth, batch_size={their_batch}, steps={m})`): one prompt at a
  time, per layer one plain forward pass for the activations, then the m scaled copies of the [MASK]-row FFN
  activation (post-GELU output of `BertIntermediate`) patched in, {their_batch} rows per forward pass through the
  whole model (every position, the full-vocabulary MLM head at every position) and autograd back to the patch.
  Gradient of the full-vocabulary softmax probability of the target, zero baseline.
* Ours (`kn.attribution.ig_attribution`, batch_size={our_batch}): the same quantity per prompt and layer, with one
  plain pass per prompt chunk (prefix caching), prompts x steps batched, only what depends on the replaced vector
  recomputed.
* The difference: the quadrature. Theirs takes alpha_k = k/(m-1), k = 0..m-1 (`torch.linspace(0, 1, m)`, both
  ends) with weight 1/m each; ours (the authors' code, `alpha_rule=left`) alpha_k = k/m. So the scores differ by
  the quadrature error ("ours vs theirs"); with their rule substituted on our side the two agree to fp32
  rounding ("ours, their rule, vs theirs"). Parameters are frozen on both sides (gradients w.r.t. activations
  only).
"""


def eleuther_markdown(section: dict) -> str:
    lines = ["", "## EleutherAI knowledge-neurons 0.0.2", ""]
    if "skipped" in section:
        return "\n".join([*lines, f"Skipped: {section['skipped']}", ""])
    lines += [
        f"{section['model']}; {section['prompts']} ParaRel prompts ({min(section['prompt_lengths'])}-"
        f"{max(section['prompt_lengths'])} wordpieces), medians of {section['repeats']} run(s). prompts/s per wall "
        "second (per CPU-second of the process in parentheses); ratio = ours / theirs. Their package: "
        f"{section['venv']}.",
        "",
        "| threads | theirs prompts/s | ours prompts/s | ratio | load avg (1 min) | ours vs theirs rel. diff "
        "| ours, their rule, vs theirs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        lines.append(
            f"| {r['threads']} | {r['theirs_prompts_per_s']:.4f} ({r['theirs_prompts_per_cpu_s']:.4f}) "
            f"| {r['ours_prompts_per_s']:.3f} ({r['ours_prompts_per_cpu_s']:.3f}) "
            f"| {r['ratio_wall']:.1f}x ({r['ratio_cpu']:.1f}x) "
            f"| {r['load_avg_1min_min']:.1f}-{r['load_avg_1min_max']:.1f} "
            f"| {r['ours_vs_theirs_rel_diff']:.1e} | {r['ours_with_their_rule_vs_theirs_rel_error']:.1e} |"
        )
    if section.get("flop_ratio") is not None:
        lines += ["", f"FLOPs of the first prompt (torch FlopCounterMode, forward and backward): theirs "
                      f"{section['theirs_gflop_first_prompt']:.1f} GFLOP, ours {section['ours_gflop_first_prompt']:.1f} "
                      f"GFLOP: {section['flop_ratio']:.2f}x, the ratio at equal FLOP/s (load-independent)."]
    if section["bar_met_1_thread_wall"] is not None:
        verdict = "met" if section["bar_met_1_thread_wall"] and section["bar_met_1_thread_cpu"] else "NOT met"
        lines += ["", f"Bar (ratio >= {section['bar']}x at 1 thread, wall and CPU): {verdict}."]
    lines += ["", ELEUTHER_NOTES.format(m=section["m"], their_batch=section["their_batch_size"],
                                        our_batch=section["ours_batch_size"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,base", help="comma-separated: tiny, base, tiny-gpt, gpt2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tiny-prompts", type=int, default=30, help="fast-path prompts (kn-tiny shape)")
    parser.add_argument("--tiny-ref-prompts", type=int, default=3)
    parser.add_argument("--base-prompts", type=int, default=3, help="fast-path prompts (bert-base size)")
    parser.add_argument("--base-ref-prompts", type=int, default=1)
    parser.add_argument("--gpt-prompts", type=int, default=6, help="fast-path prompts (GPT-2 small size)")
    parser.add_argument("--gpt-ref-prompts", type=int, default=1)
    parser.add_argument("--tiny-gpt-prompts", type=int, default=30, help="fast-path prompts (kn-tiny-gpt shape)")
    parser.add_argument("--tiny-gpt-ref-prompts", type=int, default=3)
    parser.add_argument("--eleuther", action="store_true",
                        help="also time EleutherAI's knowledge-neurons 0.0.2 (installed into a throwaway venv)")
    parser.add_argument("--eleuther-prompts", type=int, default=4, help="ParaRel prompts for that comparison")
    parser.add_argument("--eleuther-threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--eleuther-batch-size", type=int, default=M,
                        help="their get_scores batch_size (steps per forward pass; must divide m)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"threads": args.threads, "repeats": args.repeats, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "load_start": os.getloadavg()[0]}
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    results = []
    for name in filter(None, args.models.split(",")):
        n_fast, n_ref = {"tiny": (args.tiny_prompts, args.tiny_ref_prompts), "base": (args.base_prompts, args.base_ref_prompts),
                         "gpt2": (args.gpt_prompts, args.gpt_ref_prompts),
                         "tiny-gpt": (args.tiny_gpt_prompts, args.tiny_gpt_ref_prompts)}[name]
        results.append(bench_model(name, n_fast, n_ref, args.repeats, args.batch_size))
    args.out.mkdir(parents=True, exist_ok=True)
    eleuther = None
    if args.eleuther:
        threads = [int(t) for t in args.eleuther_threads.split(",") if t]
        eleuther = bench_eleuther(args.out, args.eleuther_prompts, threads, args.repeats, args.batch_size,
                                  args.eleuther_batch_size, args.threads)
    meta["load_end"] = os.getloadavg()[0]
    payload: dict = {"meta": meta, "results": results}
    if eleuther is not None:
        payload["eleuther"] = eleuther
    (args.out / "attribution.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = (markdown(results, meta) if results else "") + ("" if eleuther is None else eleuther_markdown(eleuther))
    (args.out / "attribution.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
