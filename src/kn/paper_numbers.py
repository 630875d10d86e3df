"""The paper's reported numbers (SPEC §12), with SPEC's status markers: the one copy the summary reads.

Markers: [DATA] checked on the data files; [2nd] agreed on by several secondary summaries,
not checked against the PDF; [mem] unverified recollection. ``values`` holds the numbers
for machine use (fractions for percentages); ``paper`` / ``baseline`` print them as SPEC does.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PaperNumber:
    key: str  # what kn.summary looks up in this run's files
    experiment: str
    paper: str  # the paper's "Ours" column
    baseline: str  # the paper's "Baseline / random" column
    status: str
    values: dict[str, float] = field(default_factory=dict)


PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    PaperNumber("data", "Data: relations / facts / prompts", "34 / 27,738 / 253,448", "–", "[DATA] = paper",
                {"relations": 34, "facts": 27738, "prompts": 253448}),
    PaperNumber("attribution_time", "Time to identify one fact's KNs", "13.3 s (~9 prompts, V100)", "–", "[2nd]",
                {"seconds_per_fact": 13.3}),
    PaperNumber("avg_kn", "Average #KN per fact", "4.13", "3.96", "ours [2nd]; baseline [mem]", {"ig": 4.13, "base": 3.96}),
    PaperNumber("intra_shared", "Shared KNs, intra-relation pairs", "1.23", "2.85", "ours [2nd]; baseline [mem]",
                {"ig": 1.23, "base": 2.85}),
    PaperNumber("inter_shared", "Shared KNs, inter-relation pairs", "0.09", "1.92", "ours [2nd]; baseline [mem]",
                {"ig": 0.09, "base": 1.92}),
    PaperNumber("layers", "Layer distribution", "mostly the topmost layers (≈ 9–12)", "–", "[2nd]; no per-layer values"),
    PaperNumber("suppress", "Suppress (×0): Δ correct probability", "−29.03%", "−1.47%", "[2nd]",
                {"ig": -0.2903, "base": -0.0147}),
    PaperNumber("amplify", "Amplify (×2): Δ correct probability", "+31.17%", "−1.27%", "[2nd]",
                {"ig": 0.3117, "base": -0.0127}),
    PaperNumber("distant", "BingRel mean KN activation, T1 / T2 / T3", "0.485 / 0.019 / −0.018", '"cannot distinguish"',
                "[2nd]", {"T1": 0.485, "T2": 0.019, "T3": -0.018}),
    PaperNumber("update_rates", "Update: change rate / success rate", "48.5% / 34.4%", "random: 4.7% / 0.0%", "[2nd]",
                {"change_rate": 0.485, "success_rate": 0.344, "random_change_rate": 0.047, "random_success_rate": 0.0}),
    PaperNumber("update_ppl", "Update: ΔPPL intra / inter", "8.4 / 7.2", "random: inter 4.3 (intra not recovered)", "[2nd]",
                {"ppl_intra_delta": 8.4, "ppl_inter_delta": 7.2, "random_ppl_inter_delta": 4.3}),
    PaperNumber("erase:P19", "Erase P19 PPL", "1450.0 → 2996.0 (+106.6%)", "–", "[2nd]", {"before": 1450.0, "after": 2996.0}),
    PaperNumber("erase:P106", "Erase P106 PPL", "2279.0 → 5202.0 (+128.2%)", "–", "[2nd]", {"before": 2279.0, "after": 5202.0}),
    PaperNumber("erase:P27", "Erase P27 PPL", "28.0 → 38.3 (+36.8%)", "–", "[mem]", {"before": 28.0, "after": 38.3}),
    PaperNumber("erase:P937", "Erase P937 PPL", "58.0 → 140.0 (+141.2%)", "–", "[mem]", {"before": 58.0, "after": 140.0}),
    PaperNumber("erase_others", "Erase: other relations' PPL", "120.1–143.6 → 121.6–151.9 (+1.1% to +10.1%)", "–",
                "[2nd] (ranges only)", {"before_low": 120.1, "before_high": 143.6, "after_low": 121.6, "after_high": 151.9}),
)  # fmt: skip


def paper_values(key: str) -> dict[str, float]:
    """The machine-readable values of one SPEC §12 row (stages print these beside ours)."""
    for number in PAPER_NUMBERS:
        if number.key == key:
            return dict(number.values)
    raise KeyError(f"no paper number {key!r}; known: {[n.key for n in PAPER_NUMBERS]}")


def paper_status(key: str) -> str:
    return next(n.status for n in PAPER_NUMBERS if n.key == key)
