"""The evaluate_summary stage: unweighted mean over relations, CIs, markdown, figures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.stages.evaluation_run import evaluation_run  # noqa: F401 (session fixture)


def test_summary_tables_and_figures(evaluation_run: Path) -> None:
    summary = pd.read_csv(evaluation_run / "summary" / "summary.csv")
    mean = summary[(summary.relation == "mean") & (summary.variant == "all")].set_index(["method", "metric"])
    per = summary[(summary.relation != "mean") & (summary.variant == "all")].set_index(["relation", "method", "metric"])
    for method in ("ig", "base", "random"):
        expected = (per.loc[("P1", method, "suppress_own"), "ratio"] + per.loc[("P2", method, "suppress_own"), "ratio"]) / 2
        assert mean.loc[(method, "suppress_own"), "ratio"] == pytest.approx(expected)
    assert per.loc[("P1", "ig", "suppress_own"), "ratio"] < -0.5
    assert (summary.dropna().ci_low <= summary.dropna().ci_high).all()
    headline = json.loads((evaluation_run / "summary" / "summary.json").read_text())
    assert headline["provenance"]["stage"] == "evaluate_summary"
    assert "paper ours" in (evaluation_run / "summary" / "summary.md").read_text()
    for name in ("suppress.png", "suppress.pdf", "amplify.png", "amplify.pdf", "dose_response.png", "dose_response.pdf"):
        assert (evaluation_run / "summary" / name).stat().st_size > 1000
