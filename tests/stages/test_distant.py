"""Stages distant (4), distant_summary and distant_triggers (5) on a tiny model and hand-made sentences."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kn.data.bing import bags_to_table
from kn.distant import mask_tail, shown_ranks
from kn.io import read_provenance, write_parquet
from kn.stages import distant, distant_summary, distant_triggers
from kn.stages.cli import run_stage
from kn.tables import NEURONS as NEURONS_TABLE
from kn.tables import RELATION_PROMPTS

FACTS = [("Paris", "France"), ("Berlin", "Germany"), ("Rome", "Italy"), ("Madrid", "Castile")]
BAGS = {
    "P1": [
        {"th": ["Paris is the capital of France .", "In France , Paris is a city .", "France and Paris"],
         "h": ["Paris is a city", "Paris , the city of logic and physics", "who was born in Paris ?"]},
        {"th": ["Berlin is located in Germany ."], "h": ["Berlin is a city", "Berlin was the capital"]},
        {"th": ["Rome is in Italy ."], "h": []},  # no head-only sentence: skipped as no_exmp
        {"th": ["Madrid is in Castile ."], "h": ["Madrid is a city ."]},
    ],
    "P2": [{"th": ["Alan Turing worked in logic ."], "h": ["Einstein worked in physics", "England is a country"]}],
}
NEURONS = [  # (method, fact_id, layer, neuron, order); fact 3 has no KN at all, fact 1 no base KN
    ("ig", 0, 1, 5, 0), ("ig", 0, 0, 9, 1), ("base", 0, 1, 5, 0),
    ("ig", 1, 1, 60, 0),
    ("ig", 2, 0, 1, 0), ("base", 2, 0, 2, 0),
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distant-inputs")
    template = "[X] is the capital of [Y] ."
    rows = [("P1", "capital of", "N-1", fact_id, s, o, 0, template, template.replace("[X]", s).replace("[Y]", "[MASK]"))
            for fact_id, (s, o) in enumerate(FACTS)]
    data = pd.DataFrame(rows, columns=RELATION_PROMPTS.columns)
    write_parquet(root / "P1.parquet", data)
    neurons = pd.DataFrame([("P1", *row) for row in NEURONS], columns=["relation", "method", "fact_id", "layer", "neuron", "order"])
    write_parquet(root / "neurons.parquet", neurons)
    bing = root / "bing"
    bags = {rel: [{"th": b["th"], "h": b["h"]} for b in items] for rel, items in BAGS.items()}
    write_parquet(bing / "sentences.parquet", bags_to_table(bags))
    (bing / "stats.json").write_text(json.dumps({"facts_per_relation": {rel: len(items) for rel, items in BAGS.items()}}))
    return root


def _config(model_dir: Path, *extra: str) -> list[str]:
    return ["model.source=pretrained", f"model.path={model_dir}", "model.name=tiny", "study.facts_per_relation=null",
            "device=cpu", "distant.batch_size=2", *extra]  # fmt: skip


def _run_distant(inputs: Path, model_dir: Path, out: Path, *extra: str) -> Path:
    run_stage(distant.main, [
        "--relation", "P1", f"--in=data={inputs}/P1.parquet", f"--in=neurons={inputs}/neurons.parquet",
        f"--in=sentences={inputs}/bing/sentences.parquet", f"--in=sentence_stats={inputs}/bing/stats.json",
        f"--out=facts={out}/P1.facts.parquet",
        f"--out=sentences={out}/P1.sentences.parquet", f"--out=activations={out}/P1.activations.parquet",
        *_config(model_dir, *extra),
    ])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def stage4(inputs: Path, tiny_bert_dir: Path) -> Path:
    return _run_distant(inputs, tiny_bert_dir, inputs / "out")


def test_distant_statuses_masks_and_rows(stage4: Path) -> None:
    facts = pd.read_parquet(stage4 / "P1.facts.parquet").set_index("fact_id")
    assert facts["status_ig"].tolist() == ["ok", "ok", "no_exmp", "no_kn"]
    assert facts["status_base"].tolist() == ["ok", "no_kn", "no_exmp", "no_kn"]
    assert facts["n_th"].tolist() == [3, 1, 1, 1] and facts["n_h"].tolist() == [3, 2, 0, 1]
    assert facts["tail_single_token"].tolist() == [True, True, True, False]  # Castile is not in the vocabulary

    sentences = pd.read_parquet(stage4 / "P1.sentences.parquet")
    assert set(sentences["fact_id"]) == {0, 1, 3}  # masks are drawn for every fact with examples, KNs or not
    counts = sentences.groupby(["fact_id", "type"]).size()
    for fact_id in (0, 1, 3):
        assert counts[(fact_id, "T3")] == counts[(fact_id, "T1")] == len(BAGS["P1"][fact_id]["th"])
        assert counts[(fact_id, "T2")] == len(BAGS["P1"][fact_id]["h"])
    t1 = sentences[sentences["type"] == "T1"]
    subject_object = dict(enumerate(FACTS))
    assert t1["text"].tolist() == [mask_tail(BAGS["P1"][f]["th"][k], *subject_object[f]) for f, k in zip(t1["fact_id"], t1["sentence_idx"])]
    pool = [s for rel in sorted(BAGS) for bag in BAGS[rel] for s in bag["th"] + bag["h"]]
    t3 = sentences[sentences["type"] == "T3"]
    assert all(text.replace("[MASK]", word) == pool[idx] for text, word, idx in zip(t3["text"], t3["masked_word"], t3["source_idx"]))

    activations = pd.read_parquet(stage4 / "P1.activations.parquet")
    readable = sentences[sentences["readable"]]
    for method, fact_id, n_kn in (("ig", 0, 2), ("base", 0, 1), ("ig", 1, 1)):
        rows = activations[(activations["method"] == method) & (activations["fact_id"] == fact_id)]
        assert len(rows) == n_kn * (readable["fact_id"] == fact_id).sum()
    assert not (activations["fact_id"].isin([2, 3])).any() and not ((activations["method"] == "base") & (activations["fact_id"] == 1)).any()
    # both methods read the same sentences: a neuron they share has the same values
    shared = activations[(activations["fact_id"] == 0) & (activations["layer"] == 1) & (activations["neuron"] == 5)]
    by_method = {m: g.set_index(["type", "sentence_idx"])["activation"].sort_index() for m, g in shared.groupby("method")}
    pd.testing.assert_series_equal(by_method["ig"], by_method["base"])
    assert read_provenance(stage4 / "P1.activations.parquet")["seed"] == 42


def test_distant_is_deterministic_and_seeded(stage4: Path, inputs: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    again = _run_distant(inputs, tiny_bert_dir, tmp_path / "again")
    for name in ("facts", "sentences", "activations"):
        pd.testing.assert_frame_equal(pd.read_parquet(again / f"P1.{name}.parquet"), pd.read_parquet(stage4 / f"P1.{name}.parquet"))
    other = pd.read_parquet(_run_distant(inputs, tiny_bert_dir, tmp_path / "seed", "seed=7") / "P1.sentences.parquet")
    first = pd.read_parquet(stage4 / "P1.sentences.parquet")
    assert other[other["type"] == "T1"]["text"].tolist() == first[first["type"] == "T1"]["text"].tolist()
    assert other[other["type"] != "T1"]["text"].tolist() != first[first["type"] != "T1"]["text"].tolist()


def test_distant_names_a_relation_mismatch(inputs: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"P1.parquet: holds relation\(s\) \['P1'\]; expected only P2"):
        run_stage(distant.main, [
            "--relation", "P2", f"--in=data={inputs}/P1.parquet", f"--in=neurons={inputs}/neurons.parquet",
            f"--in=sentences={inputs}/bing/sentences.parquet", f"--in=sentence_stats={inputs}/bing/stats.json",
            f"--out=facts={tmp_path}/f.parquet",
            f"--out=sentences={tmp_path}/s.parquet", f"--out=activations={tmp_path}/a.parquet", *_config(tiny_bert_dir),
        ])  # fmt: skip


def test_summary_tables_figure_and_triggers(stage4: Path, inputs: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "summary"
    names = ("fact_means", "by_relation", "overall", "usability", "markdown", "figure_png", "figure_pdf")
    files = dict(zip(names, ("fact_means.parquet", "by_relation.csv", "overall.csv", "usability.csv", "activation.md", "distant.png", "distant.pdf")))
    run_stage(distant_summary.main, [
        *[f"--in={kind}:P1={stage4}/P1.{kind}.parquet" for kind in ("facts", "sentences", "activations")],
        *[f"--out={name}={out}/{file}" for name, file in files.items()], *_config(tiny_bert_dir),
    ])  # fmt: skip
    by_relation = pd.read_csv(out / "by_relation.csv")
    per_fact = pd.read_parquet(out / "fact_means.parquet")
    ig_all = by_relation[(by_relation["subset"] == "all") & (by_relation["method"] == "ig")].iloc[0]
    pooled = per_fact[(per_fact["subset"] == "all") & (per_fact["method"] == "ig")]
    assert ig_all["n_values"] == len(pooled) and ig_all["T1"] == pytest.approx(pooled["T1"].mean())
    overall = pd.read_csv(out / "overall.csv").set_index(["subset", "method"])
    assert overall.loc[("all", "ig"), "T2"] == pytest.approx(ig_all["T2"])  # one relation: overall = its mean
    usability = pd.read_csv(out / "usability.csv").set_index("relation")
    assert usability.loc["P1", "facts_no_exmp"] == 1 and usability.loc["P1", "T1_sentences"] == 5
    assert (out / "distant.png").read_bytes()[:4] == b"\x89PNG" and (out / "distant.pdf").read_bytes()[:4] == b"%PDF"
    assert "## How usable the web sentences are" in (out / "activation.md").read_text()

    run_stage(distant_triggers.main, [
        "--relation", "P1", f"--in=data={inputs}/P1.parquet", *[f"--in={k}={stage4}/P1.{k}.parquet" for k in ("facts", "sentences", "activations")],
        f"--out=markdown={out}/triggers/P1.md", *_config(tiny_bert_dir, "distant.trigger_lines=2"),
    ])  # fmt: skip
    text = (out / "triggers" / "P1.md").read_text()
    assert "## Fact 0: ⟨Paris, capital of, France⟩" in text and "## Fact 1: ⟨Berlin, capital of, Germany⟩" in text
    assert "Fact 3" not in text  # no IG knowledge neurons
    assert "Knowledge neurons: `1:5`, `0:9`" in text
    scores = [float(line.split("|")[2]) for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    fact0 = scores[:2]  # trigger_lines=2 of 3 sentences: the top one and the bottom one
    assert fact0 == sorted(fact0, reverse=True)


def test_shown_ranks_keep_top_and_bottom() -> None:
    assert shown_ranks(3, 20) == [0, 1, 2]
    assert shown_ranks(10, 5) == [0, 1, 2, 8, 9]


def test_a_relation_without_knowledge_neurons_gives_empty_tables(inputs: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    NEURONS_TABLE.write(tmp_path / "neurons.parquet", NEURONS_TABLE.empty(), {})
    run_stage(distant.main, [
        "--relation", "P1", f"--in=data={inputs}/P1.parquet", f"--in=neurons={tmp_path}/neurons.parquet",
        f"--in=sentences={inputs}/bing/sentences.parquet", f"--in=sentence_stats={inputs}/bing/stats.json",
        *[f"--out={k}={tmp_path}/P1.{k}.parquet" for k in ("facts", "sentences", "activations")],
        *_config(tiny_bert_dir),
    ])  # fmt: skip
    assert pd.read_parquet(tmp_path / "P1.activations.parquet").empty
    assert set(pd.read_parquet(tmp_path / "P1.facts.parquet")["status_ig"]) == {"no_kn", "no_exmp"}
    run_stage(distant_summary.main, [
        *[f"--in={k}:P1={tmp_path}/P1.{k}.parquet" for k in ("facts", "sentences", "activations")],
        *[f"--out={name}={tmp_path}/out/{name}.{ext}" for name, ext in [("fact_means", "parquet"), ("by_relation", "csv"), ("overall", "csv"),
                                                                       ("usability", "csv"), ("markdown", "md"), ("figure_png", "png"), ("figure_pdf", "pdf")]],
        *_config(tiny_bert_dir),
    ])  # fmt: skip
    assert pd.read_csv(tmp_path / "out" / "overall.csv").empty
    assert pd.read_csv(tmp_path / "out" / "usability.csv").set_index("relation").loc["P1", "facts_kn_ig"] == 0
