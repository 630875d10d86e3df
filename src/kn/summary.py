"""The paper-vs-this-run table (SPEC §12): the paper's numbers from kn.paper_numbers, ours
read from the run's result files (never typed in).

Each row of :data:`kn.paper_numbers.PAPER_NUMBERS` has an extractor here that formats this
run's value from the loaded result files; a file the run did not produce gives "not run".
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
from omegaconf import OmegaConf

from kn.jobrecord import RuleUsage
from kn.markdown import markdown_table

from kn.paper_numbers import PAPER_NUMBERS, PaperNumber

NOT_RUN = "not run"
PAPER = {number.key: number for number in PAPER_NUMBERS}


@dataclass
class RunResults:
    """What the summary reads from a run (None: the file was not produced)."""

    data_stats: dict[str, Any] | None = None  # data/stats.json
    kn_stats: dict[str, Any] | None = None  # <model>/analysis/kn_stats.json
    evaluate: pd.DataFrame | None = None  # <model>/evaluate/summary.csv
    update: pd.DataFrame | None = None  # <model>/edit/update_summary.csv
    erase: pd.DataFrame | None = None  # <model>/edit/erase.csv
    distant: pd.DataFrame | None = None  # <model>/distant/activation_overall.csv
    probe: pd.DataFrame | None = None  # <model>/probe/accuracy.csv
    ceiling: pd.DataFrame | None = None  # <model>/localise/ceiling.csv
    controls: dict[str, Any] | None = None  # <model>/controls/summary.json (the positive control)
    jobs: list[RuleUsage] = field(default_factory=list)  # the job records (benchmark files) summed per rule


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
    attribute = next((usage for usage in run.jobs if usage.rule == "attribute"), None)
    if attribute is None or not studied:
        return NOT_RUN, "", source
    per_fact = attribute.wall_s / studied
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
        ceiling = _ceiling(run)
        if metric.startswith("suppress") and ceiling is not None:
            cells[0] += f" of a {_pct(ceiling['ffn_mask_all'], 1)} ceiling"
            source += "; ceiling: localise/ceiling.csv (ffn_mask_all, relation ALL)"
        return cells[0], cells[1], source

    return extract


def _ceiling(run: RunResults) -> pd.Series | None:
    """The ALL row of the localisation ceilings, if the diagnostic ran."""
    return None if run.ceiling is None else _one(run.ceiling, relation="ALL")


def localisation_text(run: RunResults) -> str:
    """Where the model keeps the studied facts (kn.localise), in words: the ceilings every number above lives under."""
    row = _ceiling(run)
    if row is None:
        return "Not measured (the localise stage did not run)."
    layers = sorted(int(c.rsplit("_", 1)[1]) for c in row.index if c.startswith("ffn_mask_layer_")
                    and not c.endswith(("_ci_low", "_ci_high")))
    per_layer = ", ".join(f"{k + 1}: {_pct(row[f'ffn_mask_layer_{k}'], 1)}" for k in layers)
    return (
        f"Relative change of the gold probability (mean over relations; p0 = {_num(row['p0'])}) when outputs are "
        f"zeroed in every layer: FFN neurons at the target position (the ceiling of any knowledge-neuron "
        f"suppression there) {_pct(row['ffn_mask_all'], 1)} [{_pct(row['ffn_mask_all_ci_low'], 1)}, "
        f"{_pct(row['ffn_mask_all_ci_high'], 1)}]; FFN at the subject's tokens {_pct(row['ffn_subject_all'], 1)}; "
        f"FFN at every position {_pct(row['ffn_all_positions'], 1)}; attention output at the target position "
        f"{_pct(row['attn_mask_all'], 1)}. One layer's FFN at the target position, by layer (1-based): {per_layer}. "
        "Per relation: localise/ceiling.csv; figure: localise/ceiling.png."
    )


def _effect(run: RunResults, method: str, metric: str) -> pd.Series | None:
    """The mean-over-relations row of one method's effect (all facts), if the run has it."""
    return None if run.evaluate is None else _one(run.evaluate, relation="mean", metric=metric, variant="all", method=method)


def _with_ci(row: pd.Series) -> str:
    return f"{_pct(row['ratio'], 1)} [{_pct(row['ci_low'], 1)}, {_pct(row['ci_high'], 1)}]"


