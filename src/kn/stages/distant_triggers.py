"""Stage 5 (SPEC §6): the T1 sentences that most and least activate a fact's IG knowledge neurons.

One relation of distant.trigger_relations. Inputs: ``data`` (the relation's prompts, for
its label), and the distant stage's ``facts``, ``sentences`` and ``activations``. Output:
``markdown``: per fact with IG KNs and readable T1 sentences, the triplet, the KN list and
the sentences ranked by the sum of the KN activations at [MASK]. The authors write the
top 20 (all of a fact's <= 10 sentences); with more than distant.trigger_lines sentences
the top and bottom halves of that many lines are shown. The authors print space-joined
wordpieces; this prints the masked sentence as text with its share of unknown pieces and
whether it was cut, which says the same for a reader. Deterministic: no draws.
"""

from __future__ import annotations

import logging

import pandas as pd

from kn.distant import trigger_ranking
from kn.io import provenance, read_parquet, write_text
from kn.markdown import format_cell, provenance_footer
from kn.stages.cli import StageArgs, run_stage

log = logging.getLogger("kn.distant_triggers")


def shown_ranks(n: int, lines: int) -> list[int]:
    """Ranks (0-based) to print: all when n <= lines, else the top and bottom halves."""
    if n <= lines:
        return list(range(n))
    top = (lines + 1) // 2
    return list(range(top)) + list(range(n - (lines - top), n))


def triggers_markdown(
    relation: str, label: str, facts: pd.DataFrame, sentences: pd.DataFrame, activations: pd.DataFrame, lines: int
) -> str:
    """The readable report of one relation (see the module docstring)."""
    ranking = trigger_ranking(activations, "ig")
    kn_rows = activations[(activations["method"] == "ig")].drop_duplicates(["fact_id", "order"]).sort_values(["fact_id", "order"])
    by_key = sentences[sentences["type"] == "T1"].set_index(["fact_id", "sentence_idx"])
    out = [
        f"# Activating sentences: {relation} ({label}), IG knowledge neurons",
        "",
        "SPEC §6, stage 5. Each of the fact's head+tail web sentences has its tail masked (T1); its score is the "
        "sum of the fact's knowledge-neuron activations at [MASK]. Sentences are ranked highest first; "
        f"with more than {lines} sentences the top and bottom {lines // 2} are shown. Neurons are `layer:neuron`, "
        "layers counted from 0. `unk` is the share of the sentence's wordpieces unknown to the model's tokenizer; "
        "`cut` marks a sentence cut to the model's window (only its kept pieces were read).",
        "",
    ]
    shown = 0
    for fact in facts.sort_values("fact_id").itertuples(index=False):
        ranked = ranking[ranking["fact_id"] == fact.fact_id]
        if fact.status_ig != "ok" or ranked.empty:
            continue
        shown += 1
        neurons = kn_rows[kn_rows["fact_id"] == fact.fact_id]
        out += [
            f"## Fact {fact.fact_id}: ⟨{fact.subject}, {label}, {fact.object}⟩",
            "",
            "Knowledge neurons: " + ", ".join(f"`{layer}:{unit}`" for layer, unit in zip(neurons["layer"], neurons["neuron"])),
            "",
            "| rank | score | sentence | unk | cut |",
            "|---|---|---|---|---|",
        ]
        for rank in shown_ranks(len(ranked), lines):
            row = ranked.iloc[rank]
            sentence = by_key.loc[(row["fact_id"], row["sentence_idx"])]
            unk = sentence["n_unk"] / max(1, sentence["n_pieces"])
            out.append(
                f"| {rank + 1} | {row['score']:.4f} | {format_cell(sentence['text'])} | {unk:.0%} "
                f"| {'yes' if sentence['truncated'] else ''} |"
            )
        out.append("")
    if not shown:
        out.append("No fact of this relation has both IG knowledge neurons and a readable head+tail sentence.\n")
    log.info("%s: %d facts written", relation, shown)
    return "\n".join(out)


def main(args: StageArgs) -> None:
    relation = args.relation
    if relation is None:
        raise SystemExit("distant_triggers needs --relation")
    data = read_parquet(args.input("data"))
    label = str(data["relation_label"].iloc[0]) if "relation_label" in data.columns and len(data) else relation
    markdown = triggers_markdown(
        relation, label, read_parquet(args.input("facts")), read_parquet(args.input("sentences")),
        read_parquet(args.input("activations")), int(args.cfg.distant.trigger_lines),
    )  # fmt: skip
    write_text(args.output("markdown"), markdown + provenance_footer(provenance(args.cfg, "distant_triggers", relation=relation)))


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
