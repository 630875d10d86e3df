"""Model-organism sweep (issue 9): collect one row per kn-tiny variant and compare variants.

Each variant is the default pipeline run with a few config overrides (one factor changed)
into its own results directory; these functions only read those runs' output files and
turn them into a tidy table, so the sweep adds no science of its own beyond the
neuron-set stability measure (Jaccard across seeds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

HEADLINE_METRICS = ("suppress_own", "amplify_own")
METHODS = ("ig", "base", "random")


def variant_overrides(variants: Mapping[str, Mapping[str, Any]], name: str) -> list[str]:
    """The Hydra overrides that define variant ``name`` (its ``overrides`` list)."""
    if name not in variants:
        raise KeyError(f"sweep.variants has no variant {name!r}; defined: {sorted(variants)}")
    spec = variants[name]
    for key in ("factor", "value", "overrides"):
        if key not in spec:
            raise KeyError(f"sweep.variants.{name} lacks {key!r}; expected keys factor, value, overrides")
    return [str(o) for o in spec["overrides"]]


def collect_variant(model_dir: Path, relations: list[str]) -> dict[str, Any]:
    """One tidy record of a finished variant run, read from its output files."""
    model_dir = Path(model_dir)
    metrics = json.loads((model_dir / "training" / "metrics.json").read_text())
    stats = json.loads((model_dir / "analysis" / "kn_stats.json").read_text())
    summary = pd.read_csv(model_dir / "evaluate" / "summary.csv")
    record: dict[str, Any] = {
        "train_accuracy": metrics["overall"]["train_accuracy"],
        "heldout_accuracy": metrics["overall"]["heldout_accuracy"],
        "majority_baseline": metrics["overall"]["majority_baseline"],
        "train_steps": metrics["training"]["steps"],
        "train_seconds": metrics["training"]["wall_seconds"],
        "parameters": metrics["data"]["parameters"],
        "mean_gold_prob": mean_gold_probability(model_dir, relations),
    }
    for method in ("ig", "base"):
        record[f"{method}_avg_kn"] = stats["methods"][method]["avg_kn_per_fact"]
        record[f"{method}_facts_without_kn"] = stats["methods"][method]["n_facts_without_kn"]
        record[f"{method}_p_mean"], record[f"{method}_relations_off_target"] = reached_p(model_dir, relations, method)
        shares = stats["layer_share"][method]
        record[f"{method}_layer_share"] = [float(x) for x in shares]
        record[f"{method}_top_layer_share"] = shares[-1]
        record[f"{method}_mean_layer"] = sum((i + 1) * s for i, s in enumerate(shares))
    record["job_seconds"] = job_seconds(model_dir.parent / "benchmarks")
    mean_rows = summary[(summary["relation"] == "mean") & (summary["variant"] == "all")]
    for metric in HEADLINE_METRICS:
        for method in METHODS:
            row = mean_rows[(mean_rows["metric"] == metric) & (mean_rows["method"] == method)]
            if row.empty:
                continue
            record[f"{metric}_{method}"] = float(row["ratio"].iloc[0])
            record[f"{metric}_{method}_ci_low"] = float(row["ci_low"].iloc[0])
            record[f"{metric}_{method}_ci_high"] = float(row["ci_high"].iloc[0])
    return record


def job_seconds(benchmark_dir: Path) -> float:
    """Summed wall seconds of every job the variant's run benchmarked: its honest cost."""
    paths = sorted(Path(benchmark_dir).rglob("*.tsv"))
    if not paths:
        raise FileNotFoundError(f"{benchmark_dir}: no benchmark *.tsv files; did the variant's run finish?")
    return float(sum(pd.read_csv(path, sep="\t")["s"].sum() for path in paths))


def mean_gold_probability(model_dir: Path, relations: list[str]) -> float:
    """Mean gold probability over the studied prompts (from the attribution prompt tables)."""
    frames = [
        pd.read_parquet(path, columns=["gold_prob"])
        for rel in relations
        for path in sorted((model_dir / "attributions" / rel).glob("*.prompts.parquet"))
    ]
    if not frames:
        raise FileNotFoundError(f"{model_dir}/attributions: no *.prompts.parquet for relations {relations}")
    return float(pd.concat(frames)["gold_prob"].mean())


def reached_p(model_dir: Path, relations: list[str], method: str) -> tuple[float, int]:
    """Mean adaptive p over relations, and how many relations ended outside the [2, 5] target."""
    ps, off = [], 0
    for rel in relations:
        record = json.loads((model_dir / "neurons" / f"{rel}.json").read_text())[method]
        ps.append(record["p"])
        off += not record["in_target"]
    return sum(ps) / len(ps), off


