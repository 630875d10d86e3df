"""Build ParaRel bags from templates and LAMA T-REx facts (SPEC §2).

A fact's bag holds one prompt per template of its relation, in template-file order; a
prompt is the template with [X] -> subject, then [Y] -> [MASK]. Relations with <= 3
templates are dropped; relations are sorted as strings; facts keep LAMA order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from kn.tables import FACTS, RELATION_PROMPTS

MIN_TEMPLATES = 4  # relations with <= 3 templates are left out (SPEC §2)


class DataError(ValueError):
    """Malformed or missing input data; the message names the file, line or key."""


@dataclass(frozen=True)
class Relation:
    relation: str
    label: str
    lama_type: str
    templates: tuple[str, ...]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"missing resource file {path}; the project ships it under resources/ (see its README)")
    return path


def read_patterns(path: Path) -> list[str]:
    """Templates of one relation, in file order; each must contain [X] and [Y]."""
    templates: list[str] = []
    with open(_require(path), encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg}); expected {{\"pattern\": ...}}") from None
            pattern = record.get("pattern") if isinstance(record, dict) else None
            if not isinstance(pattern, str):
                raise DataError(f"{path}:{lineno}: no string field 'pattern' in {line.strip()[:80]!r}")
            for slot in ("[X]", "[Y]"):
                if slot not in pattern:
                    raise DataError(f"{path}:{lineno}: template {pattern!r} has no {slot}")
            templates.append(pattern)
    return templates


def read_lama_relations(path: Path) -> dict[str, dict[str, str]]:
    """LAMA relation metadata (label, type) keyed by relation id."""
    out: dict[str, dict[str, str]] = {}
    with open(_require(path), encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from None
            for key in ("relation", "label", "type"):
                if not isinstance(record.get(key), str):
                    raise DataError(f"{path}:{lineno}: missing string field {key!r}")
            out[record["relation"]] = {"label": record["label"], "type": record["type"]}
    return out


def read_query_pairs(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Facts per relation as (subject, object), in LAMA file order."""
    try:
        raw = json.loads(_require(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{relation: [[subject, object], ...]}}")
    facts: dict[str, list[tuple[str, str]]] = {}
    for relation, pairs in raw.items():
        if not isinstance(pairs, list):
            raise DataError(f"{path}: relation {relation}: expected a list of [subject, object] pairs")
        rows = []
        for k, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)):
                raise DataError(
                    f"{path}: relation {relation}, fact {k}: expected [subject, object] (two non-empty strings), got {pair!r}"
                )
            rows.append((pair[0], pair[1]))
        facts[relation] = rows
    return facts


def load_relations(resources: Path) -> dict[str, Relation]:
    """Every usable relation (>= 4 templates, with facts and LAMA metadata), sorted by id as strings."""
    resources = Path(resources)
    lama = read_lama_relations(resources / "lama_relations.jsonl")
    facts = read_query_pairs(resources / "query_pairs.json")
    relations: dict[str, Relation] = {}
    for rel in sorted(facts):
        templates = read_patterns(resources / "patterns" / f"{rel}.jsonl")
        if len(templates) < MIN_TEMPLATES:
            continue
        if rel not in lama:
            raise DataError(f"{resources / 'lama_relations.jsonl'}: no entry for relation {rel}")
        relations[rel] = Relation(rel, lama[rel]["label"], lama[rel]["type"], tuple(templates))
    return relations


def select_relations(available: Sequence[str], wanted: str | Iterable[str]) -> list[str]:
    """Resolve ``data.relations`` ("all" or ids) against the available ids, in sorted order."""
    if isinstance(wanted, str):
        if wanted != "all":
            wanted = [wanted]
        else:
            return sorted(available)
    wanted = list(wanted)
    unknown = [r for r in wanted if r not in available]
    if unknown:
        raise DataError(f"unknown relation(s) {unknown} in data.relations; valid ids: {' '.join(sorted(available))}")
    if not wanted:
        raise DataError("data.relations is empty; name at least one relation or use 'all'")
    return sorted(set(wanted))


