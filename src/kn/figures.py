"""The paper's figures (SPEC §9) and the dose-response figure, written atomically as PNG and PDF.

Figures are built from result tables only (no model), with the Agg backend, and saved
with fixed metadata so the same tables give byte-identical files.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, PercentFormatter  # noqa: E402

from kn.io import atomic_path  # noqa: E402

METHOD_STYLE = {  # label and colour per method, in plotting order
    "ig": ("Ours", "#4C72B0"),
    "base": ("Baseline", "#DD8452"),
    "random": ("Random", "#8C8C8C"),
}


def save_figure(fig: Figure, paths: Sequence[str | os.PathLike[str]]) -> None:
    """Save ``fig`` to each path (format from its suffix), atomically and reproducibly, then close it."""
    for path in paths:
        fmt = os.fspath(path).rsplit(".", 1)[-1].lower()
        metadata = {"CreationDate": None, "Producer": None} if fmt == "pdf" else {"Software": None}
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=metadata, dpi=150)
    plt.close(fig)


def layer_distribution_figure(shares: Sequence[float]) -> Figure:
    """``kneurons_distribution``: per layer (printed 1..L) a bar centred on 0 extending ±share.

    y ticks show the absolute percentage, on the right; limits ±(max share + 0.03) (SPEC §9).
    """
    shares = np.asarray(shares, dtype=float)
    layers = np.arange(1, len(shares) + 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(shares) + 1.5), 3.0))
    ax.bar(layers, 2 * shares, bottom=-shares, width=0.6, color=METHOD_STYLE["ig"][1])
    limit = float(shares.max(initial=0.0)) + 0.03
    ax.set_ylim(-limit, limit)
    ax.set_xticks(layers)
    ax.set_xlabel("Layer")
    ax.yaxis.tick_right()
    ax.yaxis.set_label_position("right")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{abs(y) * 100:.0f}%"))
    ax.set_ylabel("Percentage of knowledge neurons")
    ax.axhline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    return fig


def relation_bars_figure(ratios: pd.DataFrame, ylabel: str = "Correct Probability Change Ratio") -> Figure:
    """``suppress``/``amplify``: per relation (sorted ids) one bar per method with its 95% CI.

    ``ratios`` has columns relation, method, ratio, ci_low, ci_high (one metric and
    variant). The paper plots Ours and Baseline; the random control is added when present.
    """
    relations = sorted(ratios["relation"].unique())
    methods = [m for m in METHOD_STYLE if m in set(ratios["method"])]
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(relations))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(relations) + 2.0), 3.2))
    for j, method in enumerate(methods):
        rows = ratios[ratios["method"] == method].set_index("relation").reindex(relations)
        value = rows["ratio"].to_numpy(dtype=float)
        err = np.vstack([value - rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float) - value])
        label, colour = METHOD_STYLE[method]
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, value, width, label=label, color=colour,
               yerr=np.nan_to_num(err), error_kw={"linewidth": 0.6, "capsize": 1.5})
    ax.set_xticks(x)
    ax.set_xticklabels(relations, rotation=90)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def dose_response_figure(curve: pd.DataFrame) -> Figure:
    """Mean over relations of the suppression ratio vs k (top-k neurons), one line per method.

    ``curve`` has columns method, k, ratio (and optionally ci_low, ci_high for a band).
    """
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for method in [m for m in METHOD_STYLE if m in set(curve["method"])]:
        rows = curve[curve["method"] == method].sort_values("k")
        label, colour = METHOD_STYLE[method]
        ax.plot(rows["k"], rows["ratio"], marker="o", markersize=3, label=label, color=colour)
        if {"ci_low", "ci_high"} <= set(rows.columns):
            ax.fill_between(rows["k"], rows["ci_low"], rows["ci_high"], color=colour, alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("k (top-k neurons suppressed)")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("Correct Probability Change Ratio")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


DISTANT_STYLE = {  # stage 4 sentence types: legend label and colour (SPEC §9, distant.pdf)
    "T1": ("containing head and tail", "#4C72B0"),
    "T2": ("only head", "#55A868"),
    "T3": ("random", "#8C8C8C"),
}


def distant_figure(per_relation: pd.DataFrame, ylabel: str = "Mean KN activation at [MASK]") -> Figure:
    """``distant``: per relation (sorted ids) three bars, the mean KN activation on T1 / T2 / T3.

    ``per_relation`` has columns relation, T1, T2, T3 (one method and sentence subset).
    """
    rows = per_relation.sort_values("relation")
    x = np.arange(len(rows))
    width = 0.8 / len(DISTANT_STYLE)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(rows) + 2.0), 3.2))
    for j, (kind, (label, colour)) in enumerate(DISTANT_STYLE.items()):
        ax.bar(x + (j - 1) * width, rows[kind].to_numpy(dtype=float), width, label=label, color=colour)
    ax.set_xticks(x)
    ax.set_xticklabels(rows["relation"].tolist(), rotation=90)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize="small", ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))  # above the bars
    fig.tight_layout()
    return fig
