"""Stage: the organism-sweep table and figures: effect size against each varied factor (issue 9)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kn.io import atomic_path, provenance, read_parquet, write_json, write_text  # noqa: E402
from kn.stages.cli import StageArgs, run_stage  # noqa: E402
from kn.sweep import METHODS, neuron_jaccard  # noqa: E402

log = logging.getLogger("kn.sweep")

COLUMNS = [
    "variant", "factor", "value", "train_accuracy", "heldout_accuracy", "mean_gold_prob", "train_steps",
    "train_seconds", "ig_avg_kn", "base_avg_kn", "ig_p_mean", "ig_relations_off_target", "ig_mean_layer",
    "suppress_own_ig", "suppress_own_ig_ci_low", "suppress_own_ig_ci_high", "suppress_own_base",
    "suppress_own_random", "amplify_own_ig", "amplify_own_ig_ci_low", "amplify_own_ig_ci_high",
    "amplify_own_base", "amplify_own_random",
]


def effect_figure(table: pd.DataFrame, baseline: str, path_png: Path, path_pdf: Path) -> None:
    """One panel per factor: suppress/amplify ratios (IG with 95% CI, base, random) per value."""
    factors = [f for f in dict.fromkeys(table["factor"]) if f != "baseline"]
    fig, axes = plt.subplots(1, max(1, len(factors)), figsize=(4.2 * max(1, len(factors)), 4), squeeze=False)
    base_row = table[table["variant"] == baseline]
    for ax, factor in zip(axes[0], factors):
        rows = pd.concat([base_row, table[table["factor"] == factor]])
        labels = [f"{v}\n(default)" if n == baseline else str(v) for n, v in zip(rows["variant"], rows["value"])]
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
        ax.set_xticks(list(x), labels)
        ax.set_title(f"varied: {factor}")
        ax.set_ylabel("correct-probability change ratio")
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    for path in (path_png, path_pdf):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=150)
    plt.close(fig)


def main(args: StageArgs) -> None:
    cfg = args.cfg
    records = [json.loads(path.read_text()) for name, path in sorted(args.inputs.items()) if name.startswith("record:")]
    table = pd.DataFrame(records)
    table = table[[c for c in COLUMNS if c in table.columns]]
    variants = cfg.sweep.variants
    seeds = [name for name, spec in variants.items() if spec["factor"] == "seed"]
    stability: dict = {}
    if seeds and cfg.sweep.baseline in variants:
        model = str(cfg.model.name)
        root = Path(cfg.results_dir)
        for other in seeds:
            frames = []
            for name in (cfg.sweep.baseline, other):
                paths = sorted((root / "sweep" / name / model / "neurons").glob("*.parquet"))
                frames.append(pd.concat([read_parquet(p) for p in paths], ignore_index=True))
            per_fact = neuron_jaccard(*frames, method="ig")
            stability[other] = {
                "facts": int(len(per_fact)),
                "mean_jaccard": float(per_fact["jaccard"].mean()),
                "median_jaccard": float(per_fact["jaccard"].median()),
                "facts_identical": int((per_fact["jaccard"] == 1.0).sum()),
            }
    write_text(args.output("csv"), table.to_csv(index=False))
    md = ["# Model-organism sweep (issue 9)", "",
          f"Baseline variant: `{cfg.sweep.baseline}`; each other variant changes one factor. Ratios are the",
          "unweighted mean over relations of the ratio of averages (SPEC §5); IG 95% CIs are bootstrap over facts.", ""]
    md.append(table.to_markdown(index=False, floatfmt=".4g"))
    if stability:
        md += ["", "## Neuron-set stability across seeds (IG, Jaccard per fact)", ""]
        for name, s in stability.items():
            md.append(f"- `{cfg.sweep.baseline}` vs `{name}`: mean Jaccard {s['mean_jaccard']:.3f}, median "
                      f"{s['median_jaccard']:.3f} over {s['facts']} facts with neurons in either run; "
                      f"{s['facts_identical']} identical sets")
    write_text(args.output("markdown"), "\n".join(md) + "\n")
    write_json(args.output("json"), {"variants": records, "seed_stability": stability,
                                     "provenance": provenance(cfg, "sweep_summary")})
    effect_figure(table, cfg.sweep.baseline, args.output("figure_png"), args.output("figure_pdf"))
    log.info("sweep table over %d variants written", len(table))


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
