"""Stage 5 (SPEC §6): the T1 sentences that most and least activate a fact's IG knowledge neurons.

One relation of distant.trigger_relations. Inputs: ``data`` (the relation's prompts, for
its label), and the distant stage's ``facts``, ``sentences`` and ``activations``. Output:
``markdown``: per fact with IG KNs and readable T1 sentences, the triplet, the KN list and
the sentences ranked by the sum of the KN activations at [MASK] (kn.distant.triggers_markdown).
"""

from __future__ import annotations

from kn.distant import triggers_markdown
from kn.io import provenance, write_text
from kn.markdown import provenance_footer
from kn.stages.cli import StageArgs, run_stage
from kn.tables import DISTANT_ACTIVATIONS, DISTANT_FACTS, DISTANT_SENTENCES, RELATION_PROMPTS


def main(args: StageArgs) -> None:
    relation = args.require_relation()
    data = RELATION_PROMPTS.read(args.input("data"), relation)
    label = str(data["relation_label"].iloc[0]) if len(data) else relation
    markdown = triggers_markdown(
        relation, label, DISTANT_FACTS.read(args.input("facts"), relation),
        DISTANT_SENTENCES.read(args.input("sentences"), relation),
        DISTANT_ACTIVATIONS.read(args.input("activations"), relation), int(args.cfg.distant.trigger_lines),
    )  # fmt: skip
    write_text(args.output("markdown"), markdown + provenance_footer(provenance(args.cfg, "distant_triggers", relation=relation)))


if __name__ == "__main__":
    run_stage(main)
