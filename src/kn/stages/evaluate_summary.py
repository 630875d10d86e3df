"""Stage: suppression/amplification summary over relations (SPEC §5, §9) with bootstrap CIs and figures.

Inputs: per relation ``--in results:<rel>=<rel>.parquet`` and ``--in dose:<rel>=<rel>.dose.parquet``
from the evaluate stage. Outputs: summary.json (headline numbers + provenance),
summary.csv (every relation, method, metric, variant with its 95% CI), summary.md,
dose_response.csv, and the figures suppress/amplify/dose_response (PNG and PDF).
"""

from __future__ import annotations

import logging

from kn.figures import dose_response_figure, relation_bars_figure, save_figure
from kn.interventions import PAPER, effects_markdown, summarize, summarize_dose
from kn.io import provenance, write_json, write_text
from kn.stages.cli import StageArgs, run_stage
from kn.tables import DOSE, EVALUATION, concat

log = logging.getLogger("kn.evaluate_summary")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    results = concat(EVALUATION.read(path, rel) for rel, path in args.keyed_inputs("results").items())
    dose = concat(DOSE.read(path, rel) for rel, path in args.keyed_inputs("dose").items())
    summary = summarize(results, int(cfg.evaluate.bootstrap), int(cfg.seed))
    curve = summarize_dose(dose, int(cfg.evaluate.bootstrap), int(cfg.seed))
    record = provenance(cfg, "evaluate_summary", relations=sorted(results["relation"].unique()))
    headline = summary[summary["relation"] == "mean"]
    headline_records = headline.astype(object).where(headline.notna(), None).to_dict(orient="records")  # NaN -> null
    write_json(args.output("json"), {"mean_over_relations": headline_records, "paper": PAPER, "provenance": record})
    write_text(args.output("csv"), summary.to_csv(index=False))
    write_text(args.output("markdown"), effects_markdown(summary))
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
    run_stage(main)
