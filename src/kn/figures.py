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
import matplotlib.ticker as mticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, PercentFormatter  # noqa: E402

from kn.io import atomic_path  # noqa: E402

METHOD_STYLE = {  # label and colour per method, in plotting order
    "ig": ("Ours", "#4C72B0"),
    "base": ("Baseline", "#DD8452"),
    "random": ("Random", "#8C8C8C"),
}


def save_figure(fig: Figure, paths: Sequence[str | os.PathLike[str]], dpi: int = 150) -> None:
    """Save ``fig`` to each path (format from its suffix), atomically and reproducibly, then close it."""
    for path in paths:
        fmt = os.fspath(path).rsplit(".", 1)[-1].lower()
        metadata = {"CreationDate": None, "Producer": None} if fmt == "pdf" else {"Software": None}
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=metadata, dpi=dpi)
    plt.close(fig)


def training_loss_figure(step_loss: Sequence[float], running: Sequence[float], window: int, evaluations: Sequence[dict],
                         title: str) -> Figure:
    """Step loss with its running mean over ``window`` steps (log scale) and the periodic train / held-out accuracy."""
    steps = np.arange(1, len(step_loss) + 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, step_loss, color="0.8", linewidth=0.6, label="step loss")
    ax.plot(steps, running, color="C0", label=f"running mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    acc = ax.twinx()
    acc.plot([e["step"] for e in evaluations], [e["train_accuracy"] for e in evaluations], "o-", color="C1",
             label="train-template acc.")
    if evaluations and "heldout_accuracy" in evaluations[0]:
        acc.plot([e["step"] for e in evaluations], [e["heldout_accuracy"] for e in evaluations], "s--", color="C2",
                 label="held-out acc.")
    acc.set_ylim(0, 1)
    acc.set_ylabel("top-1 accuracy (eval sample)")
    lines, more = ax.get_legend_handles_labels(), acc.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


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


def _plot_effects(ax, rows: pd.DataFrame, methods: Sequence[str]) -> None:
    x = range(len(rows))
    for metric, marker in (("suppress_own", "v"), ("amplify_own", "^")):
        for method, colour in zip(methods, ("tab:blue", "tab:orange", "tab:gray")):
            col = f"{metric}_{method}"
            if col not in rows:
                continue
            yerr = None
            if method == "ig":
                yerr = [rows[col] - rows[f"{col}_ci_low"], rows[f"{col}_ci_high"] - rows[col]]
            ax.errorbar(x, rows[col], yerr=yerr, marker=marker, color=colour, linestyle="-" if method == "ig" else ":",
                        capsize=3, label=f"{metric.split('_')[0]} {method}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("correct-probability change ratio")
    ax.yaxis.set_major_formatter(mticker.PercentFormatter(1.0))


def sweep_effects_figure(table: pd.DataFrame, axes_spec: dict[str, list[tuple[str, str]]], methods: Sequence[str]) -> Figure:
    """Per factor: suppress/amplify ratios (IG with 95% CI, base, random; top) and knowledge
    neurons per fact (bottom), against the factor's values with the baseline in place.
    Variants whose model did not learn its facts stay plotted but are shaded and labelled."""
    present = set(table["variant"])  # a factor whose variants were not run (sweep.only) gets no panel
    factors = [f for f in axes_spec if sum(n in present for n, _ in axes_spec[f]) >= 2]
    ncols = max(1, len(factors))
    # y is not shared: one weakly trained variant's large ratio would flatten every other panel
    fig, axes = plt.subplots(2, ncols, figsize=(3.6 * ncols, 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    indexed = table.set_index("variant")
    for col, factor in enumerate(factors):
        points = [(n, label) for n, label in axes_spec[factor] if n in indexed.index]
        rows = indexed.loc[[n for n, _ in points]]
        top, bottom = axes[0][col], axes[1][col]
        _plot_effects(top, rows, methods)
        top.set_title(f"varied: {factor}")
        x = range(len(rows))
        for method, colour in (("ig", "tab:blue"), ("base", "tab:orange")):
            bottom.plot(x, rows[f"{method}_avg_kn"], marker="o", color=colour, label=f"{method}")
        bottom.axhspan(2, 5, color="tab:green", alpha=0.12, label="[2, 5] target")
        bottom.set_yscale("log")  # a model that stores nothing gets ~100 "neurons" per fact
        bottom.yaxis.set_major_formatter(mticker.ScalarFormatter())
        bottom.yaxis.set_minor_formatter(mticker.NullFormatter())
        bottom.set_ylabel("knowledge neurons / fact")
        labels = [label for _, label in points]
        for i, learned in enumerate(rows["learned_facts"]):
            if not learned:
                labels[i] += "\n(not learned)"
                for ax in (top, bottom):
                    ax.axvspan(i - 0.3, i + 0.3, color="tab:red", alpha=0.1, linewidth=0)
        for ax in (top, bottom):
            ax.set_xticks(list(x), labels, fontsize=7)
            ax.set_xlim(-0.5, len(rows) - 0.5)
        if col:
            top.set_ylabel("")
            bottom.set_ylabel("")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_scatter_figure(table: pd.DataFrame, x: str, xlabel: str, ceiling: bool = False) -> Figure:
    """IG suppress/amplify ratios (95% CI) against a per-variant column ``x`` (the mean gold probability, the
    [MASK]-FFN ceiling), whatever factor set it; hollow markers: variants that did not learn their facts.
    ``ceiling``: x is a suppression ceiling; the line y = x marks suppressions that reach it."""
    table = table[table[x].notna()]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for metric, marker, colour in (("suppress_own", "v", "tab:blue"), ("amplify_own", "^", "tab:red")):
        col = f"{metric}_ig"
        for learned in (True, False):
            rows = table[table["learned_facts"].astype(bool) == learned]
            if rows.empty:
                continue
            ax.errorbar(rows[x], rows[col], yerr=[rows[col] - rows[f"{col}_ci_low"],
                        rows[f"{col}_ci_high"] - rows[col]], marker=marker, linestyle="none", capsize=3,
                        color=colour, markerfacecolor=colour if learned else "white",
                        label=f"{metric.split('_')[0]} IG" + ("" if learned else " (not learned)"))
        for _, row in table.iterrows():
            ax.annotate(row["variant"], (row[x], row[col]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.6)
    if ceiling:
        low = min(-1.0, float(table[x].min())) if len(table) else -1.0
        ax.plot([low, 0], [low, 0], color="0.5", linestyle=":", linewidth=0.8, label="suppression = ceiling")
        ax.xaxis.set_major_formatter(mticker.PercentFormatter(1.0))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("correct-probability change ratio")
    ax.yaxis.set_major_formatter(mticker.PercentFormatter(1.0))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def localisation_figure(ceiling_all: dict[str, float], n_layers: int, title: str) -> Figure:
    """Relative change of the gold probability when one layer's FFN / attention output is zeroed at the
    target position (lines, layers printed 1..L), with the all-layer ablations as bars on the right."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    layers = np.arange(1, n_layers + 1)
    for component, label, marker in (("ffn", "FFN neurons at [MASK]", "o"), ("attn", "attention output at [MASK]", "s")):
        values = [ceiling_all.get(f"{component}_mask_layer_{k}", np.nan) for k in range(n_layers)]
        left.plot(layers, values, marker=marker, label=label)
    left.axhline(0, color="0.6", linewidth=0.8)
    left.set_xticks(layers)
    left.set_xlabel("layer")
    left.set_ylabel("relative change of P(gold)")
    left.yaxis.set_major_formatter(PercentFormatter(1.0))
    left.legend(fontsize=8)
    left.set_title("one layer zeroed")
    bars = [(name, ceiling_all[name]) for name in ("ffn_mask_all", "ffn_subject_all", "ffn_all_positions",
                                                   "attn_mask_all", "attn_subject_all", "attn_all_positions")
            if name in ceiling_all]
    right.barh([name for name, _ in bars][::-1], [value for _, value in bars][::-1],
               color=["C0" if name.startswith("ffn") else "C1" for name, _ in bars][::-1])
    right.axvline(0, color="0.6", linewidth=0.8)
    right.set_xlim(-1.05, max(0.05, max((v for _, v in bars), default=0) + 0.05))
    right.xaxis.set_major_formatter(PercentFormatter(1.0))
    right.set_title("all layers zeroed")
    right.tick_params(axis="y", labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def planted_recall_figure(layers: pd.DataFrame, n_layers: int) -> Figure:
    """Positive control: the share of planted units that IG and the baseline recover, by planted layer, with 95%
    bootstrap intervals over facts; layers where nothing was planted are left empty."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if layers.empty or not layers["facts"].sum():
        ax.text(0.5, 0.5, "no planted study (planting failed its acceptance)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        x = np.arange(n_layers)
        for offset, method in ((-0.18, "ig"), (0.18, "base")):
            label, colour = METHOD_STYLE[method]
            rows = layers.set_index("layer").reindex(x)
            value = rows[f"{method}_recall"].to_numpy(float)
            err = np.vstack([value - rows[f"{method}_recall_low"].to_numpy(float),
                             rows[f"{method}_recall_high"].to_numpy(float) - value])
            ax.bar(x + offset, np.nan_to_num(value), width=0.36, color=colour, label=label,
                   yerr=np.nan_to_num(err), capsize=2)
        for layer, facts in zip(layers["layer"], layers["facts"]):
            ax.text(layer, 1.03, f"{int(facts)}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("planted layer (facts above the bars)")
    ax.set_ylabel("planted units recovered")
    ax.set_ylim(0, 1.15)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    return fig
