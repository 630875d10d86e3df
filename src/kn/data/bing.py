"""BingRel web sentences for the activating-prompts study (SPEC §6).

The authors' release is one JSON list per relation, aligned with the facts of
``query_pairs.json``: item k holds ``th_bags`` (web sentences with the fact's head and
tail) and ``h_bags`` (head only). The project ships it as one long parquet table
(``resources/bing_distant/sentences.parquet``: relation, fact_id, kind, sentence_idx,
sentence) plus ``stats.json`` holding each relation's fact count, because facts with no
sentence at all have no row in the table.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from kn.data.pararel import DataError

OFFICIAL_SHA256 = "83b2d1ab0cece0b007cf5c945eddc60a4cf2f2cdf4ec5283c29a35d0a97d128b"
# Counts of the official data (SPEC §6 [DATA]); the conversion checks them on the official tarball.
OFFICIAL_COUNTS = {"facts_without_th": 1409, "facts_without_h": 260, "facts_without_either": 167, "pool": 476237}

KINDS = ("th", "h")  # th: head and tail in the sentence; h: head only
SENTENCES_FILE = "sentences.parquet"
STATS_FILE = "stats.json"
MEMBER_PATTERN = re.compile(r"(?:^|/)final_distant_allbags_(P\d+)_new\.json$")

SENTENCE_SCHEMA = pa.schema(
    [
        ("relation", pa.string()),
        ("fact_id", pa.int32()),
        ("kind", pa.string()),
        ("sentence_idx", pa.int8()),
        ("sentence", pa.string()),
    ]
)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_relation_bags(raw: Any, source: str) -> list[dict[str, list[str]]]:
    """Validate one relation's JSON list of ``{"th_bags": [...], "h_bags": [...]}`` items."""
    if not isinstance(raw, list):
        raise DataError(f"{source}: expected a JSON list of {{'th_bags': [...], 'h_bags': [...]}}, got {type(raw).__name__}")
    bags: list[dict[str, list[str]]] = []
    for k, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DataError(f"{source}: item {k}: expected an object with th_bags and h_bags, got {type(item).__name__}")
        bag: dict[str, list[str]] = {}
        for kind in KINDS:
            sentences = item.get(f"{kind}_bags")
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                raise DataError(f"{source}: item {k}: '{kind}_bags' must be a list of strings, got {sentences!r:.80}")
            if len(sentences) > 127:
                raise DataError(f"{source}: item {k}: {len(sentences)} {kind} sentences; at most 127 fit sentence_idx (int8)")
            bag[kind] = sentences
        bags.append(bag)
    return bags