def _model_line(cfg: Any, run: RunResults) -> tuple[str, bool | None]:
    """What the model knows, and whether it beats always answering each relation's commonest object."""
    trained = "trained by this pipeline" if cfg.model.source == "trained" else f"loaded from `{cfg.model.path}`"
    mean = None if run.probe is None else _one(run.probe, relation="mean")
    if mean is None:
        return f"Model: `{cfg.model.name}` ({trained}); what it knows was not measured (the probe did not run).", None
    learned = bool(mean["train_accuracy"] > mean["majority_baseline"])
    heldout = "" if pd.isna(mean["heldout_accuracy"]) else f", {mean['heldout_accuracy']:.0%} on held-out templates"
    text = (f"Model: `{cfg.model.name}` ({trained}) answers {mean['train_accuracy']:.0%} of its prompts top-1{heldout} "
            f"(mean gold probability {_num(mean['train_gold_prob'], 2)}; always answering each relation's commonest "
            f"object: {mean['majority_baseline']:.0%})")
    return text + ("." if learned else ": no better than that, so it has not learned its facts."), learned


def _ceiling_line(run: RunResults) -> tuple[str, float | None]:
    row = _ceiling(run)
    if row is None:
        return "Where its facts live: not measured (the localise stage did not run).", None
    text = (f"Where its facts live: zeroing every FFN neuron at the answer position changes the gold probability by "
            f"{_pct(row['ffn_mask_all'], 1)} [{_pct(row['ffn_mask_all_ci_low'], 1)}, {_pct(row['ffn_mask_all_ci_high'], 1)}], "
            f"the most any knowledge-neuron suppression there can do; the attention output there: "
            f"{_pct(row['attn_mask_all'], 1)}; the FFNs at the subject's tokens: {_pct(row['ffn_subject_all'], 1)}.")
    return text, float(row["ffn_mask_all"])


def _neurons_line(run: RunResults) -> str:
    if run.kn_stats is None:
        return "Knowledge neurons: not run."
    methods = run.kn_stats.get("methods", {})
    ig, base = methods.get("ig", {}), methods.get("base", {})
    text = (f"Knowledge neurons: integrated gradients select {_num(ig.get('avg_kn_per_fact'), 1)} per fact "
            f"(activation baseline {_num(base.get('avg_kn_per_fact'), 1)}; the paper: {PAPER['avg_kn'].paper} on "
            "bert-base-cased)")
    shares = run.kn_stats.get("layer_share", {}).get("ig")
    if shares:
        top = max(range(len(shares)), key=lambda layer: shares[layer])
        text += f", {shares[top]:.0%} of them in layer {top + 1} of {len(shares)}"
    return text + "."


def _effects_line(run: RunResults, ceiling: float | None) -> tuple[str, bool | None]:
    """Suppressing and amplifying the IG neurons beside the random-neuron control; whether the effect holds
    (both 95% CIs clear of 0 and of the random control's mean effect)."""
    suppress, amplify = _effect(run, "ig", "suppress_own"), _effect(run, "ig", "amplify_own")
    if suppress is None or amplify is None:
        return "Suppressing and amplifying them: not run.", None
    text = f"Suppressing them (×0) changes the gold probability by {_with_ci(suppress)}"
    if ceiling:  # a subset of neurons can do more than zeroing them all, e.g. in a model that knows nothing
        share = suppress["ratio"] / ceiling
        text += f", {share:.0%} of that ceiling" if 0 <= share <= 1 else ", not within that ceiling"
    text += f"; amplifying them (×2) by {_with_ci(amplify)}"
    holds = bool(suppress["ci_high"] < 0 and amplify["ci_low"] > 0)
    random_suppress, random_amplify = _effect(run, "random", "suppress_own"), _effect(run, "random", "amplify_own")
    if random_suppress is None or random_amplify is None:
        return text + ". No random-neuron control ran (evaluate.random_control).", holds
    holds = holds and bool(suppress["ci_high"] < random_suppress["ratio"] and amplify["ci_low"] > random_amplify["ratio"])
    return (text + f". As many random neurons from the same layers (the negative control): {_pct(random_suppress['ratio'], 1)} "
            f"/ {_pct(random_amplify['ratio'], 1)}."), holds