def neuron_jaccard(a: pd.DataFrame, b: pd.DataFrame, method: str = "ig") -> pd.DataFrame:
    """Per fact, |A ∩ B| / |A ∪ B| of two runs' knowledge-neuron sets.

    Facts are matched on (relation, fact_id); a fact absent from a table has no neurons.
    Only facts with neurons in at least one run are listed: with none in either, overlap is
    undefined rather than perfect agreement.
    """
    def sets(frame: pd.DataFrame) -> dict[tuple[str, int], set[tuple[int, int]]]:
        rows = frame[frame["method"] == method]
        out: dict[tuple[str, int], set[tuple[int, int]]] = {}
        for rel, fact, layer, neuron in zip(rows["relation"], rows["fact_id"], rows["layer"], rows["neuron"]):
            out.setdefault((str(rel), int(fact)), set()).add((int(layer), int(neuron)))
        return out

    left, right = sets(a), sets(b)
    records = []
    for key in sorted(set(left) | set(right)):
        sa, sb = left.get(key, set()), right.get(key, set())
        records.append(
            {
                "relation": key[0],
                "fact_id": key[1],
                "n_a": len(sa),
                "n_b": len(sb),
                "shared": len(sa & sb),
                "jaccard": len(sa & sb) / len(sa | sb),
            }
        )
    return pd.DataFrame(records, columns=["relation", "fact_id", "n_a", "n_b", "shared", "jaccard"])


def chance_jaccard(n_a: int, n_b: int, n_units: int) -> float:
    """Expected Jaccard of two uniform random neuron sets of sizes n_a and n_b out of n_units.

    The yardstick for cross-seed overlap: independently initialised models share no unit
    identity (hidden units are permutation-symmetric), so this is what "no shared neurons
    beyond luck" looks like. The intersection is hypergeometric; the expectation is exact.
    """
    if n_a + n_b == 0:
        raise ValueError("chance_jaccard: both sets are empty; overlap is undefined")
    if not 0 <= n_a <= n_units or not 0 <= n_b <= n_units:
        raise ValueError(f"chance_jaccard: set sizes {n_a}, {n_b} must lie in [0, {n_units}]")
    total = math.comb(n_units, n_b)
    expected = 0.0
    for k in range(max(0, n_a + n_b - n_units), min(n_a, n_b) + 1):
        pmf = math.comb(n_a, k) * math.comb(n_units - n_a, n_b - k) / total
        expected += pmf * k / (n_a + n_b - k)
    return expected


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Rank correlation (Pearson on average ranks, ties shared); NaN below 3 pairs or for a constant side.

    Written out because pandas' ``method="spearman"`` needs scipy, which we do not otherwise use.
    """
    if len(a) < 3:
        return float("nan")
    ra, rb = a.rank().to_numpy(dtype=float), b.rank().to_numpy(dtype=float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(pd.Series(ra).corr(pd.Series(rb)))


def seed_stability(per_fact: pd.DataFrame, n_units: int) -> dict[str, Any]:
    """Summarise a ``neuron_jaccard`` table of two seeds against the random-set yardstick."""
    if per_fact.empty:
        return {"facts": 0}
    chance = [chance_jaccard(int(a), int(b), n_units) for a, b in zip(per_fact["n_a"], per_fact["n_b"])]
    both = per_fact[(per_fact["n_a"] > 0) & (per_fact["n_b"] > 0)]
    return {
        "facts": int(len(per_fact)),
        "facts_with_kn_in_both": int(len(both)),
        "mean_jaccard": float(per_fact["jaccard"].mean()),
        "median_jaccard": float(per_fact["jaccard"].median()),
        "chance_jaccard": float(sum(chance) / len(chance)),
        "facts_identical": int((per_fact["jaccard"] == 1.0).sum()),
        "facts_sharing_a_neuron": int((per_fact["shared"] > 0).sum()),
        # Does a fact that needs many neurons in one seed need many in the other?
        "kn_count_spearman": spearman(both["n_a"], both["n_b"]),
    }


def effect_holds(record: Mapping[str, Any]) -> bool:
    """IG neurons move the gold probability the right way, both ways: suppression's 95% CI
    lies below 0 and amplification's above 0 (SPEC §5 headline effect)."""
    try:
        return bool(record["suppress_own_ig_ci_high"] < 0 and record["amplify_own_ig_ci_low"] > 0)
    except KeyError:
        return False


def factor_axes(variants: Mapping[str, Mapping[str, Any]], baseline: str, cfg: Any) -> dict[str, list[tuple[str, str]]]:
    """Per varied factor, the (variant, x label) points in axis order, baseline included.

    The baseline sits at its own config value of the key the factor's overrides change
    (e.g. ffn_width 1024), so each panel reads as effect against that factor. Numeric
    values are sorted; anything else (e.g. "converged") goes last, in config order.
    """
    from omegaconf import OmegaConf

    axes: dict[str, list[tuple[str, str]]] = {}
    for name, spec in variants.items():
        if name == baseline:
            continue
        axes.setdefault(str(spec["factor"]), []).append((name, str(spec["value"])))
    out = {}
    for factor, points in axes.items():
        keys = {o.split("=", 1)[0].lstrip("+~") for n, _ in points for o in variant_overrides(variants, n)}
        base_value = ", ".join(str(OmegaConf.select(cfg, k)) for k in sorted(keys))
        if baseline in variants:
            points = [*points, (baseline, base_value)]

        def order(point: tuple[str, str]) -> tuple[int, float]:
            try:
                return (0, float(point[1]))
            except ValueError:
                return (1, 0.0)

        out[factor] = [(n, f"{v}\n(baseline)" if n == baseline else v) for n, v in sorted(points, key=order)]
    return out
