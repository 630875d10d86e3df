"""Stage: update facts by editing their knowledge neurons' value slots (SPEC §7).

Inputs, one pair per selected relation: ``--in data:<rel>=<relation prompts parquet>`` and
``--in neurons:<rel>=<refined neurons parquet>``; the trained organism as ``--in model=...``.
Outputs: ``update`` (parquet, one row per edit, method "kn" or "random"), ``summary_csv``
and ``summary_md``.
"""

from __future__ import annotations

import logging

from kn.config import to_container
from kn.editing import PromptScorer, editing_study, edit_embeddings, summarize_updates, update_markdown, update_study
from kn.io import provenance, write_text
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import NEURONS, RELATION_PROMPTS, UPDATES, relation_keyed

log = logging.getLogger("kn.edit_update")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    edit = cfg.edit
    if edit.edits_per_relation < 1 or edit.max_attempts < 1 or edit.ppl_facts < 0:
        raise ValueError(
            f"config edit.edits_per_relation={edit.edits_per_relation}, edit.max_attempts={edit.max_attempts}, "
            f"edit.ppl_facts={edit.ppl_facts}: expected >= 1, >= 1, >= 0"
        )
    loaded = load_model(args)
    facts, kn_lists, object_ids = editing_study(
        relation_keyed(args.keyed_inputs("data"), RELATION_PROMPTS), relation_keyed(args.keyed_inputs("neurons"), NEURONS),
        loaded.tokenizer, cfg.study.facts_per_relation, codec=loaded.codec)
    scorer = PromptScorer(loaded.model, loaded.tokenizer, object_ids, int(edit.batch_size), codec=loaded.codec)
    rows, attempts = update_study(
        scorer, facts, kn_lists, seed=int(cfg.seed), methods=["kn"] + (["random"] if edit.random_baseline else []),
        edits_per_relation=int(edit.edits_per_relation), max_attempts=int(edit.max_attempts),
        share=float(cfg.refine.relation_share), rule=str(edit.kn_filter), ppl_facts=int(edit.ppl_facts),
        lambda1=edit.lambda1, lambda2=edit.lambda2, success_k=int(edit.success_k),
    )
    summary = summarize_updates(rows, attempts, int(edit.success_k))
    _, vectors = edit_embeddings(loaded.model)
    meta = provenance(cfg, "edit_update", relations=list(facts), token_vectors=vectors, **loaded.record())
    UPDATES.write(args.output("update"), rows, meta)
    write_text(args.output("summary_csv"), summary.to_csv(index=False))
    write_text(args.output("summary_md"), update_markdown(summary, str(cfg.model.name), to_container(edit),
                                                          float(cfg.refine.relation_share), facts, vectors, meta))
    for record in summary[summary["scope"] == "all"].to_dict("records"):
        log.info("%s: %d edits, change %.3f, success %.3f", record["method"], record["edits"], record["change_rate"],
                 record["success_rate"])


if __name__ == "__main__":
    run_stage(main)
