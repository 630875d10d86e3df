"""Stage: erase relations by overwriting their most frequent knowledge neurons' value slots (SPEC §8).

Inputs as for ``edit_update`` (``--in data:<rel>=...`` and ``--in neurons:<rel>=...`` per
selected relation). Outputs: ``erase_csv`` (one row per erased relation) and ``erase_md``.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from kn.config import to_container
from kn.editing import erase_relation, score_facts, top_frequent_neurons
from kn.io import provenance, write_text
from kn.stages.cli import StageArgs, run_stage
from kn.stages.edit_update import load_scorer, load_study
from kn.paper_numbers import paper_values

log = logging.getLogger("kn.edit_erase")

# SPEC §12: PPL before -> after on the erased relation ([2nd] / [mem]).
PAPER_ERASE_PPL = {
    rel: (paper_values(f"erase:{rel}")["before"], paper_values(f"erase:{rel}")["after"]) for rel in ("P19", "P106", "P27", "P937")
}

ERASE_COLUMNS = [
    "relation", "value", "n_neurons", "neurons", "prompts", "other_prompts",
    "acc_before", "acc_after", "acc_change", "ppl_before", "ppl_after", "ppl_change",
    "other_acc_before", "other_acc_after", "other_acc_change", "other_ppl_before", "other_ppl_after", "other_ppl_change",
]  # fmt: skip


def main(args: StageArgs) -> None:
    cfg = args.cfg
    facts, kn_lists = load_study(args)
    erased = [rel for rel in cfg.erase.relations if rel in facts]
    not_selected = [rel for rel in cfg.erase.relations if rel not in facts]
    if not_selected:
        log.info("erase.relations %s are not among the selected relations; not erased", not_selected)
    rows: list[dict[str, object]] = []
    left_out = 0
    if erased:
        scorer = load_scorer(cfg, facts, cfg.erase.batch_size)
        before, left_out = score_facts(scorer, facts)
        if left_out:
            log.warning("%d prompts left out: their object is not one token of this tokenizer", left_out)
        for relation in tqdm(erased, desc="erase", unit="relation"):
            neurons = top_frequent_neurons(kn_lists[relation], cfg.erase.top_k)
            if len(neurons) < cfg.erase.top_k:
                log.warning("%s: only %d distinct knowledge neurons (erase.top_k = %d)", relation, len(neurons), cfg.erase.top_k)
            row = erase_relation(scorer, facts, relation, neurons, cfg.erase.value, before)
            log.info("%s: accuracy %.3f -> %.3f, PPL %.4g -> %.4g; others: accuracy %.3f -> %.3f, PPL %.4g -> %.4g",
                     relation, row["acc_before"], row["acc_after"], row["ppl_before"], row["ppl_after"],
                     row["other_acc_before"], row["other_acc_after"], row["other_ppl_before"], row["other_ppl_after"])
            rows.append(row)
    table = pd.DataFrame.from_records(rows, columns=ERASE_COLUMNS)
    meta = provenance(cfg, "edit_erase", relations=list(facts), erased=erased, prompts_left_out=left_out)
    write_text(args.output("erase_csv"), table.to_csv(index=False))
    write_text(args.output("erase_md"), erase_markdown(table, cfg, not_selected, meta))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return str(value)


def _pct(value: float) -> str:
    return "nan" if value != value else f"{100 * value:+.1f}%"


def erase_markdown(table: pd.DataFrame, cfg: DictConfig, not_selected: list[str], meta: dict) -> str:
    """Per erased relation: accuracy and PPL before -> after on it and on the others, beside the paper."""
    lines = [
        "# Erasing relations (SPEC §8)",
        "",
        f"Model `{cfg.model.name}`; per relation the {cfg.erase.top_k} knowledge neurons in the most facts' IG lists "
        f"(ties by first appearance) get value slots = `{cfg.erase.value}`. Changes are (new - old) / old "
        "(SPEC §11.9: the authors print the PPL change with the opposite sign).",
        "",
        "| relation | neurons | accuracy before -> after (change) | PPL before -> after (change) | others: accuracy "
        "| others: PPL | paper PPL |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in table.to_dict("records"):
        paper = PAPER_ERASE_PPL.get(str(rec["relation"]))
        paper_text = f"{paper[0]:g} -> {paper[1]:g} ({_pct((paper[1] - paper[0]) / paper[0])})" if paper else "n/a"
        lines.append(
            f"| {rec['relation']} | {rec['n_neurons']} "
            f"| {_fmt(rec['acc_before'])} -> {_fmt(rec['acc_after'])} ({_pct(rec['acc_change'])}) "
            f"| {_fmt(rec['ppl_before'])} -> {_fmt(rec['ppl_after'])} ({_pct(rec['ppl_change'])}) "
            f"| {_fmt(rec['other_acc_before'])} -> {_fmt(rec['other_acc_after'])} ({_pct(rec['other_acc_change'])}) "
            f"| {_fmt(rec['other_ppl_before'])} -> {_fmt(rec['other_ppl_after'])} ({_pct(rec['other_ppl_change'])}) "
            f"| {paper_text} |"
        )
    if table.empty:
        lines.append("| (no relation of erase.relations is selected) | | | | | | |")
    lines += ["", "Paper, other relations' PPL: +1.1% to +10.1% (SPEC §12, ranges only)."]
    if not_selected:
        lines += ["", f"Not erased (not among the selected relations): {', '.join(not_selected)}."]
    lines += ["", "## Provenance", "", "```json", json.dumps({k: meta[k] for k in ("stage", "seed", "versions")}, indent=2),
              "```", "", "Config of this run: `" + json.dumps(to_container(cfg.erase)) + "`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_stage(main, __doc__ or "")
