"""Model-organism sweep: collect one row per kn-tiny variant and compare variants.

Each variant is the default pipeline run with a few config overrides (one factor changed)
into its own results directory; these functions only read those runs' output files and
turn them into a tidy table, so the sweep adds no science of its own beyond the
neuron-set stability measure (Jaccard across seeds).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from kn.jobrecord import read_benchmark
from kn.tables import layers_and_units

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


def seed_variants(variants: Mapping[str, Mapping[str, Any]], baseline: str, selected: Sequence[str]) -> list[str]:
    """The baseline and the selected variants that change only the seed (for seed stability); empty
    when the baseline or every seed variant is left out of the run."""
    seeds = [name for name in selected if str(variants[name]["factor"]) == "seed"]
    return [baseline, *seeds] if seeds and baseline in selected else []


def collect_variant(
    metrics: Mapping[str, Any],
    kn_stats: Mapping[str, Any],
    effects: pd.DataFrame,
    gold_probs: pd.Series,
    refine_records: Mapping[str, Mapping[str, Any]],
    job_seconds: float,
    ceiling: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One tidy record of a finished variant run, from its files' contents.

    ``metrics`` is the training metrics JSON, ``kn_stats`` the analysis JSON, ``effects`` the
    suppress/amplify summary table, ``gold_probs`` the gold probability of every studied prompt,
    ``refine_records`` the refine JSON per relation and ``job_seconds`` the summed wall time of
    the variant's jobs; ``ceiling`` the ALL row of its localisation ceilings (kn.localise), when measured.
    """
    n_layers, ffn_size = layers_and_units(list(refine_records.values()))
    record: dict[str, Any] = {
        "train_accuracy": metrics["overall"]["train_accuracy"],
        "heldout_accuracy": metrics["overall"]["heldout_accuracy"],
        "majority_baseline": metrics["overall"]["majority_baseline"],
        "train_steps": metrics["training"]["steps"],
        "train_seconds": metrics["training"]["wall_seconds"],
        "parameters": metrics["data"]["parameters"],
        "mean_gold_prob": float(gold_probs.mean()),
        "n_layers": n_layers,
        "ffn_size": ffn_size,
    }
    for method in ("ig", "base"):
        record[f"{method}_avg_kn"] = kn_stats["methods"][method]["avg_kn_per_fact"]
        record[f"{method}_facts_without_kn"] = kn_stats["methods"][method]["n_facts_without_kn"]
        ps = [rec[method]["p"] for rec in refine_records.values()]
        record[f"{method}_p_mean"] = sum(ps) / len(ps)
        record[f"{method}_relations_off_target"] = sum(not rec[method]["in_target"] for rec in refine_records.values())
        shares = kn_stats["layer_share"][method]
        record[f"{method}_layer_share"] = [float(x) for x in shares]
        record[f"{method}_top_layer_share"] = shares[-1]
        record[f"{method}_mean_layer"] = sum((i + 1) * s for i, s in enumerate(shares))
    record["job_seconds"] = job_seconds
    if ceiling is not None:
        for name in ("ffn_mask_all", "ffn_subject_all", "attn_mask_all"):
            record[name] = ceiling[name]
        record["ffn_mask_layers"] = [ceiling[f"ffn_mask_layer_{k}"] for k in range(n_layers)]
    mean_rows = effects[(effects["relation"] == "mean") & (effects["variant"] == "all")]
    for metric in HEADLINE_METRICS:
        for method in METHODS:
            row = mean_rows[(mean_rows["metric"] == metric) & (mean_rows["method"] == method)]
            if row.empty:
                continue
            record[f"{metric}_{method}"] = float(row["ratio"].iloc[0])
            record[f"{metric}_{method}_ci_low"] = float(row["ci_low"].iloc[0])
            record[f"{metric}_{method}_ci_high"] = float(row["ci_high"].iloc[0])
    return record


def job_seconds(benchmarks: Sequence[Path]) -> float:
    """Summed wall seconds of the given Snakemake benchmark files: a variant's honest cost."""
    if not benchmarks:
        raise FileNotFoundError("no benchmark files given; did the variant's run finish?")
    return sum(read_benchmark(path)["s"] for path in benchmarks)


def ig_neuron_table(rows: Sequence[Sequence[Any]]) -> pd.DataFrame:
    """A record's ``ig_neurons`` ([relation, fact_id, layer, neuron] rows) as a neurons table of method "ig"."""
    frame = pd.DataFrame(list(rows), columns=["relation", "fact_id", "layer", "neuron"])
    return frame.assign(method="ig")


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
                "layers_a": _per_layer(sa),
                "layers_b": _per_layer(sb),
                "shared": len(sa & sb),
                "jaccard": len(sa & sb) / len(sa | sb),
            }
        )
    columns = ["relation", "fact_id", "n_a", "n_b", "layers_a", "layers_b", "shared", "jaccard"]
    return pd.DataFrame(records, columns=columns)


