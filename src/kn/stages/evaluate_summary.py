"""Stage: suppression/amplification summary over relations (SPEC §5, §9) with bootstrap CIs and figures.

Inputs: per relation ``--in results:<rel>=<rel>.parquet`` and ``--in dose:<rel>=<rel>.dose.parquet``
from the evaluate stage. Outputs: summary.json (headline numbers + provenance),
summary.csv (every relation, method, metric, variant with its 95% CI), summary.md,
dose_response.csv, and the figures suppress/amplify/dose_response (PNG and PDF).
"""

from __future__ import annotations

import io
import logging

import pandas as pd

from kn.figures import dose_response_figure, relation_bars_figure, save_figure
from kn.interventions import PAPER, summarize, summarize_dose
from kn.io import provenance, read_parquet, write_json, write_text
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.evaluate_summary")

LABELS = {"ig": "Ours (IG)", "base": "Baseline", "random": "Random"}


def read_tables(args: StageArgs, kind: str, columns: list[str]) -> pd.DataFrame:
    frames = []
    for relation, path in args.keyed_inputs(kind).items():
        frame = read_parquet(path)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; rerun the evaluate stage for {relation}")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def headline_markdown(summary: pd.DataFrame) -> str:
    """Overall means (with CIs) beside the paper's numbers, then the per-relation own-prompt ratios."""
    methods = [m for m in LABELS if m in set(summary["method"])]
    mean = summary[summary["relation"] == "mean"].set_index(["metric", "variant", "method"])
    out = io.StringIO()
    out.write("# Suppressing and amplifying knowledge neurons (SPEC §5)\n\n")
    out.write("Ratio of averages mean(Δp) / mean(p0) per relation, then the unweighted mean over relations; "
              "95% bootstrap CIs over facts. `all`: every studied fact (zero-KN facts count with Δ = 0, as in the "
              "paper); `with_kn`: only facts with at least one neuron.\n\n")
    out.write("| metric | variant | " + " | ".join(LABELS[m] for m in methods) + " | paper ours | paper baseline |\n")
    out.write("|---|---|" + "---|" * len(methods) + "---|---|\n")
    for metric, variant in sorted({(m, v) for m, v, _ in mean.index}):
        cells = [_cell(mean.loc[(metric, variant, m)]) if (metric, variant, m) in mean.index else "" for m in methods]
        paper = PAPER.get(metric, {}) if variant == "all" else {}
        out.write(f"| {metric} | {variant} | " + " | ".join(cells) + f" | {_pct(paper.get('ig'))} | {_pct(paper.get('base'))} |\n")
    per = summary[(summary["relation"] != "mean") & (summary["variant"] == "all")
                  & summary["metric"].isin(["suppress_own", "amplify_own"])]
    table = per.pivot_table(index="relation", columns=["metric", "method"], values="ratio")
    out.write("\n## Per relation (own prompts, all facts)\n\n| relation | "
              + " | ".join(f"{metric} {LABELS[m]}" for metric, m in table.columns) + " |\n")
    out.write("|---|" + "---|" * len(table.columns) + "\n")
    for relation, row in table.iterrows():
        out.write(f"| {relation} | " + " | ".join(f"{v:+.2%}" for v in row.to_numpy()) + " |\n")
    return out.getvalue()


def _cell(row: pd.Series) -> str:
    return f"{row.ratio:+.2%} [{row.ci_low:+.2%}, {row.ci_high:+.2%}]"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.2%}"


def main(args: StageArgs) -> None:
    cfg = args.cfg
    results = read_tables(args, "results", ["relation", "fact_id", "target", "method", "n_neurons", "p0", "p_suppress",
                                            "p_amplify"])
    dose = read_tables(args, "dose", ["relation", "fact_id", "method", "k", "n_neurons", "p0", "p_suppress"])
    summary = summarize(results, int(cfg.evaluate.bootstrap), int(cfg.seed))
    curve = summarize_dose(dose, int(cfg.evaluate.bootstrap), int(cfg.seed))
    record = provenance(cfg, "evaluate_summary", relations=sorted(results["relation"].unique()))
    headline = summary[summary["relation"] == "mean"]
    headline_records = headline.astype(object).where(headline.notna(), None).to_dict(orient="records")  # NaN -> null
    write_json(args.output("json"), {"mean_over_relations": headline_records, "paper": PAPER,
                                     "provenance": record})
    write_text(args.output("csv"), summary.to_csv(index=False))
    write_text(args.output("markdown"), headline_markdown(summary))
    write_text(args.output("dose_csv"), curve.to_csv(index=False))
    per_relation = summary[(summary["relation"] != "mean") & (summary["variant"] == "all")]
    for op in ("suppress", "amplify"):
        fig = relation_bars_figure(per_relation[per_relation["metric"] == f"{op}_own"])
        save_figure(fig, [args.output(f"{op}_png"), args.output(f"{op}_pdf")])
    save_figure(dose_response_figure(curve[curve["relation"] == "mean"]), [args.output("dose_png"), args.output("dose_pdf")])
    for row in headline[(headline["variant"] == "all") & headline["metric"].str.endswith("_own")].itertuples():
        log.info("%s %s: %+.2f%% [%+.2f%%, %+.2f%%]", row.metric, row.method, 100 * row.ratio, 100 * row.ci_low,
                 100 * row.ci_high)


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
