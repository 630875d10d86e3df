"""Stage: update facts by editing their knowledge neurons' value slots (SPEC §7).

Inputs, one pair per selected relation: ``--in data:<rel>=<relation prompts parquet>``
and ``--in neurons:<rel>=<refined neurons parquet>``. Outputs: ``update`` (parquet, one
row per edit, method "kn" or "random"), ``summary_csv`` and ``summary_md``.
"""

from __future__ import annotations

import json
import logging
import random

import pandas as pd
import pyarrow as pa
from omegaconf import DictConfig
from tqdm import tqdm

from kn.config import to_container
from kn.editing import (
    SKIP_REASONS,
    Fact,
    Neuron,
    PromptScorer,
    Top1Cache,
    facts_from_table,
    kn_lists_from_table,
    run_update,
    sample_updates,
    score_facts,
    summarize_updates,
)
from kn.io import provenance, read_parquet, write_parquet, write_text
from kn.models import load_masked_lm, model_location, num_ffn_layers, object_token_id, resolve_device, value_projections
from kn.stages.cli import StageArgs, run_stage
from kn.paper_numbers import paper_values

log = logging.getLogger("kn.edit_update")

_STR, _I32, _F64, _BOOL = pa.string(), pa.int32(), pa.float64(), pa.bool_()
UPDATE_SCHEMA = pa.schema(
    [
        ("method", _STR), ("relation", _STR), ("attempt", _I32), ("fact_id", _I32), ("template_id", _I32),
        ("subject", _STR), ("object", _STR), ("new_object", _STR), ("n_neurons", _I32), ("neurons", _STR),
        ("pred_before", _STR), ("pred_after", _STR), ("change", _BOOL), ("success", _BOOL), ("success_at_k", _BOOL),
        ("new_prob_before", _F64), ("new_prob_after", _F64), ("new_rank_before", pa.int64()),
        ("new_rank_after", pa.int64()), ("paraphrases", _I32), ("para_success_before", _F64),
        ("para_success_after", _F64), ("para_gold_before", _F64), ("para_gold_after", _F64),
        ("intra_facts", _STR), ("inter_facts", _STR), ("ppl_prompts_left_out", _I32),
        ("nll_intra_before", _F64), ("nll_intra_after", _F64), ("nll_inter_before", _F64), ("nll_inter_after", _F64),
    ]
)  # fmt: skip

# The paper's numbers (SPEC §12, [2nd]) printed beside ours.
_RATES, _PPL = paper_values("update_rates"), paper_values("update_ppl")
PAPER_UPDATE = {
    "kn": {"change_rate": _RATES["change_rate"], "success_rate": _RATES["success_rate"],
           "ppl_intra_delta": _PPL["ppl_intra_delta"], "ppl_inter_delta": _PPL["ppl_inter_delta"]},
    "random": {"change_rate": _RATES["random_change_rate"], "success_rate": _RATES["random_success_rate"],
               "ppl_inter_delta": _PPL["random_ppl_inter_delta"]},
}


def load_study(args: StageArgs) -> tuple[dict[str, list[Fact]], dict[str, list[list[Neuron]]]]:
    """Studied facts and their IG knowledge-neuron lists for every selected relation."""
    data_paths = args.keyed_inputs("data")
    neuron_paths = args.keyed_inputs("neurons")
    if set(data_paths) != set(neuron_paths):
        raise SystemExit(f"relations with data {sorted(data_paths)} differ from those with neurons {sorted(neuron_paths)}")
    cap = args.cfg.study.facts_per_relation
    facts: dict[str, list[Fact]] = {}
    kn_lists: dict[str, list[list[Neuron]]] = {}
    for relation, path in data_paths.items():
        facts[relation] = facts_from_table(read_parquet(path), cap, str(path))
        if facts[relation][0].relation != relation:
            raise ValueError(f"{path}: holds relation {facts[relation][0].relation}, but was passed as data:{relation}")
        kn_lists[relation] = kn_lists_from_table(
            read_parquet(neuron_paths[relation]), relation, len(facts[relation]), str(neuron_paths[relation])
        )
    return facts, kn_lists


def load_scorer(cfg: DictConfig, facts: dict[str, list[Fact]], batch_size: int) -> PromptScorer:
    """The model (read-only: every edit is restored in memory) and the vocabulary ids of all objects."""
    device = resolve_device(cfg.ig.device)
    model, tokenizer = load_masked_lm(model_location(cfg.model, cfg.results_dir), device, cfg.model.layer_norm_eps)
    objects = sorted({fact.object for rel_facts in facts.values() for fact in rel_facts})
    return PromptScorer(model, tokenizer, {obj: object_token_id(tokenizer, obj) for obj in objects}, batch_size, device)


