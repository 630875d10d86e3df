"""How few integration points reproduce the authors' m = 20 left-Riemann IG? Gauss-Legendre vs left sums.

For each model, on real ParaRel prompts of a few relations, this computes IG with the exact
default (``left``, m = 20) and with every candidate rule and m, then per candidate:

* completeness error: sum over prompts and layers of |Σ_i IG_i - (P(a) - P(0))| divided by
  the sum of |P(a) - P(0)|, where P(αa) is the gold probability with that layer's FFN vector at
  [MASK] scaled by α (IG's completeness axiom: the exact integral has error 0);
* per fact, the Jaccard index of its refined IG knowledge neurons (refinement as in the
  pipeline: storage ratio, coarse threshold, adaptive p per relation) with the m = 20 sets
  (facts without neurons in both count as identical);
* suppress / amplify ratios of those neurons on the facts' own prompts (SPEC §5: per relation
  ratio of averages, mean over relations), and whether they fall inside the m = 20 run's 95%
  bootstrap CIs;
* IG time (process CPU seconds, one thread).

The smallest Gauss-Legendre m whose mean Jaccard is >= 0.95 and whose suppress and amplify
ratios lie in the m = 20 CIs is reported. Models: the trained organism (``--organism``, e.g.
results/kn-tiny/model) and a randomly initialised bert-base-size BERT (12 x 768, FFN 3072)
with the stand-in cased WordPiece tokenizer (tests/standins.py). Writes
benchmarks/out/quadrature.{json,md}.

    python benchmarks/quadrature_benchmark.py --organism results/kn-tiny/model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kn.attribution import ig_attribution, long_scores, sparsify  # noqa: E402
from kn.data.pararel import build_bags  # noqa: E402
from kn.hooks import ffn_hooks  # noqa: E402
from kn.interventions import Intervention, gold_probabilities, summarize  # noqa: E402
from kn.models import adapter_for, encode_prompts, load_masked_lm, object_token_id  # noqa: E402
from kn.models.forward import score_targets  # noqa: E402
from kn.refine import refine_relation  # noqa: E402
from kn.tables import studied_rows  # noqa: E402

REFERENCE = ("left", 20)
REFINE = dict(p=0.7, p_step=0.05, max_evals=6, target_min=2.0, target_max=5.0, min_prompts=3)  # conf/config.yaml


def study_prompts(tokenizer, relations: list[str], facts: int) -> pd.DataFrame:
    """The first ``facts`` facts of each relation whose object is one token, with gold ids."""
    prompts, _ = build_bags(REPO / "resources" / "pararel", relations, None)
    prompts = prompts.assign(gold_id=[object_token_id(tokenizer, obj) for obj in prompts["object"]])
    prompts = prompts[prompts["gold_id"].notna()]
    kept = [studied_rows(group.assign(fact_id=group["fact_id"].rank(method="dense").astype(int) - 1), facts)
            for _, group in prompts.groupby("relation", sort=True)]
    return pd.concat(kept, ignore_index=True).astype({"gold_id": int})


def completeness_error(model, encoded, gold: torch.Tensor, scores: torch.Tensor, batch_size: int) -> float:
    """Σ|Σ_i IG_i - (P(a) - P(0))| / Σ|P(a) - P(0)| over prompts and layers."""
    full = torch.tensor(score_targets(model, encoded, gold.tolist(), batch_size=batch_size).prob, dtype=torch.float64)
    gaps, deltas = [], []
    for layer in range(adapter_for(model).n_layers):
        def zeroed(items, positions, layer=layer):
            rows = torch.arange(len(items), device=positions.device)

            def edit(act):
                act = act.clone()
                act[rows, positions] = 0.0
                return act

            return ffn_hooks(model, {layer: edit})

        empty = torch.tensor(score_targets(model, encoded, gold.tolist(), batch_size=batch_size, edit=zeroed).prob,
                             dtype=torch.float64)
        delta = full - empty
        gaps.append((scores[:, layer].double().sum(-1) - delta).abs())
        deltas.append(delta.abs())
    return float(torch.stack(gaps).sum() / torch.stack(deltas).sum())


def knowledge_neurons(scores: torch.Tensor, prompts: pd.DataFrame) -> dict[tuple[str, int], set]:
    """Refined IG knowledge neurons per (relation, fact) from a scores tensor, as the pipeline refines them."""
    out: dict[tuple[str, int], set] = {}
    for relation, rows in prompts.groupby("relation", sort=True):
        index = rows.index.to_numpy()
        sparse = sparsify(scores[index], 0.1)
        frame = long_scores(sparse, rows.reset_index(drop=True), relation, "ig")
        n_prompts = rows.groupby("fact_id").size().sort_index()
        neurons, _ = refine_relation(frame, n_prompts, {"ig": 0.2}, relation_share=0.1, **REFINE)
        for fact in n_prompts.index:
            chosen = neurons[neurons["fact_id"] == fact]
            out[(relation, int(fact))] = set(zip(chosen["layer"].astype(int), chosen["neuron"].astype(int)))
    return out


def effects(model, encoded, prompts: pd.DataFrame, kns: dict, batch_size: int, resamples: int) -> pd.DataFrame:
    """Suppress (x0) and amplify (x2) of each fact's neurons on its own prompts, summarised as in the pipeline."""
    rows, meta = [], []
    for i, (relation, fact) in enumerate(zip(prompts["relation"], prompts["fact_id"])):
        neurons = tuple(sorted(kns[(relation, int(fact))]))
        for factor in (1.0, 0.0, 2.0):
            rows.append(Intervention(i, () if factor == 1.0 else neurons, factor))
        meta.append((relation, int(fact), len(neurons)))
    probs = gold_probabilities(model, encoded, prompts["gold_id"].tolist(), rows, batch_size=batch_size).reshape(-1, 3)
    frame = pd.DataFrame(meta, columns=["relation", "fact_id", "n_neurons"]).assign(
        target="own", method="ig", p0=probs[:, 0], p_suppress=probs[:, 1], p_amplify=probs[:, 2])
    summary = summarize(frame, resamples, 0)
    return summary[(summary["relation"] == "mean") & (summary["variant"] == "all") & summary["metric"].str.endswith("_own")]


def jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def run_model(name: str, model, tokenizer, relations, facts, candidates, batch_size, resamples) -> list[dict]:
    prompts = study_prompts(tokenizer, relations, facts)
    encoded = encode_prompts(tokenizer, prompts["prompt"].tolist())
    gold = torch.tensor(prompts["gold_id"].tolist())
    print(f"{name}: {len(prompts)} prompts of {prompts.groupby(['relation', 'fact_id']).ngroups} facts", flush=True)
    results, reference = [], None
    for rule, m in [REFERENCE, *[c for c in candidates if c != REFERENCE]]:
        started = time.process_time()
        scores = ig_attribution(model, encoded, gold, m=m, alpha_rule=rule, batch_size=batch_size, progress=False)
        seconds = time.process_time() - started
        kns = knowledge_neurons(scores, prompts)
        eff = effects(model, encoded, prompts, kns, batch_size, resamples).set_index("metric")
        row = {"model": name, "rule": rule, "m": m, "ig_cpu_seconds": round(seconds, 2),
               "completeness_error": completeness_error(model, encoded, gold, scores, batch_size),
               "kn_per_fact": float(np.mean([len(s) for s in kns.values()]))}
        for metric in ("suppress_own", "amplify_own"):
            row[metric] = float(eff.loc[metric, "ratio"])
            row[f"{metric}_ci"] = [float(eff.loc[metric, "ci_low"]), float(eff.loc[metric, "ci_high"])]
        if reference is None:
            reference = (kns, row)
        ref_kns, ref_row = reference
        scores_j = [jaccard(kns[key], ref_kns[key]) for key in ref_kns]
        row["mean_jaccard"], row["min_jaccard"] = float(np.mean(scores_j)), float(np.min(scores_j))
        row["within_ci"] = all(ref_row[f"{m_}_ci"][0] <= row[m_] <= ref_row[f"{m_}_ci"][1]
                               for m_ in ("suppress_own", "amplify_own"))
        row["speedup_vs_m20"] = REFERENCE[1] / m
        print({k: v for k, v in row.items() if not k.endswith("_ci")}, flush=True)
        results.append(row)
    return results


