"""Stage 4 aggregation (SPEC §6, §9): KN activation on T1 / T2 / T3 per relation and overall.

Inputs, per selected relation: ``--in facts:<rel>=...``, ``--in sentences:<rel>=...``,
``--in activations:<rel>=...`` (the distant stage's outputs). Outputs: ``fact_means``
(parquet: per subset, method, fact and KN the three means; the authors'
kn_weights@distant_data), ``by_relation`` and ``overall`` (CSV), ``usability`` (CSV),
``markdown`` (all three for humans), ``figure_png`` / ``figure_pdf`` (IG, all readable
sentences: the paper's distant.pdf).

Two sentence subsets are reported. ``all``: every sentence whose [MASK] the model reads
(the authors' procedure). ``usable``: only sentences with at most distant.max_unk_share
unknown pieces and, for T1, a tail the model writes as one known piece; a fact counts only
if each type keeps a sentence. The paper comparison uses ``all``.
"""

from __future__ import annotations

import logging

from kn.distant import summarize_relations, summary_markdown
from kn.figures import distant_figure, save_figure
from kn.io import provenance, write_parquet, write_text
from kn.markdown import provenance_footer
from kn.stages.cli import StageArgs, run_stage
from kn.tables import DISTANT_ACTIVATIONS, DISTANT_FACTS, DISTANT_SENTENCES, concat

log = logging.getLogger("kn.distant_summary")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    facts = concat(DISTANT_FACTS.read(p, rel) for rel, p in args.keyed_inputs("facts").items())
    sentences = concat(DISTANT_SENTENCES.read(p, rel) for rel, p in args.keyed_inputs("sentences").items())
    activations = concat(DISTANT_ACTIVATIONS.read(p, rel) for rel, p in args.keyed_inputs("activations").items())
    per_fact, by_relation, overall, usability = summarize_relations(facts, sentences, activations,
                                                                    float(cfg.distant.max_unk_share),
                                                                    int(cfg.distant.bootstrap), int(cfg.seed))
    max_len = int(sentences["max_len"].max()) if len(sentences) else int(cfg.distant.max_len)
    for record in overall.to_dict("records"):
        log.info("%s %s: T1 %.4f, T2 %.4f, T3 %.4f over %d relations", record["subset"], record["method"],
                 record["T1"], record["T2"], record["T3"], record["n_relations"])  # fmt: skip
    record = provenance(cfg, "distant_summary", relations=sorted(facts["relation"].unique()), max_len=max_len)
    write_parquet(args.output("fact_means"), per_fact, record)
    for name, table in (("by_relation", by_relation), ("overall", overall), ("usability", usability)):
        write_text(args.output(name), table.to_csv(index=False))
    markdown = summary_markdown(overall, by_relation, usability, str(cfg.model.name), max_len, int(cfg.distant.max_len),
                                float(cfg.distant.max_unk_share), int(cfg.seed))
    write_text(args.output("markdown"), markdown + provenance_footer(record))
    ig_all = by_relation[(by_relation["subset"] == "all") & (by_relation["method"] == "ig")]
    save_figure(distant_figure(ig_all), [args.output("figure_png"), args.output("figure_pdf")])


if __name__ == "__main__":
    run_stage(main)
