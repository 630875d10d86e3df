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


def test_dose_curve_has_means_and_intervals(evaluation_run: Path) -> None:
    curve = pd.read_csv(evaluation_run / "summary" / "dose_response.csv")
    mean = curve[curve.relation == "mean"].set_index(["method", "k"])
    assert sorted(mean.index.get_level_values("k").unique()) == [1, 2, 50]
    assert set(mean.index.get_level_values("method")) == {"ig", "base", "random"}
    per = curve[curve.relation != "mean"].set_index(["relation", "method", "k"])
    assert mean.loc[("ig", 1), "ratio"] == pytest.approx((per.loc[("P1", "ig", 1), "ratio"] + per.loc[("P2", "ig", 1), "ratio"]) / 2)
    assert (mean.ci_low <= mean.ci_high).all()
