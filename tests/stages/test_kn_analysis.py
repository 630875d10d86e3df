"""The kn_analysis stage: fact-weighted averages, draw counts, layer shares, figure."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.stages.evaluation_run import RELATIONS, evaluation_run  # noqa: F401 (session fixture)


def test_kn_analysis_outputs(evaluation_run: Path) -> None:
    stats = json.loads((evaluation_run / "analysis" / "stats.json").read_text())
    neurons = pd.concat([pd.read_parquet(evaluation_run / "neurons" / f"{r}.parquet") for r in RELATIONS])
    n_facts = sum(len(f) for f in RELATIONS.values())
    for method in ("ig", "base"):
        assert stats["methods"][method]["avg_kn_per_fact"] == pytest.approx((neurons.method == method).sum() / n_facts)
        assert stats["methods"][method]["inter_draws"] == 3 * n_facts
    assert len(stats["layer_share"]["ig"]) == 2 and sum(stats["layer_share"]["ig"]) == pytest.approx(1.0)
    assert (evaluation_run / "analysis" / "figure_pdf.pdf").stat().st_size > 1000


def test_single_relation_writes_strict_json(tmp_path: Path) -> None:
    from kn.stages import kn_analysis
    from kn.stages.cli import run_stage

    neurons = pd.DataFrame({"relation": "P1", "method": ["ig", "ig", "base"], "fact_id": [0, 1, 0],
                            "layer": [1, 1, 0], "neuron": [3, 3, 2], "order": [0, 0, 0]})
    neurons.to_parquet(tmp_path / "P1.parquet")
    record = {m: {"n_facts": 3, "fact_ids": [0, 1, 2], "in_target": True, "avg_kn": 0.0, "p": 0.7, "evaluations": [],
                  "relation_level": []} for m in ("ig", "base")}
    (tmp_path / "P1.json").write_text(json.dumps({**record, "n_layers": 2, "ffn_size": 8}))
    outputs = {"stats": "json", "table": "csv", "markdown": "md", "per_relation": "csv", "layers": "csv",
               "figure_png": "png", "figure_pdf": "pdf"}
    run_stage(kn_analysis.main, [f"--in=neurons:P1={tmp_path}/P1.parquet", f"--in=record:P1={tmp_path}/P1.json",
                                 *[f"--out={k}={tmp_path}/out_{k}.{v}" for k, v in outputs.items()]])

    def no_nan(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    stats = json.loads((tmp_path / "out_stats.json").read_text(), parse_constant=no_nan)["methods"]
    assert stats["ig"]["inter_shared"] is None and stats["ig"]["inter_draws"] == 0
    assert stats["ig"]["intra_shared"] == pytest.approx(1 / 3)  # facts 0 and 1 share (1, 3); 3 pairs
    assert stats["ig"]["n_facts_without_kn"] == 1 and stats["base"]["n_facts_without_kn"] == 2
    assert "n/a" in (tmp_path / "out_markdown.md").read_text()