def main(args: StageArgs) -> None:
    cfg = args.cfg
    edit = cfg.edit
    if edit.edits_per_relation < 1 or edit.max_attempts < 1 or edit.ppl_facts < 0:
        raise ValueError(
            f"config edit.edits_per_relation={edit.edits_per_relation}, edit.max_attempts={edit.max_attempts}, "
            f"edit.ppl_facts={edit.ppl_facts}: expected >= 1, >= 1, >= 0"
        )
    facts, kn_lists = load_study(args)
    scorer = load_scorer(cfg, facts, edit.batch_size)
    top1_is_gold = Top1Cache(scorer)
    unedited, left_out = score_facts(scorer, facts)  # the "before" side of every PPL and paraphrase measure
    if left_out:
        log.warning("%d prompts left out of PPL sets: their object is not one token of this tokenizer", left_out)
    shape = (num_ffn_layers(scorer.model), value_projections(scorer.model)[0].weight.shape[1])
    methods = ["kn"] + (["random"] if edit.random_baseline else [])

    rows: list[dict[str, object]] = []
    attempts: list[dict[str, object]] = []
    for method in methods:
        rng = random.Random(cfg.seed)  # each method is a fresh run seeded like the authors' script
        plans, report = sample_updates(
            rng,
            facts,
            kn_lists,
            top1_is_gold,
            edits_per_relation=edit.edits_per_relation,
            max_attempts=edit.max_attempts,
            share=cfg.refine.relation_share,
            rule=edit.kn_filter,
            ppl_facts=edit.ppl_facts,
            random_shape=shape if method == "random" else None,
            new_object_ok=lambda obj: scorer.object_ids[obj] is not None,
        )
        for status in report:
            attempts.append(
                {
                    "method": method,
                    "relation": status.relation,
                    "attempts": status.attempts,
                    "edits": status.edits,
                    "single_object": status.single_object,
                    **{f"skipped_{reason}": status.skipped[reason] for reason in SKIP_REASONS},
                }
            )
            log.info("%s %s: %d edits in %d attempts, skipped %s%s", method, status.relation, status.edits,
                     status.attempts, dict(status.skipped), " (all facts share one object)" if status.single_object else "")
        for plan in tqdm(plans, desc=f"edit ({method})", unit="edit"):
            row = run_update(scorer, facts, plan, unedited, lambda1=edit.lambda1, lambda2=edit.lambda2, success_k=edit.success_k)
            rows.append({"method": method, **row})

    table = pd.DataFrame.from_records(rows, columns=UPDATE_SCHEMA.names)
    attempts_table = pd.DataFrame.from_records(attempts)
    summary = summarize_updates(table, attempts_table, edit.success_k)
    meta = provenance(cfg, "edit_update", relations=list(facts))
    write_parquet(args.output("update"), table, meta, schema=UPDATE_SCHEMA)
    write_text(args.output("summary_csv"), summary.to_csv(index=False))
    write_text(args.output("summary_md"), summary_markdown(summary, cfg, facts, meta))
    overall = summary[summary["scope"] == "all"]
    for record in overall.to_dict("records"):
        log.info("%s: %d edits, change %.3f, success %.3f", record["method"], record["edits"], record["change_rate"], record["success_rate"])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return str(value)


def summary_markdown(summary: pd.DataFrame, cfg: DictConfig, facts: dict[str, list[Fact]], meta: dict) -> str:
    """The overall table beside the paper's numbers, skip reasons per relation, and provenance."""
    k = cfg.edit.success_k
    overall = summary[summary["scope"] == "all"]
    lines = [
        "# Updating facts (SPEC §7)",
        "",
        f"Model `{cfg.model.name}`; {len(facts)} relations; studied facts per relation: "
        f"{min(len(v) for v in facts.values())}-{max(len(v) for v in facts.values())}; "
        f"up to {cfg.edit.edits_per_relation} edits per relation in at most {cfg.edit.max_attempts} attempts; "
        f"lambda1 = {cfg.edit.lambda1}, lambda2 = {cfg.edit.lambda2}; common-KN filter rule `{cfg.edit.kn_filter}` "
        f"(share {cfg.refine.relation_share}); seed {cfg.seed}.",
        "",
        f"| method | edits | change | success | success@{k} | paraphrase success | MRR before -> after "
        "| PPL intra before -> after (delta) | PPL inter before -> after (delta) | paper change / success / dPPL intra / dPPL inter |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in overall.to_dict("records"):
        paper = PAPER_UPDATE.get(str(rec["method"]), {})
        paper_text = " / ".join(_fmt(paper.get(key, "n/a")) for key in ("change_rate", "success_rate", "ppl_intra_delta", "ppl_inter_delta"))
        lines.append(
            f"| {rec['method']} | {rec['edits']} | {_fmt(rec['change_rate'])} | {_fmt(rec['success_rate'])} "
            f"| {_fmt(rec[f'success_at_{k}'])} | {_fmt(rec['para_success_after'])} "
            f"| {_fmt(rec['mrr_before'])} -> {_fmt(rec['mrr_after'])} "
            f"| {_fmt(rec['ppl_intra_before'])} -> {_fmt(rec['ppl_intra_after'])} ({_fmt(rec['ppl_intra_delta'])}) "
            f"| {_fmt(rec['ppl_inter_before'])} -> {_fmt(rec['ppl_inter_after'])} ({_fmt(rec['ppl_inter_delta'])}) "
            f"| {paper_text} |"
        )
    lines += [
        "",
        "Paraphrase success (beyond the paper, SPEC §11.13): share of the edited fact's other prompts whose "
        "top-1 became the new object.",
        "",
        "## Attempts skipped, by reason",
        "",
        "`no_kn`: no knowledge neuron of the fact survived the common-KN filter (or the fact has none); "
        "`incorrect_answer`: the model's top-1 on the drawn prompt is not the gold object; "
        "`new_object_not_one_token`: the new object is not one vocabulary entry; "
        "single-object relations (every fact has the same object) cannot draw a different object and are skipped.",
        "",
        "| method | relation | edits | attempts | " + " | ".join(SKIP_REASONS) + " | single object |",
        "|---|---|---|---|" + "---|" * len(SKIP_REASONS) + "---|",
    ]
    for rec in summary.to_dict("records"):
        lines.append(
            f"| {rec['method']} | {rec['scope']} | {rec['edits']} | {rec['attempts']} | "
            + " | ".join(str(rec[f"skipped_{reason}"]) for reason in SKIP_REASONS)
            + f" | {rec['single_object_relations']} |"
        )
    lines += ["", "## Provenance", "", "```json", json.dumps({k: meta[k] for k in ("stage", "seed", "versions")}, indent=2),
              "```", "", "Config of this run: `" + json.dumps(to_container(cfg.edit)) + "`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
