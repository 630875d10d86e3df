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

import pandas as pd

from kn.distant import TYPE_LABELS, TYPES, fact_means, overall_means, relation_means, usability_table, usable_sentences
from kn.figures import distant_figure, save_figure
from kn.io import atomic_path, provenance, read_parquet, write_parquet, write_text
from kn.markdown import markdown_table, provenance_footer
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.distant_summary")

SUBSETS = ("all", "usable")


def read_all(args: StageArgs, kind: str) -> pd.DataFrame:
    """Concatenate the ``--in <kind>:<relation>=path`` tables, in relation order (sorted as strings)."""
    return pd.concat([read_parquet(path) for path in args.keyed_inputs(kind).values()], ignore_index=True)


def subset_means(facts: pd.DataFrame, sentences: pd.DataFrame, activations: pd.DataFrame, max_unk_share: float) -> pd.DataFrame:
    """Per-fact means for both sentence subsets, stacked with a ``subset`` column."""
    readable = sentences[sentences["readable"].astype(bool)]
    usable = sentences[usable_sentences(sentences, facts, max_unk_share)]
    return pd.concat(
        [fact_means(activations, chosen).assign(subset=name) for name, chosen in zip(SUBSETS, (readable, usable))],
        ignore_index=True,
    )


def summary_markdown(overall: pd.DataFrame, by_relation: pd.DataFrame, usability: pd.DataFrame, cfg, max_len: int) -> str:
    """Overall and per-relation means, then how usable the sentences were for this model."""
    types = ", ".join(f"{kind} = {label}" for kind, label in TYPE_LABELS.items())
    compact = usability[["relation", "facts", "facts_no_exmp", "facts_kn_ig", "tails_single_token"]].copy()
    for kind in TYPES:
        compact[kind] = [
            f"{u} / {s - c - (nf if kind == 'T1' else 0)} / {s}"
            for u, s, c, nf in zip(
                usability[f"{kind}_usable"], usability[f"{kind}_sentences"], usability[f"{kind}_mask_cut_off"],
                usability.get(f"{kind}_tail_not_found", pd.Series(0, index=usability.index)),
            )
        ]  # fmt: skip
    compact["unk_piece_share"] = usability["unk_piece_share"]
    compact["pieces_per_word"] = usability["pieces_per_word"]
    return "\n".join(
        [
            "# Activating prompts on web sentences (SPEC §6)",
            "",
            f"Model `{cfg.model.name}`; mean activation of each fact's knowledge neurons at [MASK]; {types}. "
            "Per relation: mean over every pooled (fact, neuron) value; overall: unweighted mean over relations. "
            f"Sentences cut to {max_len} positions (distant.max_len {cfg.distant.max_len}, capped by the model). "
            "Subset `all`: every sentence whose [MASK] the model reads (the authors' procedure); `usable`: at most "
            f"{cfg.distant.max_unk_share:.0%} unknown pieces and, for T1, a tail that is one known token. "
            "Both methods read the same masked sentences (seed "
            f"{cfg.seed}, one stream per relation).",
            "",
            "## Overall",
            "",
            markdown_table(overall),
            "## Per relation",
            "",
            markdown_table(by_relation),
            "## How usable the web sentences are for this model",
            "",
            "Facts: studied; without th or h sentences (skipped, as in the paper); with IG knowledge neurons; whose tail "
            "is one known token (otherwise the T1 [MASK] stands for several pieces). Per type: usable / readable "
            "([MASK] within the kept pieces and, for T1, the tail found) / all sentences. unk_piece_share: share of "
            "all wordpieces that are unknown to the tokenizer; pieces_per_word: wordpieces per space-separated word (a "
            "vocabulary that covers the text gives about 1.3; a small one splits web words into many pieces).",
            "",
            markdown_table(compact),
        ]
    )


def main(args: StageArgs) -> None:
    cfg = args.cfg
    facts, sentences, activations = read_all(args, "facts"), read_all(args, "sentences"), read_all(args, "activations")
    per_fact = subset_means(facts, sentences, activations, cfg.distant.max_unk_share)
    by_relation = pd.concat(
        [relation_means(per_fact[per_fact["subset"] == name]).assign(subset=name) for name in SUBSETS], ignore_index=True
    )[["subset", "relation", "method", "n_facts", "n_values", *TYPES]]
    overall = pd.concat(
        [overall_means(by_relation[by_relation["subset"] == name]).assign(subset=name) for name in SUBSETS],
        ignore_index=True,
    )[["subset", "method", "n_relations", "n_facts", *TYPES]]
    usability = usability_table(facts, sentences, cfg.distant.max_unk_share)
    max_len = int(sentences["max_len"].max()) if len(sentences) else int(cfg.distant.max_len)
    for record in overall.to_dict("records"):
        log.info("%s %s: T1 %.4f, T2 %.4f, T3 %.4f over %d relations", record["subset"], record["method"],
                 record["T1"], record["T2"], record["T3"], record["n_relations"])  # fmt: skip

    record = provenance(cfg, "distant_summary", relations=sorted(facts["relation"].unique()), max_len=max_len)
    write_parquet(args.output("fact_means"), per_fact, record)
    for name, table in (("by_relation", by_relation), ("overall", overall), ("usability", usability)):
        with atomic_path(args.output(name)) as tmp:
            table.to_csv(tmp, index=False)
    write_text(args.output("markdown"), summary_markdown(overall, by_relation, usability, cfg, max_len) + provenance_footer(record))
    ig_all = by_relation[(by_relation["subset"] == "all") & (by_relation["method"] == "ig")]
    save_figure(distant_figure(ig_all), [args.output("figure_png"), args.output("figure_pdf")])


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
