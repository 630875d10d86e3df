"""kn.summary + kn.paper_numbers: the paper-vs-run table from hand-built result files."""

from __future__ import annotations

import pandas as pd

from kn.jobrecord import per_rule
from kn.paper_numbers import PAPER_NUMBERS
from kn.summary import EXTRACTORS, NOT_RUN, RunResults, paper_vs_run, verdict_lines


def _run() -> RunResults:
    evaluate = pd.DataFrame(
        [
            ("mean", "ig", "suppress_own", "all", -0.25, -0.30, -0.20),
            ("mean", "base", "suppress_own", "all", -0.01, -0.02, 0.0),
            ("mean", "ig", "suppress_own", "with_kn", -0.5, -0.6, -0.4),  # not the paper's variant
            ("P1", "ig", "suppress_own", "all", -0.9, -0.95, -0.85),  # a relation, not the mean
            ("mean", "ig", "amplify_own", "all", 0.125, 0.1, 0.15),
        ],
        columns=["relation", "method", "metric", "variant", "ratio", "ci_low", "ci_high"],
    )
    update = pd.DataFrame(
        [("kn", "all", 20, 0.5, 0.25, 3.0, 1.5), ("random", "all", 20, 0.05, 0.0, 0.5, 0.25), ("kn", "P1", 10, 1.0, 1.0, 9.0, 9.0)],
        columns=["method", "scope", "edits", "change_rate", "success_rate", "ppl_intra_delta", "ppl_inter_delta"],
    )
    erase = pd.DataFrame(
        [("P19", 10.0, 20.0, 1.0, 100.0, 110.0, 0.1), ("P27", 5.0, 6.0, 0.2, 90.0, 91.0, 0.01)],
        columns=["relation", "ppl_before", "ppl_after", "ppl_change", "other_ppl_before", "other_ppl_after", "other_ppl_change"],
    )
    distant = pd.DataFrame(
        [("all", "ig", 0.5, 0.25, -0.125, 0.4, 0.6, 0.2, 0.3, -0.25, 0.0), ("all", "base", 0.1, 0.2, 0.3, *[0.0] * 6),
         ("usable", "ig", 9.0, 9.0, 9.0, *[9.0] * 6)],
        columns=["subset", "method", "T1", "T2", "T3", "T1_ci_low", "T1_ci_high", "T2_ci_low", "T2_ci_high",
                 "T3_ci_low", "T3_ci_high"],
    )
    kn_stats = {
        "methods": {
            "ig": {"avg_kn_per_fact": 3.5, "intra_shared": 1.25, "inter_shared": None, "n_facts": 8},
            "base": {"avg_kn_per_fact": 2.0, "intra_shared": 0.5, "inter_shared": 0.75, "n_facts": 8},
        },
        "layer_share": {"ig": [0.1, 0.1, 0.2, 0.6, 0.0, 0.0]},
    }
    return RunResults(
        data_stats={"totals": {"relations": 2, "facts": 8, "prompts": 80}}, kn_stats=kn_stats, evaluate=evaluate,
        update=update, erase=erase, distant=distant,
        jobs=per_rule([("attribute", {"s": 3.0}), ("probe", {"s": 1.0}), ("attribute", {"s": 5.0})]),
    )  # fmt: skip


def test_every_paper_number_has_an_extractor_and_a_status() -> None:
    assert {p.key for p in PAPER_NUMBERS} == set(EXTRACTORS)
    assert all(p.status.startswith("[") or p.status.startswith("ours [") for p in PAPER_NUMBERS)
    assert len({p.key for p in PAPER_NUMBERS}) == len(PAPER_NUMBERS)


def test_paper_vs_run_reads_the_headline_rows() -> None:
    table = paper_vs_run(_run()).set_index("experiment")
    paper = {p.experiment: p for p in PAPER_NUMBERS}
    for experiment, row in table.iterrows():  # the paper's columns are SPEC's, untouched
        assert (row["paper"], row["paper_baseline"], row["status"]) == (paper[experiment].paper, paper[experiment].baseline, paper[experiment].status)
    assert table.loc["Data: relations / facts / prompts", "this_run"] == "2 / 8 / 80 (studied: 8 facts)"
    assert table.loc["Time to identify one fact's KNs", "this_run"].startswith(f"{(3.0 + 5.0) / 8:.2f} s")
    assert table.loc["Average #KN per fact", ["this_run", "this_run_baseline"]].tolist() == ["3.50", "2.00"]
    assert table.loc["Shared KNs, inter-relation pairs", ["this_run", "this_run_baseline"]].tolist() == ["n/a", "0.75"]
    assert table.loc["Layer distribution", "this_run"] == "most in layer 4 of 6 (60%); layers 5–6: 0%"
    assert table.loc["Suppress (×0): Δ correct probability", "this_run"] == "-25.00% [-30.00%, -20.00%]"
    assert table.loc["Suppress (×0): Δ correct probability", "this_run_baseline"] == "-1.00% [-2.00%, +0.00%]"
    assert table.loc["Amplify (×2): Δ correct probability", "this_run_baseline"] == "n/a"  # no base row
    assert table.loc["BingRel mean KN activation, T1 / T2 / T3", "this_run"] == (
        "0.500 [0.400, 0.600] / 0.250 [0.200, 0.300] / -0.125 [-0.250, 0.000]")
    assert table.loc["Update: change rate / success rate", "this_run"] == "50.0% / 25.0% (20 edits)"
    assert table.loc["Update: change rate / success rate", "this_run_baseline"] == "random: 5.0% / 0.0% (20 edits)"
    assert table.loc["Update: ΔPPL intra / inter", "this_run"] == "3.0 / 1.5 (20 edits)"
    assert table.loc["Erase P19 PPL", "this_run"] == "10.0 → 20.0 (+100.0%)"
    assert table.loc["Erase P106 PPL", "this_run"] == "not erased in this run"
    assert table.loc["Erase: other relations' PPL", "this_run"] == "90.0–100.0 → 91.0–110.0 (+1.0% to +10.0%)"


