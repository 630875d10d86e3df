"""kn.data.bing and workflow/scripts/convert_bing_distant.py on a tiny synthetic tarball."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kn.data.bing import KINDS, load_sentences, table_to_bags
from kn.data.pararel import DataError

REPO = Path(__file__).resolve().parents[2]

BAGS = {
    "P2": [
        {"th_bags": ["Ada lived in London.", "London, said Ada."], "h_bags": ["Ada wrote."]},
        {"th_bags": [], "h_bags": []},  # neither
        {"th_bags": ["Bob in Rome."], "h_bags": []},  # no h
    ],
    "P10": [
        {"th_bags": [], "h_bags": ["Cy \u2013 a dash, é and 中文"]},  # no th; non-ASCII survives
    ],
}
QUERY_PAIRS = {"P2": [["Ada", "London"], ["Eve", "Paris"], ["Bob", "Rome"]], "P10": [["Cy", "Oslo"]]}


def _convert_module():
    spec = importlib.util.spec_from_file_location("convert_bing_distant", REPO / "workflow/scripts/convert_bing_distant.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _tarball(path: Path, bags: dict, extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:xz") as archive:
        members = {f"BingDistantTREx/final/final_distant_allbags_{rel}_new.json": json.dumps(items).encode() for rel, items in bags.items()}
        members.update(extra or {})
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def query_pairs(tmp_path: Path) -> Path:
    path = tmp_path / "query_pairs.json"
    path.write_text(json.dumps(QUERY_PAIRS))
    return path


def test_conversion_round_trip_and_counts(tmp_path: Path, query_pairs: Path) -> None:
    tarball = _tarball(tmp_path / "bags.tar.xz", BAGS, {"BingDistantTREx/README": b"not a relation file"})
    out = tmp_path / "resources"
    stats = _convert_module().convert(tarball, out, query_pairs, level=3)

    items = [bag for rel in BAGS for bag in BAGS[rel]]
    assert stats["counts"] == {
        "facts_without_th": sum(1 for b in items if not b["th_bags"]),
        "facts_without_h": sum(1 for b in items if not b["h_bags"]),
        "facts_without_either": sum(1 for b in items if not b["th_bags"] and not b["h_bags"]),
        "pool": sum(len(b["th_bags"]) + len(b["h_bags"]) for b in items),
    }
    assert stats["facts_per_relation"] == {"P10": 1, "P2": 3}

    table, n_facts = load_sentences(out / "sentences.parquet", out / "stats.json")
    rebuilt = table_to_bags(table, n_facts)
    assert rebuilt == {rel: [{kind: bag[f"{kind}_bags"] for kind in KINDS} for bag in items] for rel, items in BAGS.items()}
    # pool order: relations sorted as strings (P10 < P2), facts in order, th then h
    expected_pool = [s for rel in sorted(BAGS) for bag in BAGS[rel] for s in bag["th_bags"] + bag["h_bags"]]
    assert table["sentence"].tolist() == expected_pool
    assert json.loads((out / "stats.json").read_text())["counts"] == stats["counts"]
    assert pq.read_metadata(out / "sentences.parquet").row_group(0).column(4).compression == "ZSTD"
    shuffled = pq.read_table(out / "sentences.parquet").to_pandas().sample(frac=1.0, random_state=0)
    pq.write_table(pa.Table.from_pandas(shuffled, preserve_index=False), out / "sentences.parquet")
    assert load_sentences(out / "sentences.parquet", out / "stats.json")[0]["sentence"].tolist() == expected_pool  # any row order reads back in pool order


def test_conversion_rejects_lists_not_aligned_with_the_facts(tmp_path: Path, query_pairs: Path) -> None:
    bad = {"P2": BAGS["P2"][:2], "P10": BAGS["P10"]}
    with pytest.raises(DataError, match=r"relation P2 has 2 items but query_pairs.json has 3 facts"):
        _convert_module().convert(_tarball(tmp_path / "bad.tar.xz", bad), tmp_path / "out", query_pairs, level=3)


def test_conversion_names_the_malformed_member_and_item(tmp_path: Path, query_pairs: Path) -> None:
    member = "BingDistantTREx/final/final_distant_allbags_P2_new.json"
    bad_item = _tarball(tmp_path / "a.tar.xz", {}, {member: json.dumps([{"th_bags": ["x"], "h_bags": "oops"}]).encode()})
    with pytest.raises(DataError, match=rf"{member}: item 0: 'h_bags' must be a list of strings"):
        _convert_module().convert(bad_item, tmp_path / "out", query_pairs, level=3)
    bad_json = _tarball(tmp_path / "b.tar.xz", {}, {member: b"[{"})
    with pytest.raises(DataError, match=rf"{member}:1: malformed JSON"):
        _convert_module().convert(bad_json, tmp_path / "out", query_pairs, level=3)


def test_load_sentences_errors_name_the_file(tmp_path: Path, query_pairs: Path) -> None:
    with pytest.raises(DataError, match=r"missing resource file .*stats.json.*convert_bing_distant.py"):
        load_sentences(tmp_path / "nowhere" / "sentences.parquet", tmp_path / "nowhere" / "stats.json")
    out = tmp_path / "res"
    _convert_module().convert(_tarball(tmp_path / "t.tar.xz", BAGS), out, query_pairs, level=3)
    table = pq.read_table(out / "sentences.parquet").to_pandas()
    table.loc[1, "kind"] = "t"
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), out / "sentences.parquet")
    with pytest.raises(DataError, match=r"sentences.parquet: row 1: kind 't'; expected 'th' or 'h'"):
        load_sentences(out / "sentences.parquet", out / "stats.json")


def test_shipped_resource_matches_the_spec_counts() -> None:
    """The committed resources/bing_distant holds the official data (SPEC §6 counts)."""
    stats = json.loads((REPO / "resources/bing_distant/stats.json").read_text())
    assert stats["tarball_sha256"] == "83b2d1ab0cece0b007cf5c945eddc60a4cf2f2cdf4ec5283c29a35d0a97d128b"
    assert stats["counts"] == {"facts_without_th": 1409, "facts_without_h": 260, "facts_without_either": 167, "pool": 476237}
    meta = pq.read_metadata(REPO / "resources/bing_distant/sentences.parquet")
    assert meta.num_rows == stats["counts"]["pool"]
    query_pairs = json.loads((REPO / "resources/pararel/query_pairs.json").read_text())
    assert stats["facts_per_relation"] == {rel: len(pairs) for rel, pairs in query_pairs.items() if rel in stats["facts_per_relation"]}
    assert len(stats["facts_per_relation"]) == 34
    assert pd.Series(stats["sentences_per_relation"]).map(lambda c: c["th"] + c["h"]).sum() == meta.num_rows
