"""Times EleutherAI's ``knowledge-neurons`` (KnowledgeNeurons.get_scores) for attribution_benchmark.py.

Run with the throwaway venv's python that has the package (benchmarks/out/eleuther-venv, set up by
attribution_benchmark.py --eleuther); it imports nothing from this repository. Usage:

    eleuther-venv/bin/python benchmarks/eleuther_worker.py SPEC.json

SPEC.json: {"model": folder written by save_pretrained (BertForMaskedLM + tokenizer), "prompts": [text with
the tokenizer's mask token], "ground_truths": [one vocabulary token each], "threads": int, "steps": int,
"batch_size": int (divides steps), "repeats": int, "count_flops": bool (optional: count the FLOPs of the first
prompt's get_scores once more, after the timed runs), "scores_out": path for the last repeat's scores
[n_prompts, layers, ffn] (torch.save), "result_out": path for the JSON result}.

Each repeat scores every prompt once with ``get_scores(prompt, ground_truth, batch_size, steps, pbar=False)``,
timed in wall-clock and process CPU time; one warm-up call (the first prompt, top layer only) comes first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from transformers import AutoTokenizer, BertForMaskedLM

    from knowledge_neurons import KnowledgeNeurons

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = BertForMaskedLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    for param in model.parameters():  # frozen, as on our side (their code takes gradients w.r.t. activations only)
        param.requires_grad_(False)
    kn = KnowledgeNeurons(model, tokenizer, model_type="bert", device="cpu")
    prompts, truths = spec["prompts"], spec["ground_truths"]
    steps, batch_size = int(spec["steps"]), int(spec["batch_size"])
    # what their code feeds the model: the same tokenizer call and target lookup as KnowledgeNeurons uses
    input_ids = [tokenizer(p, return_tensors="pt")["input_ids"][0].tolist() for p in prompts]
    target_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in truths]

    kn.get_scores_for_layer(prompts[0], truths[0], layer_idx=kn.n_layers() - 1, batch_size=batch_size, steps=steps)
    runs, scores = [], None
    for _ in range(int(spec["repeats"])):
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        scores = [kn.get_scores(p, t, batch_size=batch_size, steps=steps, pbar=False) for p, t in zip(prompts, truths)]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        runs.append({"s_per_prompt": wall / len(prompts), "cpu_s_per_prompt": cpu / len(prompts),
                     "load_avg_1min": load, "load_avg_1min_end": os.getloadavg()[0]})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    assert scores is not None
    gflop = None
    if spec.get("count_flops"):  # the first prompt once more, its operations counted (forward and backward)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            kn.get_scores(prompts[0], truths[0], batch_size=batch_size, steps=steps, pbar=False)
        gflop = counter.get_total_flops() / 1e9
    torch.save(torch.stack([s.detach().float().cpu() for s in scores]), spec["scores_out"])
    result = {"package_version": metadata.version("knowledge-neurons"), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "input_ids": input_ids, "target_ids": target_ids,
              "runs": runs, "gflop_first_prompt": gflop}
    Path(spec["result_out"]).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
