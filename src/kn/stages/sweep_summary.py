"""Stage: the organism-sweep table and figures: effect size against each varied factor (issue 9)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kn.figures import save_figure  # noqa: E402
from kn.io import provenance, read_parquet, write_json, write_text  # noqa: E402
from kn.stages.cli import StageArgs, run_stage  # noqa: E402
from kn.sweep import (  # noqa: E402
    METHODS,
    confidence_trend,
    effect_holds,
    factor_axes,
    learned_facts,
    neuron_jaccard,
    seed_stability,
    variant_overrides,
)

log = logging.getLogger("kn.sweep")

COLUMNS = [
    "variant", "factor", "value", "overrides", "train_accuracy", "heldout_accuracy", "mean_gold_prob", "train_steps",
    "train_seconds", "job_seconds", "ig_avg_kn", "base_avg_kn", "ig_facts_without_kn", "ig_p_mean",
    "ig_relations_off_target", "ig_mean_layer", "ig_top_layer_share",
    "suppress_own_ig", "suppress_own_ig_ci_low", "suppress_own_ig_ci_high", "suppress_own_base",
    "suppress_own_random", "amplify_own_ig", "amplify_own_ig_ci_low", "amplify_own_ig_ci_high",
    "amplify_own_base", "amplify_own_random", "majority_baseline", "learned_facts", "effect_holds",
]


def _plot_effects(ax, rows: pd.DataFrame) -> None:
    x = range(len(rows))
    for metric, marker in (("suppress_own", "v"), ("amplify_own", "^")):
        for method, colour in zip(METHODS, ("tab:blue", "tab:orange", "tab:gray")):
            col = f"{metric}_{method}"
            if col not in rows:
                continue
            yerr = None
            if method == "ig":
                yerr = [rows[col] - rows[f"{col}_ci_low"], rows[f"{col}_ci_high"] - rows[col]]
            ax.errorbar(x, rows[col], yerr=yerr, marker=marker, color=colour, linestyle="-" if method == "ig" else ":",
                        capsize=3, label=f"{metric.split('_')[0]} {method}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("correct-probability change ratio")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))


def effect_figure(table: pd.DataFrame, axes_spec: dict[str, list[tuple[str, str]]], path_png: Path,
                  path_pdf: Path) -> None:
    """Per factor: suppress/amplify ratios (IG with 95% CI, base, random; top) and knowledge
    neurons per fact (bottom), against the factor's values with the baseline in place.
    Variants whose model did not learn its facts stay plotted but are shaded and labelled."""
    present = set(table["variant"])  # a factor whose variants were not run (sweep.only) gets no panel
    factors = [f for f in axes_spec if sum(n in present for n, _ in axes_spec[f]) >= 2]
    ncols = max(1, len(factors))
    # y is not shared: one weakly trained variant's large ratio would flatten every other panel
    fig, axes = plt.subplots(2, ncols, figsize=(3.6 * ncols, 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    indexed = table.set_index("variant")
    for col, factor in enumerate(factors):
        points = [(n, label) for n, label in axes_spec[factor] if n in indexed.index]
        rows = indexed.loc[[n for n, _ in points]]
        top, bottom = axes[0][col], axes[1][col]
        _plot_effects(top, rows)
        top.set_title(f"varied: {factor}")
        x = range(len(rows))
        for method, colour in (("ig", "tab:blue"), ("base", "tab:orange")):
            bottom.plot(x, rows[f"{method}_avg_kn"], marker="o", color=colour, label=f"{method}")
        bottom.axhspan(2, 5, color="tab:green", alpha=0.12, label="[2, 5] target")
        bottom.set_yscale("log")  # a model that stores nothing gets ~100 "neurons" per fact
        bottom.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        bottom.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        bottom.set_ylabel("knowledge neurons / fact")
        labels = [label for _, label in points]
        for i, learned in enumerate(rows["learned_facts"]):
            if not learned:
                labels[i] += "\n(not learned)"
                for ax in (top, bottom):
                    ax.axvspan(i - 0.3, i + 0.3, color="tab:red", alpha=0.1, linewidth=0)
        for ax in (top, bottom):
            ax.set_xticks(list(x), labels, fontsize=7)
            ax.set_xlim(-0.5, len(rows) - 0.5)
        if col:
            top.set_ylabel("")
            bottom.set_ylabel("")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, (path_png, path_pdf))


def confidence_figure(table: pd.DataFrame, path_png: Path, path_pdf: Path) -> None:
    """IG suppress/amplify ratios (95% CI) against each variant's mean gold probability,
    whatever factor set it; hollow markers: variants that did not learn their facts."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for metric, marker, colour in (("suppress_own", "v", "tab:blue"), ("amplify_own", "^", "tab:red")):
        col = f"{metric}_ig"
        for learned in (True, False):
            rows = table[table["learned_facts"].astype(bool) == learned]
            if rows.empty:
                continue
            ax.errorbar(rows["mean_gold_prob"], rows[col], yerr=[rows[col] - rows[f"{col}_ci_low"],
                        rows[f"{col}_ci_high"] - rows[col]], marker=marker, linestyle="none", capsize=3,
                        color=colour, markerfacecolor=colour if learned else "white",
                        label=f"{metric.split('_')[0]} IG" + ("" if learned else " (not learned)"))
        for _, row in table.iterrows():
            ax.annotate(row["variant"], (row["mean_gold_prob"], row[col]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("mean gold probability of the studied prompts")
    ax.set_ylabel("correct-probability change ratio")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, (path_png, path_pdf))


def layer_table(records: list[dict]) -> pd.DataFrame:
    """Share of IG knowledge neurons per layer (L1 = bottom), one row per variant."""
    rows = {r["variant"]: r.get("ig_layer_share", []) for r in records}
    width = max((len(v) for v in rows.values()), default=0)
    return pd.DataFrame.from_dict(
        {k: list(v) + [float("nan")] * (width - len(v)) for k, v in rows.items()},
        orient="index", columns=[f"L{i + 1}" for i in range(width)],
    ).rename_axis("variant")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    variants = cfg.sweep.variants
    records = [json.loads(path.read_text()) for path in args.keyed_inputs("record").values()]
    for record in records:  # labels come from the current config, so relabelling needs no rerun
        spec = variants[record["variant"]]
        record["factor"], record["value"] = str(spec["factor"]), str(spec["value"])
        record["overrides"] = " ".join(variant_overrides(variants, record["variant"]))  # every change, confounds too
        record["learned_facts"] = learned_facts(record)
        record["effect_holds"] = effect_holds(record)
    order = {name: i for i, name in enumerate(variants)}
    records.sort(key=lambda r: order[r["variant"]])
    table = pd.DataFrame(records)
    layers = layer_table(records)
    table = table[[c for c in COLUMNS if c in table.columns]].merge(
        layers.add_prefix("ig_layer_share_"), left_on="variant", right_index=True, how="left")
    seeds = [name for name, spec in variants.items() if spec["factor"] == "seed" and name in set(table["variant"])]
    stability: dict = {}
    if seeds and cfg.sweep.baseline in set(table["variant"]):
        model = str(cfg.model.name)
        root = Path(cfg.results_dir)
        for other in seeds:
            frames = []
            for name in (cfg.sweep.baseline, other):
                paths = sorted((root / "sweep" / name / model / "neurons").glob("*.parquet"))
                frames.append(pd.concat([read_parquet(p) for p in paths], ignore_index=True))
            stability[other] = seed_stability(neuron_jaccard(*frames, method="ig"), int(cfg.model.train.num_layers),
                                              int(cfg.model.train.intermediate_size))
    write_text(args.output("csv"), table.to_csv(index=False))
    md = ["# Model-organism sweep (issue 9)", "",
          f"Baseline variant: `{cfg.sweep.baseline}`; each other variant changes one factor of the default recipe. "
          "Ratios are the unweighted mean over relations of the ratio of averages (SPEC §5); IG 95% CIs are "
          "bootstrap over facts. `effect_holds`: suppression CI below 0 and amplification CI above 0. "
          "`learned_facts`: training-template accuracy above the majority-object baseline. "
          "`job_seconds`: summed wall time of the variant's jobs (training included).", ""]
    not_learned = [r["variant"] for r in records if not r["learned_facts"]]
    if not_learned:
        md += [f"**Did not learn its facts** (accuracy at or below always answering the most common object, so "
               f"its neurons are not knowledge neurons): {', '.join(f'`{n}`' for n in not_learned)}.", ""]
    md.append(table.drop(columns=[c for c in table.columns if c.startswith("ig_layer_share_")])
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
                md.append(f"- `{cfg.sweep.baseline}` vs `{name}`: no fact has neurons in either run")
                continue
            md.append(f"- `{cfg.sweep.baseline}` vs `{name}`: mean Jaccard {s['mean_jaccard']:.4f} (random sets: "
                      f"{s['chance_jaccard']:.4f}, layer-matched {s['chance_jaccard_layer_matched']:.4f}), median "
                      f"{s['median_jaccard']:.3f} over {s['facts']} facts with neurons in either run ({s['facts_with_kn_in_both']} in both); {s['facts_sharing_a_neuron']} share at "
                      f"least one neuron, {s['facts_identical']} identical; Spearman of per-fact neuron counts "
                      f"{s['kn_count_spearman']:.2f}")
    trend = confidence_trend(table)
    md += ["", "## Effect size against confidence", "",
           f"Over the {trend['variants']} variants that learned their facts, Spearman rank correlation of mean gold "
           f"probability with the IG suppression ratio: {trend['spearman_gold_prob_suppress_own']:.2f}; with the IG "
           f"amplification ratio: {trend['spearman_gold_prob_amplify_own']:.2f} (suppression ratios are negative, so a "
           "positive value means more confident models lose less)."]
    write_text(args.output("markdown"), "\n".join(md) + "\n")
    write_json(args.output("json"), {"variants": records, "seed_stability": stability, "confidence_trend": trend,
                                     "provenance": provenance(cfg, "sweep_summary")})
    effect_figure(table, factor_axes(variants, cfg.sweep.baseline, cfg), args.output("figure_png"),
                  args.output("figure_pdf"))
    confidence_figure(table, args.output("confidence_png"), args.output("confidence_pdf"))
    log.info("sweep table over %d variants written", len(table))


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
