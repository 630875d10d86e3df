"""Stage: per-relation accuracy table from the probe files (train vs held-out templates, majority
baseline, skipped objects) plus relation use (does the model read the relation or only the subject?).

Inputs, per selected relation: ``--in probe:<rel>=...`` and ``--in data:<rel>=...``; the
trained organism as ``--in model=...``. The ParaRel resources (every relation's templates and
objects, for relation use) come from ``data.resources_dir`` (the rule declares their files).
Outputs: ``--out csv=...`` and ``--out md=...``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from kn.data.pararel import load_relations, read_query_pairs
from kn.io import provenance, write_text
from kn.models.training import read_heldout_templates
from kn.probe import accuracy_markdown, knowledge_table, overall_row
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import PROBE, RELATION_PROMPTS, concat

log = logging.getLogger("kn.probe_summary")


def main(args: StageArgs) -> None:
    cfg = args.cfg
    probe_paths, data_paths = args.keyed_inputs("probe"), args.keyed_inputs("data")
    if set(probe_paths) != set(data_paths):
        raise SystemExit(f"relations with probes {sorted(probe_paths)} differ from those with data {sorted(data_paths)}")
    probes = concat(PROBE.read(path, rel) for rel, path in probe_paths.items())
    prompts = concat(RELATION_PROMPTS.read(path, rel) for rel, path in data_paths.items())
    resources = Path(cfg.data.resources_dir)
    catalogue = load_relations(resources)
    templates = {rel: list(meta.templates) for rel, meta in catalogue.items()}
    objects = {rel: {obj for _, obj in pairs} for rel, pairs in read_query_pairs(resources / "query_pairs.json").items()}
    loaded = load_model(args)
    table = knowledge_table(loaded.model, loaded.tokenizer, probes, prompts, templates,
                            read_heldout_templates(loaded.spec), objects, int(cfg.seed), codec=loaded.codec)
    table = pd.concat([table, pd.DataFrame([{"relation": "mean", **overall_row(table)}])], ignore_index=True)
    write_text(args.output("csv"), table.to_csv(index=False, float_format="%.6g"))
    # CSV has no metadata slot: the provenance record rides in the Markdown twin, as a comment
    record = json.dumps(provenance(cfg, "probe_summary", relations=sorted(probe_paths), **loaded.record()), default=str)
    write_text(args.output("md"), accuracy_markdown(table, cfg.model.name) + f"\n<!-- provenance: {record} -->\n")
    log.info("summary of %d relations: %s", len(probe_paths), table.iloc[-1].to_dict())


if __name__ == "__main__":
    run_stage(main)