def test_missing_files_read_as_not_run() -> None:
    table = paper_vs_run(RunResults())
    assert (table["this_run"] == NOT_RUN).all()
    assert table["source"].str.len().gt(0).all()


def _cfg(source: str = "trained") -> object:
    from omegaconf import OmegaConf

    return OmegaConf.create({"model": {"name": "tiny", "source": source, "path": "/models/tiny"}})


def _full_run(train_accuracy: float = 0.9, random_suppress: float = -0.005) -> RunResults:
    """The summary fixture plus a probe, the localisation ceilings and the random-neuron control."""
    run = _run()
    run.probe = pd.DataFrame(
        [("P1", 0.75, 0.5, 0.5, 0.25), ("mean", train_accuracy, 0.625, 0.8, 0.25)],
        columns=["relation", "train_accuracy", "heldout_accuracy", "train_gold_prob", "majority_baseline"],
    )
    run.ceiling = pd.DataFrame(
        [("ALL", -0.5, -0.55, -0.45, -0.125, -0.75)],
        columns=["relation", "ffn_mask_all", "ffn_mask_all_ci_low", "ffn_mask_all_ci_high", "attn_mask_all", "ffn_subject_all"],
    )
    random = pd.DataFrame(
        [("mean", "random", "suppress_own", "all", random_suppress, -0.01, 0.0),
         ("mean", "random", "amplify_own", "all", 0.0025, 0.0, 0.005)],
        columns=run.evaluate.columns,
    )
    run.evaluate = pd.concat([run.evaluate, random], ignore_index=True)
    return run


def test_the_verdict_reads_the_run_in_five_lines() -> None:
    lines = verdict_lines(_cfg(), _full_run())
    assert len(lines) == 5
    model, where, neurons, effects, verdict = lines
    assert model == ("Model: `tiny` (trained by this pipeline) answers 90% of its prompts top-1, 62% on held-out "
                     "templates (mean gold probability 0.80; always answering each relation's commonest object: 25%).")
    assert where.startswith("Where its facts live: zeroing every FFN neuron at the answer position changes the gold "
                            "probability by -50.0% [-55.0%, -45.0%]")
    assert "attention output there: -12.5%" in where and "subject's tokens: -75.0%" in where
    assert neurons == ("Knowledge neurons: integrated gradients select 3.5 per fact (activation baseline 2.0; the paper: "
                       "4.13 on bert-base-cased), 60% of them in layer 4 of 6.")
    assert effects == ("Suppressing them (×0) changes the gold probability by -25.0% [-30.0%, -20.0%], 50% of that "
                       "ceiling; amplifying them (×2) by +12.5% [+10.0%, +15.0%]. As many random neurons from the same "
                       "layers (the negative control): -0.5% / +0.2%.")
    assert verdict.startswith("Verdict: Knowledge neurons found")


def test_the_verdict_follows_the_evidence() -> None:
    assert verdict_lines(_cfg(), _full_run(random_suppress=-0.25))[4].startswith("Verdict: Knowledge neurons not shown")
    beyond = _full_run()
    beyond.ceiling["ffn_mask_all"] = -0.001  # a model whose [MASK] FFNs hold nothing
    assert "[-30.0%, -20.0%], not within that ceiling; amplifying" in verdict_lines(_cfg(), beyond)[3]
    unlearned = verdict_lines(_cfg(), _full_run(train_accuracy=0.25))
    assert unlearned[0].endswith("25%): no better than that, so it has not learned its facts.")
    assert unlearned[4].startswith("Verdict: No claim")
    pretrained = verdict_lines(_cfg("pretrained"), _full_run())
    assert pretrained[0].startswith("Model: `tiny` (loaded from `/models/tiny`) answers 90%")
    nothing = verdict_lines(_cfg(), RunResults())
    assert nothing[4] == "Verdict: No verdict: the stages it needs did not run."
    assert "not measured" in nothing[0] and "not measured" in nothing[1] and nothing[3].endswith("not run.")


def test_the_controls_section_puts_the_planted_facts_beside_the_random_neurons() -> None:
    from kn.summary import control_lines

    run = _full_run()
    assert control_lines(run) == [
        "Positive control: not run (controls.enabled=false, or a stage it needs did not run).",
        "Negative control: as many random neurons from the same layers as each fact's knowledge neurons change the "
        "gold probability by -0.5% [-1.0%, +0.0%] (×0) and +0.2% [+0.0%, +0.5%] (×2).",
    ]
    run.controls = {"lines": ["IG recovers 70% of 629 planted units [34%, 100%]"]}
    assert control_lines(run)[0] == "IG recovers 70% of 629 planted units [34%, 100%]"
    run.evaluate = None
    assert len(control_lines(run)) == 1
