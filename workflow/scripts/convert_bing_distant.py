"""Rebuild resources/bing_distant/ from the authors' tarball (final_distant_allbags.tar.xz).

    python workflow/scripts/convert_bing_distant.py /path/to/final_distant_allbags.tar.xz

Writes ``sentences.parquet`` (one zstd row per web sentence) and ``stats.json`` (fact
counts per relation, the SPEC §6 counts, sha256 of the tarball and of the parquet), after
checking that every relation list is aligned with ``query_pairs.json``, that the table
converts back to exactly the tarball's lists, and, for the official tarball, that the
counts equal SPEC §6's. Run once; the pipeline reads only the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from kn.data.bing import (  # noqa: E402
    OFFICIAL_COUNTS,
    OFFICIAL_SHA256,
    SENTENCE_SCHEMA,
    SENTENCES_FILE,
    STATS_FILE,
    bag_counts,
    bags_to_table,
    check_alignment,
    load_sentences,
    read_tarball,
    sha256_file,
    table_to_bags,
)
from kn.data.pararel import DataError, read_query_pairs  # noqa: E402
from kn.io import atomic_path, write_json  # noqa: E402


def convert(tarball: Path, out_dir: Path, query_pairs: Path, level: int) -> dict:
    """Convert, verify and write; returns the stats record."""
    tar_sha = sha256_file(tarball)
    official = tar_sha == OFFICIAL_SHA256
    if not official:
        print(f"note: {tarball} sha256 {tar_sha} is not the official {OFFICIAL_SHA256}; SPEC counts not checked", file=sys.stderr)
    bags = read_tarball(tarball)
    check_alignment(bags, read_query_pairs(query_pairs), str(tarball))
    counts = bag_counts(bags)
    if official and counts != OFFICIAL_COUNTS:
        raise DataError(f"{tarball}: counts {counts} differ from SPEC §6 {OFFICIAL_COUNTS}")
    table = pa.Table.from_pandas(bags_to_table(bags), schema=SENTENCE_SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata(None)  # no pandas metadata: the file depends on the data only
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / SENTENCES_FILE) as tmp:
        # One data page per column lets zstd see near-duplicate sentences across the whole file
        # (16 MB at level 19 vs 18 MB with the default 20k-row pages).
        pq.write_table(
            table, tmp, compression="zstd", compression_level=level, use_dictionary=["relation", "kind"],
            data_page_size=1 << 30, max_rows_per_page=table.num_rows + 1,
        )  # fmt: skip
    n_facts = {rel: len(items) for rel, items in bags.items()}
    stats = {
        "source": "Hunter-DDM/knowledge-neurons data/BingDistantTREx/final (MIT)",
        "tarball_sha256": tar_sha,
        "sentences_sha256": sha256_file(out_dir / SENTENCES_FILE),
        "counts": counts,
        "facts_per_relation": n_facts,
        "sentences_per_relation": {
            rel: {kind: sum(len(bag[kind]) for bag in items) for kind in ("th", "h")} for rel, items in bags.items()
        },
    }
    write_json(out_dir / STATS_FILE, stats)
    reread, reread_facts = load_sentences(out_dir / SENTENCES_FILE, out_dir / STATS_FILE)
    if table_to_bags(reread, reread_facts) != bags:
        raise DataError(f"{out_dir / SENTENCES_FILE}: does not convert back to the tarball's lists")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tarball", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "resources" / "bing_distant")
    parser.add_argument("--query-pairs", type=Path, default=REPO / "resources" / "pararel" / "query_pairs.json")
    parser.add_argument("--level", type=int, default=19, help="zstd level (19: ~16 MB, ~3 min; 9: ~18 MB, seconds)")
    args = parser.parse_args(argv)
    try:
        stats = convert(args.tarball, args.out, args.query_pairs, args.level)
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(json.dumps(stats["counts"]), "->", args.out / SENTENCES_FILE)


if __name__ == "__main__":
    main()
