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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/naive_ig.py (the reference lives with the tests)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kn.attribution import ig_attribution  # noqa: E402
from kn.models.encoding import EncodedPrompts  # noqa: E402
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
    for name in args.models.split(","):
        n_fast, n_ref = {"tiny": (args.tiny_prompts, args.tiny_ref_prompts), "base": (args.base_prompts, args.base_ref_prompts),
                         "gpt2": (args.gpt_prompts, args.gpt_ref_prompts),
                         "tiny-gpt": (args.tiny_gpt_prompts, args.tiny_gpt_ref_prompts)}[name]
        results.append(bench_model(name, n_fast, n_ref, args.repeats, args.batch_size))
    meta["load_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attribution.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, meta)
    (args.out / "attribution.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