def smallest_passing(rows: list[dict], rule: str = "gauss_legendre") -> int | None:
    passing = [r["m"] for r in rows if r["rule"] == rule and r["mean_jaccard"] >= 0.95 and r["within_ci"]]
    return min(passing) if passing else None


def markdown(report: dict) -> str:
    lines = ["# IG quadrature: how few points reproduce m = 20 (left)", "",
             f"Machine: {report['machine']}; load before the run: {report['load']}; 1 torch thread; "
             f"{report['facts']} facts per relation for the organism, {report['base_facts']} for the bert-base-size "
             "model, of "
             f"{', '.join(report['relations'])}.", "",
             "| model | rule | m | completeness error | KN/fact | mean Jaccard vs m=20 | min Jaccard | suppress | amplify "
             "| within m=20 CIs | IG CPU s | speedup |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['rule']} | {r['m']} | {r['completeness_error']:.4f} | {r['kn_per_fact']:.2f} "
                     f"| {r['mean_jaccard']:.3f} | {r['min_jaccard']:.3f} | {r['suppress_own']:+.2%} "
                     f"[{r['suppress_own_ci'][0]:+.2%}, {r['suppress_own_ci'][1]:+.2%}] | {r['amplify_own']:+.2%} "
                     f"[{r['amplify_own_ci'][0]:+.2%}, {r['amplify_own_ci'][1]:+.2%}] "
                     f"| {'yes' if r['within_ci'] else 'no'} | {r['ig_cpu_seconds']} | {r['speedup_vs_m20']:.1f}x |")
    lines += [""]
    for model, m in report["smallest_gauss_legendre_m"].items():
        lines.append(f"- {model}: smallest Gauss-Legendre m with mean Jaccard >= 0.95 and both effects inside the m = 20 "
                     f"CIs: {m if m is not None else 'none up to the largest m tried'}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organism", type=Path, default=REPO / "results" / "kn-tiny" / "model")
    parser.add_argument("--relations", nargs="+", default=["P101", "P19", "P36", "P937"])
    parser.add_argument("--facts", type=int, default=6)
    parser.add_argument("--base-facts", type=int, default=2, help="facts per relation for the bert-base-size model")
    parser.add_argument("--gl", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 10])
    parser.add_argument("--left", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--models", nargs="+", default=["organism", "base"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    candidates = [("gauss_legendre", m) for m in args.gl] + [("left", m) for m in args.left]
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load": [round(x, 2) for x in os.getloadavg()], "relations": args.relations, "facts": args.facts,
              "base_facts": args.base_facts, "rows": []}
    if "organism" in args.models:
        model, tokenizer = load_masked_lm(args.organism)
        report["rows"] += run_model(f"organism ({args.organism})", model, tokenizer, args.relations, args.facts,
                                    candidates, args.batch_size, args.resamples)
    if "base" in args.models:
        from tests.standins import write_bert_standin

        with tempfile.TemporaryDirectory() as folder:
            standin = write_bert_standin(Path(folder) / "base", args.relations, layers=12, hidden=768, ffn=3072)
            model, tokenizer = load_masked_lm(standin)
            report["rows"] += run_model("random bert-base size", model, tokenizer, args.relations, args.base_facts,
                                        candidates, args.batch_size, args.resamples)
    report["smallest_gauss_legendre_m"] = {
        name: smallest_passing([r for r in report["rows"] if r["model"] == name]) for name in dict.fromkeys(r["model"] for r in report["rows"])
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quadrature.json").write_text(json.dumps(report, indent=2))
    (args.out / "quadrature.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