def _per_layer(neurons: set[tuple[int, int]]) -> dict[int, int]:
    return dict(Counter(layer for layer, _ in neurons))


def _intersection_pmf(n_a: int, n_b: int, n_units: int) -> list[float]:
    """P(|A ∩ B| = k) for uniform random sets of sizes n_a, n_b out of n_units (hypergeometric)."""
    if not 0 <= n_a <= n_units or not 0 <= n_b <= n_units:
        raise ValueError(f"chance_jaccard: set sizes {n_a}, {n_b} must lie in [0, {n_units}]")
    total = math.comb(n_units, n_b)
    # math.comb is 0 when fewer than n_b - k units lie outside A, so impossible k get 0
    return [math.comb(n_a, k) * math.comb(n_units - n_a, n_b - k) / total for k in range(min(n_a, n_b) + 1)]


def layer_matched_chance_jaccard(
    per_layer_a: Mapping[int, int], per_layer_b: Mapping[int, int], units_per_layer: int
) -> float:
    """Expected Jaccard of random neuron sets drawn layer by layer with the given per-layer sizes.

    The fair yardstick when neurons pile up in one layer (the top layer holds most IG
    neurons): two random sets confined to it overlap far more often than two drawn from all
    units. Intersections of different layers are independent, so the total overlap's law is
    the convolution of the per-layer hypergeometric laws; the expectation is exact.
    """
    n_a, n_b = sum(per_layer_a.values()), sum(per_layer_b.values())
    if n_a + n_b == 0:
        raise ValueError("chance_jaccard: both sets are empty; overlap is undefined")
    pmf = [1.0]
    for layer in set(per_layer_a) | set(per_layer_b):
        layer_pmf = _intersection_pmf(per_layer_a.get(layer, 0), per_layer_b.get(layer, 0), units_per_layer)
        convolved = [0.0] * (len(pmf) + len(layer_pmf) - 1)
        for i, p in enumerate(pmf):
            for j, q in enumerate(layer_pmf):
                convolved[i + j] += p * q
        pmf = convolved
    return sum(p * k / (n_a + n_b - k) for k, p in enumerate(pmf))


def chance_jaccard(n_a: int, n_b: int, n_units: int) -> float:
    """Expected Jaccard of two uniform random neuron sets of sizes n_a and n_b out of n_units.

    The yardstick for cross-seed overlap: independently initialised models share no unit
    identity (hidden units are permutation-symmetric), so this is what "no shared neurons
    beyond luck" looks like.
    """
    return layer_matched_chance_jaccard({0: n_a}, {0: n_b}, n_units)


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


def seed_stability(per_fact: pd.DataFrame, num_layers: int, units_per_layer: int) -> dict[str, Any]:
    """Summarise a ``neuron_jaccard`` table of two seeds against random-set yardsticks: sets
    drawn from all units, and sets drawn with each fact's own per-layer counts."""
    if per_fact.empty:
        return {"facts": 0}
    n_units = num_layers * units_per_layer
    chance = [chance_jaccard(int(a), int(b), n_units) for a, b in zip(per_fact["n_a"], per_fact["n_b"])]
    matched = [
        layer_matched_chance_jaccard(a, b, units_per_layer) for a, b in zip(per_fact["layers_a"], per_fact["layers_b"])
    ]
    both = per_fact[(per_fact["n_a"] > 0) & (per_fact["n_b"] > 0)]
    return {
        "facts": int(len(per_fact)),
        "facts_with_kn_in_both": int(len(both)),
        "mean_jaccard": float(per_fact["jaccard"].mean()),
        "median_jaccard": float(per_fact["jaccard"].median()),
        "chance_jaccard": float(sum(chance) / len(chance)),
        "chance_jaccard_layer_matched": float(sum(matched) / len(matched)),
        "facts_identical": int((per_fact["jaccard"] == 1.0).sum()),
        "facts_sharing_a_neuron": int((per_fact["shared"] > 0).sum()),
        # Does a fact that needs many neurons in one seed need many in the other?
        "kn_count_spearman": spearman(both["n_a"], both["n_b"]),
    }


def learned_facts(record: Mapping[str, Any]) -> bool:
    """The variant's model beats always answering each relation's most common object.

    A recipe change can leave training stuck on the loss plateau where the model predicts
    only the object prior; IG still ranks neurons there, so without this flag such a
    variant's "knowledge neurons" would read like a result about stored facts.
    """
    return bool(record["train_accuracy"] > record["majority_baseline"])


