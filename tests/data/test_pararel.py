"""ParaRel ingestion reproduces the official bags exactly and rejects bad input clearly."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kn.data.pararel import DataError, build_bags, official_layout, read_patterns, select_relations, stats

from ..conftest import RESOURCES

OFFICIAL_SHA256 = "9daf106796fbc37456cf4a13762e82791deaca00f3502691f80b3e42804eca4d"


@pytest.fixture(scope="module")
def full_bags():
    return build_bags(RESOURCES)


def test_full_ingestion_is_byte_identical_to_official_json(full_bags):
    prompts, _ = full_bags
    text = official_layout(prompts).encode()
    assert hashlib.sha256(text).hexdigest() == OFFICIAL_SHA256
    with gzip.open(RESOURCES / "data_all_allbags.json.gz") as handle:
        assert text == handle.read()


def test_full_counts_match_the_paper(full_bags):
    prompts, facts = full_bags
    totals = stats(prompts, facts)["totals"]
    assert (totals["relations"], totals["facts"], totals["prompts"]) == (34, 27738, 253448)
    assert totals["distinct_objects"] == 1729
    shipped = json.loads((RESOURCES / "stats.json").read_text())
    assert stats(prompts, facts)["per_relation"] == shipped["per_relation"]


def test_relation_order_and_drop_rule(full_bags):
    _, facts = full_bags
    order = list(dict.fromkeys(facts["relation"]))
    assert order == sorted(order) and order[:4] == ["P101", "P103", "P106", "P108"]
    assert not {"P1001", "P131", "P17", "P276", "P361"} & set(order)


def test_cap_and_subset_keep_lama_order():
    prompts, facts = build_bags(RESOURCES, ["P19", "P101"], max_facts_per_relation=3)
    assert list(facts["relation"]) == ["P101"] * 3 + ["P19"] * 3
    assert facts.iloc[0]["subject"] == "Alan Turing" and facts.iloc[0]["object"] == "logic"
    first = prompts[(prompts.relation == "P101") & (prompts.fact_id == 0)]
    assert first["prompt"].iloc[0] == "Alan Turing works in the field of [MASK]."
    assert list(first["template_id"]) == list(range(len(first)))


def _copy_resources(tmp_path: Path) -> Path:
    root = tmp_path / "pararel"
    shutil.copytree(RESOURCES, root, ignore=shutil.ignore_patterns("*.gz"))
    return root


def test_malformed_pattern_line_names_file_and_line(tmp_path):
    root = _copy_resources(tmp_path)
    path = root / "patterns" / "P101.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"pattern": "[X] works in [Y]."'  # broken JSON on line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"P101\.jsonl:3: malformed JSON"):
        build_bags(root, ["P101"])


def test_template_without_slot_is_rejected(tmp_path):
    root = _copy_resources(tmp_path)
    path = root / "patterns" / "P19.jsonl"
    path.write_text(path.read_text().replace("[Y]", "somewhere", 1))
    with pytest.raises(DataError, match=r"P19\.jsonl:1: template .* has no \[Y\]"):
        read_patterns(path)


def test_fact_with_missing_field_is_rejected(tmp_path):
    root = _copy_resources(tmp_path)
    data = json.loads((root / "query_pairs.json").read_text())
    data["P19"][5] = ["Someone"]
    (root / "query_pairs.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"relation P19, fact 5: expected \[subject, object\]"):
        build_bags(root, ["P19"])


def test_unknown_relation_lists_valid_ids():
    with pytest.raises(DataError, match=r"unknown relation\(s\) \['P999'\].*valid ids: P101 P103"):
        select_relations(["P101", "P103"], ["P999"])


def test_missing_resource_file_is_named(tmp_path):
    root = _copy_resources(tmp_path)
    (root / "lama_relations.jsonl").unlink()
    with pytest.raises(DataError, match=r"missing resource file .*lama_relations\.jsonl"):
        build_bags(root)
