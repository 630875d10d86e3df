"""Stage: erase relations by overwriting their most frequent knowledge neurons' value slots (SPEC §8).

Inputs as for ``edit_update`` (``--in data:<rel>=...`` and ``--in neurons:<rel>=...`` per
selected relation, ``--in model=...`` for the trained organism). Outputs: ``erase_csv``
(one row per erased relation) and ``erase_md``.
"""

from __future__ import annotations

import logging

from kn.config import to_container
from kn.editing import PromptScorer, editing_study, erase_markdown, erase_study
from kn.io import provenance, write_text
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import NEURONS, RELATION_PROMPTS, relation_keyed

log = logging.getLogger("kn.edit_erase")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    loaded = load_model(args)
    facts, kn_lists, object_ids = editing_study(
        relation_keyed(args.keyed_inputs("data"), RELATION_PROMPTS), relation_keyed(args.keyed_inputs("neurons"), NEURONS),
        loaded.tokenizer, cfg.study.facts_per_relation, codec=loaded.codec)
    erased = [rel for rel in cfg.erase.relations if rel in facts]
    not_selected = [rel for rel in cfg.erase.relations if rel not in facts]
    if not_selected:
        log.info("erase.relations %s are not among the selected relations; not erased", not_selected)
    scorer = PromptScorer(loaded.model, loaded.tokenizer, object_ids, int(cfg.erase.batch_size), codec=loaded.codec)
    table = erase_study(scorer, facts, kn_lists, erased, int(cfg.erase.top_k), str(cfg.erase.value))
    meta = provenance(cfg, "edit_erase", relations=list(facts), erased=erased, **loaded.record())
    write_text(args.output("erase_csv"), table.to_csv(index=False))
    write_text(args.output("erase_md"), erase_markdown(table, str(cfg.model.name), to_container(cfg.erase), not_selected, meta))


if __name__ == "__main__":
    run_stage(main)