def confidence_trend(table: pd.DataFrame) -> dict[str, Any]:
    """Over variants that learned their facts, the rank correlation of the model's mean gold
    probability with each IG effect: do the effects depend on how confident the model is,
    whichever factor made it so?"""
    learned = table[table["learned_facts"].astype(bool)]
    out: dict[str, Any] = {"variants": int(len(learned))}
    for metric in HEADLINE_METRICS:
        column = f"{metric}_ig"
        out[f"spearman_gold_prob_{metric}"] = (
            spearman(learned["mean_gold_prob"], learned[column]) if column in learned else float("nan")
        )
    return out


def effect_holds(record: Mapping[str, Any]) -> bool:
    """IG neurons move the gold probability the right way, both ways: suppression's 95% CI
    lies below 0 and amplification's above 0 (SPEC §5 headline effect)."""
    try:
        return bool(record["suppress_own_ig_ci_high"] < 0 and record["amplify_own_ig_ci_low"] > 0)
    except KeyError:
        return False


def factor_axes(variants: Mapping[str, Mapping[str, Any]], baseline: str, cfg: Any) -> dict[str, list[tuple[str, str]]]:
    """Per varied factor, the (variant, x label) points in axis order, its reference included.

    A factor's reference is the sweep baseline unless its variants name another with
    ``reference:`` (e.g. widths retrained at a lower lr are compared with the default width
    at that lr). The reference sits at its own value of the keys that vary within the
    factor (e.g. ffn_width 1024), so each panel reads as effect against that factor.
    Values are sorted by their leading number; anything else (e.g. "converged") goes last.
    """
    from omegaconf import OmegaConf

    groups: dict[str, list[str]] = {}
    for name, spec in variants.items():
        if name != baseline:
            groups.setdefault(str(spec["factor"]), []).append(name)
    out = {}
    for factor, names in groups.items():
        references = {str(variants[n].get("reference", baseline)) for n in names}
        if len(references) > 1:
            raise ValueError(f"sweep factor {factor!r}: its variants name different references {sorted(references)}")
        reference = references.pop()
        if reference != baseline and reference not in variants:
            raise KeyError(f"sweep factor {factor!r}: reference {reference!r} is not a variant in sweep.variants")
        settings = [_override_values(variants, n) for n in names]
        keys = sorted({k for setting in settings for k in setting})
        varying = [k for k in keys if len({setting.get(k) for setting in settings}) > 1] or keys
        own = _override_values(variants, reference) if reference in variants else {}
        ref_value = ", ".join(own.get(k, str(OmegaConf.select(cfg, k))) for k in varying)
        points = [(n, str(variants[n]["value"])) for n in names]
        if reference in variants:
            tag = "baseline" if reference == baseline else f"ref: {reference}"
            points.append((reference, f"{ref_value}\n({tag})"))
        out[factor] = sorted(points, key=_axis_order)
    return out


def _override_values(variants: Mapping[str, Mapping[str, Any]], name: str) -> dict[str, str]:
    """The variant's overrides as key -> value text (a deletion ``~key`` maps to "")."""
    pairs = (o.split("=", 1) for o in variant_overrides(variants, name))
    return {pair[0].lstrip("+~"): pair[1] if len(pair) == 2 else "" for pair in pairs}


def _axis_order(point: tuple[str, str]) -> tuple[int, float]:
    try:
        return (0, float(point[1].split()[0]))
    except (ValueError, IndexError):
        return (1, 0.0)


SWEEP_COLUMNS = [
    "variant", "factor", "value", "overrides", "train_accuracy", "heldout_accuracy", "mean_gold_prob", "ffn_mask_all",
    "ffn_subject_all", "attn_mask_all", "train_steps",
    "train_seconds", "job_seconds", "ig_avg_kn", "base_avg_kn", "ig_facts_without_kn", "ig_p_mean",
    "ig_relations_off_target", "ig_mean_layer", "ig_top_layer_share",
    "suppress_own_ig", "suppress_own_ig_ci_low", "suppress_own_ig_ci_high", "suppress_own_base",
    "suppress_own_random", "amplify_own_ig", "amplify_own_ig_ci_low", "amplify_own_ig_ci_high",
    "amplify_own_base", "amplify_own_random", "majority_baseline", "learned_facts", "effect_holds",
]


def layer_table(records: list[dict], key: str = "ig_layer_share") -> pd.DataFrame:
    """A per-layer list of each record (default: the share of IG knowledge neurons), L1 = bottom, one row per variant."""
    rows = {r["variant"]: r.get(key, []) for r in records}
    width = max((len(v) for v in rows.values()), default=0)
    return pd.DataFrame.from_dict(
        {k: list(v) + [float("nan")] * (width - len(v)) for k, v in rows.items()},
        orient="index", columns=[f"L{i + 1}" for i in range(width)],
    ).rename_axis("variant")