def build_bags(
    resources: Path, relations: str | Iterable[str] = "all", max_facts_per_relation: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(prompts, facts) tables for the selected relations; fact_id = index within the relation."""
    resources = Path(resources)
    catalogue = load_relations(resources)
    facts_by_rel = read_query_pairs(resources / "query_pairs.json")
    chosen = select_relations(list(catalogue), relations)
    prompt_rows: list[tuple] = []
    fact_rows: list[tuple] = []
    for rel in chosen:
        meta = catalogue[rel]
        pairs = facts_by_rel[rel]
        if max_facts_per_relation is not None:
            pairs = pairs[:max_facts_per_relation]
        for fact_id, (subject, obj) in enumerate(pairs):
            fact_rows.append((rel, meta.label, meta.lama_type, fact_id, subject, obj, len(meta.templates)))
            for template_id, template in enumerate(meta.templates):
                prompt = template.replace("[X]", subject).replace("[Y]", "[MASK]")
                prompt_rows.append((rel, meta.label, meta.lama_type, fact_id, subject, obj, template_id, template, prompt))
    prompts = pd.DataFrame(prompt_rows, columns=RELATION_PROMPTS.columns)
    facts = pd.DataFrame(fact_rows, columns=FACTS.columns)
    if facts.empty:
        raise DataError(f"empty selection: no facts for relations {chosen} with max_facts_per_relation={max_facts_per_relation}")
    for frame in (prompts, facts):
        for col in frame.columns:
            if col not in ("fact_id", "template_id", "n_templates"):
                frame[col] = frame[col].astype("string")
        for col in ("fact_id", "template_id", "n_templates"):
            if col in frame:
                frame[col] = frame[col].astype("int32")
    return prompts, facts


def facts_from_prompts(prompts: pd.DataFrame) -> pd.DataFrame:
    """One row per fact (in prompt order) with its number of templates."""
    keys = ["relation", "relation_label", "lama_type", "fact_id", "subject", "object"]
    facts = prompts.groupby(keys, sort=False).size().rename("n_templates").reset_index()
    facts["n_templates"] = facts["n_templates"].astype("int32")
    return facts[FACTS.columns]


def official_layout(prompts: pd.DataFrame) -> str:
    """Rebuild the official ``data_all_allbags.json`` text from our prompts table.

    ``{rel: [[[prompt, object, "Pxx(label)"], ...] per fact]}``, json.dump indent=2, ASCII
    escapes (ensure_ascii default), keys in relation order. Used to prove ingestion exact.
    """
    out: dict[str, list[list[list[str]]]] = {}
    for (rel, _fact), group in prompts.groupby(["relation", "fact_id"], sort=False):
        tag = f"{rel}({group['relation_label'].iloc[0]})"
        bag = [[p, o, tag] for p, o in zip(group["prompt"].tolist(), group["object"].tolist())]
        out.setdefault(str(rel), []).append(bag)
    return json.dumps(out, indent=2)


def stats(prompts: pd.DataFrame, facts: pd.DataFrame) -> dict:
    per_relation = []
    for rel, group in facts.groupby("relation", sort=True):
        per_relation.append(
            {
                "relation": rel,
                "label": group["relation_label"].iloc[0],
                "type": group["lama_type"].iloc[0],
                "templates": int(group["n_templates"].iloc[0]),
                "facts": int(len(group)),
                "prompts": int((prompts["relation"] == rel).sum()),
                "distinct_objects": int(group["object"].nunique()),
            }
        )
    return {
        "totals": {
            "relations": int(facts["relation"].nunique()),
            "facts": int(len(facts)),
            "prompts": int(len(prompts)),
            "templates_total": int(sum(r["templates"] for r in per_relation)),
            "distinct_objects": int(facts["object"].nunique()),
        },
        "per_relation": per_relation,
    }


def fact_counts(resources: Path, max_facts_per_relation: int | None = None) -> dict[str, int]:
    """Facts per usable relation after the cap; cheap enough for the Snakefile to call."""
    catalogue = load_relations(Path(resources))
    facts = read_query_pairs(Path(resources) / "query_pairs.json")
    cap = max_facts_per_relation
    return {rel: len(facts[rel]) if cap is None else min(cap, len(facts[rel])) for rel in catalogue}