def verdict_lines(cfg: Any, run: RunResults) -> list[str]:
    """The run in five lines, read from its files: the model and what it knows, where its facts live, the
    knowledge neurons found, what suppressing them does beside the negative control, and the verdict."""
    model, learned = _model_line(cfg, run)
    where, ceiling = _ceiling_line(run)
    effects, holds = _effects_line(run, ceiling)
    if learned is False:
        conclusion = ("No claim: the model answers no better than the commonest object, and attribution finds "
                      "\"knowledge neurons\" in models that know nothing (docs/organisms.md).")
    elif holds is None or learned is None:
        conclusion = "No verdict: the stages it needs did not run."
    elif holds:
        conclusion = ("Knowledge neurons found: suppressing them lowers and amplifying them raises the gold probability, "
                      "both 95% intervals clear of 0 and of the random control.")
    else:
        conclusion = ("Knowledge neurons not shown: the suppression or amplification interval reaches 0 or the "
                      "random control's effect.")
    return [model, where, _neurons_line(run), effects, f"Verdict: {conclusion}"]


def _distant(run: RunResults, _p: PaperNumber) -> tuple[str, str, str]:
    source = "distant/activation_overall.csv (all readable sentences; 95% CIs over facts)"
    if run.distant is None:
        return NOT_RUN, NOT_RUN, source
    cells = []
    for method in ("ig", "base"):
        row = _one(run.distant, subset="all", method=method)
        cells.append("n/a" if row is None else " / ".join(
            f"{_num(row[t])} [{_num(row[f'{t}_ci_low'])}, {_num(row[f'{t}_ci_high'])}]" for t in ("T1", "T2", "T3")))
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


TITLES = {  # column titles of the paper-vs-run table
    "experiment": "experiment", "paper": "paper (ours)", "paper_baseline": "paper (baseline / random)",
    "status": "status", "this_run": "this run (IG)", "this_run_baseline": "this run (baseline / random)",
    "source": "this run's source",
}  # fmt: skip
TABLE_TITLES = {  # the study tables the HTML page shows, in order; rows filtered to the headline ones
    "probe": "Probe accuracy (per relation)",
    "kn_stats": "Knowledge-neuron statistics (SPEC §4)",
    "evaluate": "Suppressing and amplifying (SPEC §5), mean over relations",
    "ceiling": "Where the facts live: sublayer outputs zeroed (localise), mean over relations",
    "distant_overall": "Activating prompts (SPEC §6), overall",
    "distant_usability": "Activating prompts: usable sentences for this model",
    "update": "Updating facts (SPEC §7), over all relations",
    "erase": "Erasing relations (SPEC §8)",
    "controls": "Positive control: planted facts (all relations)",
    "jobs": "Job records: each rule's jobs (wall, CPU, peak memory)",
}
HEADLINE_ROWS = {"controls": ("relation", "ALL"), "evaluate": ("relation", "mean"), "ceiling": ("relation", "ALL"), "update": ("scope", "all"), "distant_usability": ("relation", "all")}


JOB_RECORDS_TEXT = (
    "Each job's own wall time, CPU time and peak memory (RSS), from its benchmark file under results/benchmarks/, "
    "summed per rule (the summary's own job and those after it are not in it). They size `mem_mb` and `runtime` "
    "for a cluster.")


def job_table(run: RunResults) -> pd.DataFrame:
    """The job records per rule, longest first: jobs, wall seconds (sum, longest job), CPU seconds, peak RSS."""
    return pd.DataFrame(
        [(u.rule, u.jobs, round(u.wall_s, 1), round(max(u.job_wall_s), 1), round(u.cpu_s, 1), round(u.max_rss_mb))
         for u in run.jobs],
        columns=["rule", "jobs", "wall s", "longest job s", "CPU s", "peak RSS MB"],
    )


def _demote_headings(text: str) -> str:
    """Nest a markdown document under a level-2 section (its '#' headings become '###')."""
    return "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())


