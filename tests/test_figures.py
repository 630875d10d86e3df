"""Figures: the paper's layer-distribution layout (SPEC §9) and byte-reproducible files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kn.figures import layer_distribution_figure, relation_bars_figure, save_figure


def test_layer_distribution_layout() -> None:
    shares = [0.0, 0.1, 0.25, 0.65]
    fig = layer_distribution_figure(shares)
    ax = fig.axes[0]
    assert ax.get_ylim() == pytest.approx((-0.68, 0.68))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4"]
    bars = ax.patches
    assert [b.get_y() for b in bars] == pytest.approx([-s for s in shares])  # centred on 0
    assert [b.get_height() for b in bars] == pytest.approx([2 * s for s in shares])
    labels = {round(t, 2): ax.yaxis.get_major_formatter()(t, 0) for t in (-0.5, 0.5)}
    assert labels == {-0.5: "50%", 0.5: "50%"}  # absolute percentages on both sides


def test_saved_figures_are_reproducible(tmp_path: Path) -> None:
    ratios = pd.DataFrame({"relation": ["P1", "P1", "P2", "P2"], "method": ["ig", "base"] * 2,
                           "ratio": [-0.3, -0.01, -0.2, 0.0], "ci_low": [-0.4, -0.02, -0.3, -0.01],
                           "ci_high": [-0.2, 0.0, -0.1, 0.01]})
    for run in ("a", "b"):
        save_figure(relation_bars_figure(ratios), [tmp_path / f"{run}.png", tmp_path / f"{run}.pdf"])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()
    assert (tmp_path / "a.pdf").read_bytes().startswith(b"%PDF")


def test_the_planted_recall_figure_draws_one_bar_pair_per_planted_layer_and_says_when_nothing_was_studied(tmp_path):
    from kn.figures import planted_recall_figure
    from kn.tables import PLANTED_LAYERS

    layers = pd.DataFrame([[0, 0, 0] + [float("nan")] * 6, [1, 2, 30, 0.5, 0.2, 0.8, 0.1, 0.0, 0.3]],
                          columns=list(PLANTED_LAYERS.columns))
    figure = planted_recall_figure(layers, 2)
    heights = sorted(round(p.get_height(), 3) for p in figure.axes[0].patches)
    assert heights == [0.0, 0.0, 0.1, 0.5]  # IG and baseline at layers 0 (nothing planted) and 1
    empty = planted_recall_figure(pd.DataFrame(columns=list(PLANTED_LAYERS.columns)), 2)
    assert any("no planted study" in text.get_text() for text in empty.axes[0].texts)