def sweep_table(records: list[dict], variants: Mapping[str, Mapping[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sweep table (one row per variant, in the config's order) and its IG layer shares.

    Labels come from the current config, so relabelling needs no rerun; ``overrides`` lists
    every change of a variant, confounds too.
    """
    for record in records:
        spec = variants[record["variant"]]
        record["factor"], record["value"] = str(spec["factor"]), str(spec["value"])
        record["overrides"] = " ".join(variant_overrides(variants, record["variant"]))
        record["learned_facts"] = learned_facts(record)
        record["effect_holds"] = effect_holds(record)
    order = {name: i for i, name in enumerate(variants)}
    records.sort(key=lambda r: order[r["variant"]])
    table = pd.DataFrame(records)
    layers = layer_table(records)
    table = table[[c for c in SWEEP_COLUMNS if c in table.columns]].merge(
        layers.add_prefix("ig_layer_share_"), left_on="variant", right_index=True, how="left")
    ceilings = layer_table(records, "ffn_mask_layers")
    if not ceilings.empty and ceilings.shape[1]:
        table = table.merge(ceilings.add_prefix("ffn_mask_"), left_on="variant", right_index=True, how="left")
    return table, layers


def sweep_markdown(table: pd.DataFrame, layers: pd.DataFrame, records: list[dict], baseline: str,
                   stability: Mapping[str, Mapping[str, Any]], trend: Mapping[str, Any]) -> str:
    """The sweep for humans: the table, layer shares, seed stability and the confidence trend."""
    md = ["# Model-organism sweep", "",
          f"Baseline variant: `{baseline}`; each other variant changes one factor of the default recipe. "
          "Ratios are the unweighted mean over relations of the ratio of averages (SPEC §5); IG 95% CIs are "
          "bootstrap over facts. `effect_holds`: suppression CI below 0 and amplification CI above 0. "
          "`learned_facts`: training-template accuracy above the majority-object baseline. "
          "`job_seconds`: summed wall time of the variant's jobs (training included). `ffn_mask_all`: the [MASK]-FFN "
          "ceiling (localise: every FFN neuron at the target position zeroed; per layer in sweep.csv, ffn_mask_L<k>); "
          "`ffn_subject_all`, `attn_mask_all`: the same at the subject's tokens / for attention outputs.", ""]
    not_learned = [r["variant"] for r in records if not r["learned_facts"]]
    if not_learned:
        md += [f"**Did not learn its facts** (accuracy at or below always answering the most common object, so "
               f"its neurons are not knowledge neurons): {', '.join(f'`{n}`' for n in not_learned)}.", ""]
    md.append(table.drop(columns=[c for c in table.columns if c.startswith(("ig_layer_share_", "ffn_mask_L"))])
              .to_markdown(index=False, floatfmt=".4g"))
    md += ["", "## Layer distribution of IG knowledge neurons (share per layer, L1 = bottom)", "",
           layers.to_markdown(floatfmt=".3f")]
    if stability:
        md += ["", "## Neuron-set stability across seeds (IG, Jaccard per fact)", "",
               "Independently initialised models share no unit identity (hidden units are permutation-symmetric), "
               "so the yardsticks are the Jaccard of two random sets of the same sizes, drawn from all units or "
               "layer-matched (each fact's per-layer neuron counts kept; fair when most neurons sit in one layer).",
               ""]
        for name, s in stability.items():
            if not s["facts"]:
                md.append(f"- `{baseline}` vs `{name}`: no fact has neurons in either run")
                continue
            md.append(f"- `{baseline}` vs `{name}`: mean Jaccard {s['mean_jaccard']:.4f} (random sets: "
                      f"{s['chance_jaccard']:.4f}, layer-matched {s['chance_jaccard_layer_matched']:.4f}), median "
                      f"{s['median_jaccard']:.3f} over {s['facts']} facts with neurons in either run ({s['facts_with_kn_in_both']} in both); {s['facts_sharing_a_neuron']} share at "
                      f"least one neuron, {s['facts_identical']} identical; Spearman of per-fact neuron counts "
                      f"{s['kn_count_spearman']:.2f}")
    md += ["", "## Effect size against confidence", "",
           f"Over the {trend['variants']} variants that learned their facts, Spearman rank correlation of mean gold "
           f"probability with the IG suppression ratio: {trend['spearman_gold_prob_suppress_own']:.2f}; with the IG "
           f"amplification ratio: {trend['spearman_gold_prob_amplify_own']:.2f} (suppression ratios are negative, so a "
           "positive value means more confident models lose less)."]
    return "\n".join(md) + "\n"