def vocabulary_coverage(run: RunResults) -> str:
    """How many facts and prompts this tokenizer cannot score: objects that are not one token.

    The paper's data keep only objects that are one bert-base-cased wordpiece; any other
    vocabulary splits some objects, and those facts are left out of every measurement.
    A causal LM scores every object by its first token after the prompt (docs/causal.md):
    its line counts multi-token objects and the templates it cannot read or cuts.
    """
    if run.probe is None:
        return "Not measured (the probe did not run)."
    rows = run.probe[run.probe["relation"].astype(str) != "mean"]
    if "templates_used" in rows.columns:
        return causal_coverage(rows)
    facts, skipped = int(rows["facts"].sum()), int(rows["skipped_facts"].sum())
    prompts = int(rows["train_prompts"].sum() + rows["heldout_prompts"].sum() + rows["skipped_prompts"].sum())
    text = (f"Objects that are not one token of this tokenizer: {skipped} of {facts} ingested facts "
            f"({int(rows['skipped_prompts'].sum())} of {prompts} prompts) are left out of every measurement")
    if run.kn_stats is not None:
        ig = run.kn_stats["methods"]["ig"]
        dropped = int(ig.get("n_facts_without_attribution", 0))
        text += f"; of the studied facts, {dropped} of {int(ig['n_facts']) + dropped}"
    return text + "."


def causal_coverage(rows: pd.DataFrame) -> str:
    """The causal probe's per-tokenizer and per-template counts, summed over the relations."""
    total = lambda column: int(rows[column].sum())  # noqa: E731
    return (
        f"Causal LM (docs/causal.md): every object is scored by its first token after the prompt; "
        f"{total('multi_token_facts')} of {total('facts')} ingested facts have objects of several tokens for this "
        f"tokenizer (their exact match of the greedy continuation is reported in probe/accuracy.csv). Templates: "
        f"{total('templates')} in all ({len(rows)} relations), {total('templates_ending_in_y')} end in [Y], "
        f"{total('templates_text_after_y')} have text after [Y] (dropped when cut), {total('templates_subject_after_y')} "
        f"put the subject after [Y] (not used); {total('templates_used')} used. Facts with no readable prompt: "
        f"{total('skipped_facts')}."
    )


def comparison_table(this_run: str, comparison: pd.DataFrame, others: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The paper-vs-run table of this run beside other studies' (their summary.csv), row by row."""
    table = comparison[["experiment", "paper", "paper_baseline"]].copy()
    table[f"{this_run} (IG)"] = comparison["this_run"].to_numpy()
    for name, other in others.items():
        values = other.set_index("experiment")["this_run"]
        table[f"{name} (IG)"] = [values.get(e, "not in its summary") for e in table["experiment"]]
    table[f"{this_run} (baseline / random)"] = comparison["this_run_baseline"].to_numpy()
    for name, other in others.items():
        values = other.set_index("experiment")["this_run_baseline"]
        table[f"{name} (baseline / random)"] = [values.get(e, "not in its summary") for e in table["experiment"]]
    return table.fillna("")


def control_lines(run: RunResults) -> list[str]:
    """The positive control's lines (controls/summary.json) and the negative control's: random, layer-matched
    neurons suppressed and amplified beside the knowledge neurons (evaluate/summary.csv)."""
    lines = list(run.controls["lines"]) if run.controls else [
        "Positive control: not run (controls.enabled=false, or a stage it needs did not run)."]
    suppress, amplify = _effect(run, "random", "suppress_own"), _effect(run, "random", "amplify_own")
    if suppress is not None and amplify is not None:
        lines.append(f"Negative control: as many random neurons from the same layers as each fact's knowledge neurons "
                     f"change the gold probability by {_with_ci(suppress)} (×0) and {_with_ci(amplify)} (×2).")
    return lines


def summary_markdown(cfg: Any, comparison: pd.DataFrame, model_card: str | None, run: RunResults,
                     others: dict[str, pd.DataFrame] | None = None, coverage: dict[str, str] | None = None) -> str:
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    return "\n".join(
        [
            f"# Knowledge neurons: run summary for `{cfg.model.name}`",
            "",
            *(f"- {line}" for line in verdict_lines(cfg, run)),
            "",
            "Reproduction of Dai et al. (ACL 2022), *Knowledge Neurons in Pretrained Transformers*. The paper's numbers "
            "and their status markers come from SPEC §12 (`src/kn/paper_numbers.py`): [DATA] checked on the data, "
            "[2nd] agreed on by secondary summaries, [mem] unverified recollection. This run's numbers are read from "
            "its result files (column *this run's source*, under the model's results folder). The paper studies "
            "bert-base-cased on every fact; a different model or a subset of facts gives numbers that are not "
            "expected to match, only to be read side by side.",
            "",
            "## Paper vs this run",
            "",
            markdown_table(comparison, TITLES),
            *_beside(cfg, comparison, others, coverage),
            "## Controls: planted facts (positive) and random neurons (negative)",
            "",
            *(f"- {line}" for line in control_lines(run)),
            "",
            "## Where the facts live",
            "",
            localisation_text(run),
            "",
            "## Vocabulary coverage",
            "",
            vocabulary_coverage(run),
            "",
            "## Job records",
            "",
            JOB_RECORDS_TEXT,
            "",
            markdown_table(job_table(run)) if run.jobs else "No job records were given.",
            "",
            "## Model card",
            "",
            _demote_headings(model_card) if model_card else f"No model card: the model is `{cfg.model.path}` (not trained by the pipeline).",
            "",
            "## Configuration of this run",
            "",
            "```yaml",
            config_yaml.rstrip(),
            "```",
        ]
    )


def _beside(cfg: Any, comparison: pd.DataFrame, others: dict[str, pd.DataFrame] | None,
            coverage: dict[str, str] | None) -> list[str]:
    if not others:
        return []
    names = ", ".join(f"`{name}`" for name in others)
    lines = [
        f"## Beside {names}",
        "",
        f"This run (`{cfg.model.name}`) and the studies of {names} in the same results folder (config key `compare`), "
        "read from their summary.csv; each study has its own model, so numbers are read side by side.",
        "",
        markdown_table(comparison_table(str(cfg.model.name), comparison, others)),
    ]
    for name, text in (coverage or {}).items():
        lines += [f"Vocabulary coverage of `{name}`'s tokenizer: {text}", ""]
    return lines


CSS = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1300px}table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:left}th{background:#f0f0f0}"
    "pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:12px}"
)