def read_tarball(path: str | Path) -> dict[str, list[dict[str, list[str]]]]:
    """The per-relation bag lists of the authors' tarball, keyed by relation id (sorted as strings)."""
    out: dict[str, list[dict[str, list[str]]]] = {}
    with tarfile.open(path, "r:*") as archive:
        for member in archive.getmembers():
            match = MEMBER_PATTERN.search(member.name)
            if not member.isfile() or not match:
                continue
            handle = archive.extractfile(member)
            assert handle is not None  # regular file
            try:
                raw = json.load(io.TextIOWrapper(handle, encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{member.name}:{exc.lineno}: malformed JSON ({exc.msg})") from None
            out[match.group(1)] = parse_relation_bags(raw, f"{path}:{member.name}")
    if not out:
        raise DataError(f"{path}: no member named like final_distant_allbags_<REL>_new.json")
    return dict(sorted(out.items()))


def bags_to_table(bags: Mapping[str, list[dict[str, list[str]]]]) -> pd.DataFrame:
    """Long table, one row per sentence, in (relation, fact, th then h, sentence) order."""
    rows = [
        (relation, fact_id, kind, idx, sentence)
        for relation in sorted(bags)
        for fact_id, bag in enumerate(bags[relation])
        for kind in KINDS
        for idx, sentence in enumerate(bag[kind])
    ]
    table = pd.DataFrame(rows, columns=SENTENCE_SCHEMA.names)
    return table.astype({"relation": "string", "fact_id": "int32", "kind": "string", "sentence_idx": "int8", "sentence": "string"})


def table_to_bags(table: pd.DataFrame, n_facts: Mapping[str, int]) -> dict[str, list[dict[str, list[str]]]]:
    """Inverse of :func:`bags_to_table` (facts without any sentence come back as empty bags)."""
    out = {rel: [{kind: [] for kind in KINDS} for _ in range(n)] for rel, n in sorted(n_facts.items())}
    ordered = table.sort_values(["relation", "fact_id", "kind", "sentence_idx"], kind="stable")
    for rel, fact_id, kind, sentence in zip(ordered["relation"], ordered["fact_id"], ordered["kind"], ordered["sentence"]):
        out[rel][int(fact_id)][kind].append(sentence)
    return out


def bag_counts(bags: Mapping[str, list[dict[str, list[str]]]]) -> dict[str, int]:
    """The counts SPEC §6 quotes: facts lacking th / h / both sentences, and the th+h pool size."""
    items = [bag for rel in bags for bag in bags[rel]]
    return {
        "facts_without_th": sum(not bag["th"] for bag in items),
        "facts_without_h": sum(not bag["h"] for bag in items),
        "facts_without_either": sum(not bag["th"] and not bag["h"] for bag in items),
        "pool": sum(len(bag["th"]) + len(bag["h"]) for bag in items),
    }


def check_alignment(bags: Mapping[str, list[Any]], query_pairs: Mapping[str, list[Any]], source: str) -> None:
    """Each relation's list must have one item per fact of ``query_pairs`` (index alignment, SPEC §2)."""
    for rel, items in bags.items():
        if rel not in query_pairs:
            raise DataError(f"{source}: relation {rel} is not in query_pairs.json")
        if len(items) != len(query_pairs[rel]):
            raise DataError(
                f"{source}: relation {rel} has {len(items)} items but query_pairs.json has {len(query_pairs[rel])} facts; "
                "the lists must be aligned fact by fact"
            )


def load_sentences(table_path: str | Path, stats_path: str | Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The shipped sentence table (in th+h pool order) and the fact count per relation (from its stats file).

    Errors name the file and what was expected, so a missing or stale resource is obvious.
    """
    from kn.io import read_parquet

    table_path, stats_path = Path(table_path), Path(stats_path)
    for path in (stats_path, table_path):
        if not path.is_file():
            raise DataError(
                f"missing resource file {path}; rebuild it with "
                "`python workflow/scripts/convert_bing_distant.py TARBALL` (see resources/bing_distant/README.md)"
            )
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        n_facts = {str(rel): int(n) for rel, n in stats["facts_per_relation"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{stats_path}: expected JSON with an object 'facts_per_relation' {{relation: count}} ({exc})") from None
    table = read_parquet(table_path)
    if list(table.columns) != SENTENCE_SCHEMA.names:
        raise DataError(f"{table_path}: columns {list(table.columns)}; expected {SENTENCE_SCHEMA.names}")
    bad_kind = ~table["kind"].isin(KINDS)
    if bad_kind.any():
        raise DataError(f"{table_path}: row {int(bad_kind.idxmax())}: kind {table['kind'][bad_kind].iloc[0]!r}; expected 'th' or 'h'")
    relations = sorted(n_facts)
    relation_rank = pd.Categorical(table["relation"], categories=relations).codes.astype(np.int64)
    if (relation_rank < 0).any():
        raise DataError(f"{table_path}: relation {table['relation'][relation_rank < 0].iloc[0]!r} has no fact count in {stats_path}")
    fact_ids = table["fact_id"].to_numpy(np.int64)
    outside = (fact_ids < 0) | (fact_ids >= np.array([n_facts[r] for r in relations])[relation_rank])
    if outside.any():
        row = table[outside].iloc[0]
        raise DataError(f"{table_path}: {row['relation']} fact_id {row['fact_id']} outside [0, {n_facts[row['relation']]})")
    # Pool order = relations sorted as strings, facts in order, th then h (SPEC §11.14: sorted listing).
    # The conversion writes rows in that order; sort only a table that is not.
    kind_rank = (table["kind"] == KINDS[1]).to_numpy(dtype=np.int64)
    key = (relation_rank << 40) | (fact_ids << 10) | (kind_rank << 8) | table["sentence_idx"].to_numpy(np.int64)
    if (np.diff(key) < 0).any():
        table = table.iloc[np.argsort(key, kind="stable")].reset_index(drop=True)
    return table, n_facts
