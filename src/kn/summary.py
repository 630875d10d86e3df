"""The paper-vs-this-run table (SPEC §12): the paper's numbers from kn.paper_numbers, ours
read from the run's result files (never typed in).

Each row of :data:`kn.paper_numbers.PAPER_NUMBERS` has an extractor here that formats this
run's value from the loaded result files; a file the run did not produce gives "not run".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from kn.paper_numbers import PAPER_NUMBERS, PaperNumber

NOT_RUN = "not run"


@dataclass
class RunResults:
    """What the summary reads from a run (None: the file was not produced)."""

    data_stats: dict[str, Any] | None = None  # data/stats.json
    kn_stats: dict[str, Any] | None = None  # <model>/analysis/kn_stats.json
    evaluate: pd.DataFrame | None = None  # <model>/evaluate/summary.csv
    update: pd.DataFrame | None = None  # <model>/edit/update_summary.csv
    erase: pd.DataFrame | None = None  # <model>/edit/erase.csv
    distant: pd.DataFrame | None = None  # <model>/distant/activation_overall.csv
    attribution_seconds: list[float] = field(default_factory=list)  # wall time of every attribute job


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _pct(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):+.{digits}%}"


def _one(frame: pd.DataFrame, **where: Any) -> pd.Series | None:
    """The single row matching ``where`` (column=value), or None."""
    mask = pd.Series(True, index=frame.index)
    for column, value in where.items():
        if column not in frame.columns:
            return None
        mask &= frame[column].astype(str) == str(value)
    rows = frame[mask]
    return rows.iloc[0] if len(rows) else None


def _data(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
    if run.data_stats is None:
        return NOT_RUN, "", "data/stats.json"
    totals = run.data_stats.get("totals", {})
    studied = run.kn_stats["methods"]["ig"]["n_facts"] if run.kn_stats else None
    text = f"{totals.get('relations', 'n/a')} / {totals.get('facts', 'n/a')} / {totals.get('prompts', 'n/a')}"
    return text + (f" (studied: {studied} facts)" if studied is not None else ""), "", "data/stats.json"


def _attribution_time(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
    source = "benchmarks of the attribute jobs"
    studied = run.kn_stats["methods"]["ig"]["n_facts"] if run.kn_stats else None
    if not run.attribution_seconds or not studied:
        return NOT_RUN, "", source
    per_fact = sum(run.attribution_seconds) / studied
    return f"{per_fact:.2f} s (IG + base, job wall time incl. model loading, this machine)", "", source


def _kn_metric(metric: str) -> Callable[[RunResults, PaperNumber], tuple[str, str, str]]:
    def extract(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
        source = "analysis/kn_stats.json"
        if run.kn_stats is None:
            return NOT_RUN, NOT_RUN, source
        methods = run.kn_stats.get("methods", {})
        return _num(methods.get("ig", {}).get(metric), 2), _num(methods.get("base", {}).get(metric), 2), source

    return extract


def _layers(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
    source = "analysis/kn_stats.json"
    shares = (run.kn_stats or {}).get("layer_share", {}).get("ig")
    if not shares:
        return NOT_RUN, "", source
    n = len(shares)
    top = max(range(n), key=lambda layer: shares[layer])
    first_top = n - max(1, round(n / 3))  # the paper's 9-12 of 12 layers = the top third
    span = f"layer {n}" if first_top + 1 == n else f"layers {first_top + 1}–{n}"
    return f"most in layer {top + 1} of {n} ({shares[top]:.0%}); {span}: {sum(shares[first_top:]):.0%}", "", source


def _intervention(metric: str) -> Callable[[RunResults, PaperNumber], tuple[str, str, str]]:
    def extract(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
        source = "evaluate/summary.csv (mean over relations, all facts)"
        if run.evaluate is None:
            return NOT_RUN, NOT_RUN, source
        cells = []
        for method in ("ig", "base"):
            row = _one(run.evaluate, relation="mean", metric=metric, variant="all", method=method)
            cells.append("n/a" if row is None else f"{_pct(row['ratio'])} [{_pct(row['ci_low'])}, {_pct(row['ci_high'])}]")
        return cells[0], cells[1], source

    return extract


def _distant(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
    source = "distant/activation_overall.csv (all readable sentences)"
    if run.distant is None:
        return NOT_RUN, NOT_RUN, source
    cells = []
    for method in ("ig", "base"):
        row = _one(run.distant, subset="all", method=method)
        cells.append("n/a" if row is None else " / ".join(_num(row[t]) for t in ("T1", "T2", "T3")))
    return cells[0], cells[1], source


def _update(columns: tuple[str, ...], fmt: Callable[[Any], str]) -> Callable[[RunResults, PaperNumber], tuple[str, str, str]]:
    def extract(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
        source = "edit/update_summary.csv (all relations)"
        if run.update is None:
            return NOT_RUN, NOT_RUN, source
        cells = []
        for method in ("kn", "random"):
            row = _one(run.update, method=method, scope="all")
            cells.append("n/a" if row is None else " / ".join(fmt(row.get(c)) for c in columns) + f" ({int(row['edits'])} edits)")
        return cells[0], "random: " + cells[1], source

    return extract


def _erase(relation: str) -> Callable[[RunResults, PaperNumber], tuple[str, str, str]]:
    def extract(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
        source = "edit/erase.csv"
        if run.erase is None:
            return NOT_RUN, "", source
        row = _one(run.erase, relation=relation)
        if row is None:
            return "not erased in this run", "", source
        return f"{_num(row['ppl_before'], 1)} → {_num(row['ppl_after'], 1)} ({_pct(row['ppl_change'], 1)})", "", source

    return extract


def _erase_others(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
    source = "edit/erase.csv"
    if run.erase is None or run.erase.empty:
        return NOT_RUN, "", source
    low, high = run.erase.min(numeric_only=True), run.erase.max(numeric_only=True)
    before = f"{_num(low['other_ppl_before'], 1)}–{_num(high['other_ppl_before'], 1)}"
    after = f"{_num(low['other_ppl_after'], 1)}–{_num(high['other_ppl_after'], 1)}"
    change = f"{_pct(low['other_ppl_change'], 1)} to {_pct(high['other_ppl_change'], 1)}"
    return f"{before} → {after} ({change})", "", source


EXTRACTORS: dict[str, Callable[[RunResults, PaperNumber], tuple[str, str, str]]] = {
    "data": _data,
    "attribution_time": _attribution_time,
    "avg_kn": _kn_metric("avg_kn_per_fact"),
    "intra_shared": _kn_metric("intra_shared"),
    "inter_shared": _kn_metric("inter_shared"),
    "layers": _layers,
    "suppress": _intervention("suppress_own"),
    "amplify": _intervention("amplify_own"),
    "distant": _distant,
    "update_rates": _update(("change_rate", "success_rate"), lambda v: _pct(v, 1).lstrip("+")),
    "update_ppl": _update(("ppl_intra_delta", "ppl_inter_delta"), lambda v: _num(v, 1)),
    **{p.key: _erase(p.key.split(":", 1)[1]) for p in PAPER_NUMBERS if p.key.startswith("erase:")},
    "erase_others": _erase_others,
}

COLUMNS = ["experiment", "paper", "paper_baseline", "status", "this_run", "this_run_baseline", "source"]


def paper_vs_run(run: RunResults, numbers: tuple[PaperNumber, ...] = PAPER_NUMBERS) -> pd.DataFrame:
    """One row per SPEC §12 number: the paper's value and status beside this run's, and where ours comes from."""
    rows = []
    for number in numbers:
        ours, ours_baseline, source = EXTRACTORS[number.key](run, number)
        rows.append((number.experiment, number.paper, number.baseline, number.status, ours, ours_baseline, source))
    return pd.DataFrame(rows, columns=COLUMNS)
