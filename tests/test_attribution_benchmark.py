"""benchmarks/attribution_benchmark.py: the pure helpers of the EleutherAI knowledge-neurons comparison
(the comparison itself installs their package and is run by hand), and the stand-in's vocabulary padding."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from .snakemake_runs import REPO
from .standins import padded_vocabulary

_SPEC = importlib.util.spec_from_file_location("attribution_benchmark", REPO / "benchmarks" / "attribution_benchmark.py")
assert _SPEC is not None and _SPEC.loader is not None
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["attribution_benchmark"] = bench
_SPEC.loader.exec_module(bench)


def test_their_rule_is_linspace_with_equal_weights() -> None:
    rule = bench.eleuther_rule(20)
    # point k = (a / divisor) * multiplier_k = a * linspace(0, 1, 20)[k]
    assert torch.allclose(rule.multipliers / rule.divisor, torch.linspace(0, 1, 20))
    # score = (a / divisor) * sum_k weight_k g_k = a / m * sum_k g_k (KnowledgeNeurons.get_scores_for_layer)
    assert torch.allclose(rule.weights / rule.divisor, torch.full((20,), 1 / 20))
    with pytest.raises(ValueError):
        bench.eleuther_rule(1)


def test_summarise_speed_takes_medians_and_ours_over_theirs() -> None:
    ours = [{"s_per_prompt": s, "cpu_s_per_prompt": s} for s in (1.0, 2.0, 9.0)]
    theirs = [{"s_per_prompt": s, "cpu_s_per_prompt": 2 * s} for s in (10.0, 5.0, 6.0)]
    got = bench.summarise_speed(ours, theirs)
    assert got["ours_prompts_per_s"] == pytest.approx(0.5) and got["theirs_prompts_per_s"] == pytest.approx(1 / 6)
    assert got["ratio_wall"] == pytest.approx(3.0) and got["ratio_cpu"] == pytest.approx(6.0)


def test_bridge_pth_adds_each_site_dir() -> None:
    text = bench.bridge_pth_text(["/a/site-packages", "/b/it's"])
    assert text.splitlines() == ["import site; site.addsitedir('/a/site-packages')",
                                 "import site; site.addsitedir(\"/b/it's\")"]


def test_padded_vocabulary_continues_the_unused_tokens() -> None:
    vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "a", "[unused3]"]
    assert padded_vocabulary(vocab, None) == vocab
    assert padded_vocabulary(vocab, 8) == [*vocab, "[unused4]", "[unused5]"]
    with pytest.raises(ValueError):
        padded_vocabulary(vocab, 5)
