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