def _inline_code(text: str) -> str:
    """Markdown's `code` spans as HTML, the rest escaped."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def summary_html(cfg: Any, comparison: pd.DataFrame, model_card: str | None, tables: dict[str, pd.DataFrame],
                 others: dict[str, pd.DataFrame] | None = None, verdict: list[str] | None = None,
                 controls: list[str] | None = None) -> str:
    """A self-contained page (no scripts, no external files) the Snakemake report shows inline."""

    def table(frame: pd.DataFrame) -> str:
        return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="n/a", border=0)

    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kn summary: {html.escape(cfg.model.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Knowledge neurons: run summary for <code>{html.escape(cfg.model.name)}</code></h1>",
        "<ul>" + "".join(f"<li>{_inline_code(line)}</li>" for line in verdict or []) + "</ul>",
        "<p>Paper numbers and status markers from SPEC §12 (<code>src/kn/paper_numbers.py</code>); this run's numbers "
        "read from its result files. Numbers of a different model or a subset of facts are read side by side, not "
        "expected to match.</p>",
        "<h2>Paper vs this run</h2>",
        table(comparison.rename(columns=TITLES)),
        "<h2>Controls: planted facts (positive) and random neurons (negative)</h2>",
        "<ul>" + "".join(f"<li>{_inline_code(line)}</li>" for line in controls or []) + "</ul>",
    ]
    if others:
        parts += [f"<h2>Beside {html.escape(', '.join(others))} (same results folder; each study has its own model)</h2>",
                  table(comparison_table(str(cfg.model.name), comparison, others))]
    parts += [
        "<h2>Tables of the study</h2>",
    ]
    for name, frame in tables.items():
        parts += [f"<h3>{html.escape(TABLE_TITLES[name])}</h3>", table(frame)]
    if not tables:
        parts.append("<p>No study table was produced.</p>")
    parts += [
        "<h2>Model card</h2>",
        f"<pre>{html.escape(model_card)}</pre>" if model_card else f"<p>No model card: the model is <code>{html.escape(str(cfg.model.path))}</code>.</p>",
        "<h2>Configuration of this run</h2>",
        f"<pre>{html.escape(OmegaConf.to_yaml(cfg, resolve=True))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
