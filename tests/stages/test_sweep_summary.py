"""The sweep_summary stage on hand-built variant records and neuron tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kn.stages import sweep_summary
from kn.stages.cli import run_stage
from kn.sweep import chance_jaccard, layer_matched_chance_jaccard



def _record(name: str, suppress: float, ci_high: float, train_accuracy: float = 0.9, gold: float = 0.5) -> dict:
    record = {"variant": name, "factor": "stale", "value": "stale", "train_accuracy": train_accuracy,
              "majority_baseline": 0.25, "mean_gold_prob": gold, "ig_avg_kn": 3.0,
              "base_avg_kn": 4.0, "ig_layer_share": [0.25, 0.75], "n_layers": 2, "ffn_size": 4,
              "ffn_mask_all": 2 * suppress, "ffn_subject_all": -0.01, "attn_mask_all": -0.9,
              "ffn_mask_layers": [suppress / 2, 3 * suppress / 2]}
    for method in ("ig", "base", "random"):
        for metric, sign in (("suppress_own", -1), ("amplify_own", 1)):
            record[f"{metric}_{method}"] = sign * abs(suppress) if method == "ig" else 0.0
    record.update({"suppress_own_ig_ci_low": suppress - 0.01, "suppress_own_ig_ci_high": ci_high,
                   "amplify_own_ig_ci_low": 0.01, "amplify_own_ig_ci_high": 0.05})
    return record


def test_sweep_summary_table_figure_and_seed_stability(tmp_path):
    records = {"baseline": _record("baseline", -0.03, -0.01, gold=0.8), "ffn512": _record("ffn512", -0.02, 0.004, train_accuracy=0.1),
               "seed1": _record("seed1", -0.04, -0.02)}
    records["baseline"]["ig_neurons"] = [["P1", 0, 0, 1], ["P1", 0, 1, 2], ["P1", 1, 0, 5]]
    records["seed1"]["ig_neurons"] = [["P1", 0, 1, 2], ["P1", 1, 1, 7]]
    inputs = []
    for name, record in records.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
        inputs.append(f"--in=record:{name}={tmp_path / name}.json")
    out = tmp_path / "out"
    run_stage(sweep_summary.main, [
        *inputs, f"--out=csv={out}/sweep.csv", f"--out=markdown={out}/sweep.md", f"--out=json={out}/sweep.json",
        f"--out=figure_png={out}/effects.png", f"--out=figure_pdf={out}/effects.pdf",
        f"--out=confidence_png={out}/confidence.png", f"--out=confidence_pdf={out}/confidence.pdf",
        f"--out=ceiling_png={out}/ceiling.png", f"--out=ceiling_pdf={out}/ceiling.pdf",
        "experiment=organism-sweep", "sweep.only=[baseline,ffn512,seed1]",
    ])  # fmt: skip

    table = pd.read_csv(out / "sweep.csv")
    assert table["variant"].tolist() == ["baseline", "ffn512", "seed1"]  # config order
    assert table["factor"].tolist() == ["baseline", "ffn_width", "seed"]  # labels from the config, not the record
    assert table["effect_holds"].tolist() == [True, False, True]  # ffn512's suppression CI reaches above 0
    assert table["overrides"].fillna("").tolist() == ["", "model.train.intermediate_size=512", "model.train.seed=1"]
    assert table["learned_facts"].tolist() == [True, False, True]  # ffn512 is below its majority baseline
    assert table["ig_layer_share_L2"].tolist() == [0.75] * 3
    assert table["ffn_mask_all"].tolist() == pytest.approx([-0.06, -0.04, -0.08])  # the ceilings, per variant
    assert table["ffn_mask_L2"].tolist() == pytest.approx([-0.045, -0.03, -0.06])
    stability = json.loads((out / "sweep.json").read_text())["seed_stability"]["seed1"]
    assert stability["facts"] == 2 and stability["mean_jaccard"] == pytest.approx((1 / 2 + 0) / 2)
    assert stability["chance_jaccard"] == pytest.approx((chance_jaccard(2, 1, 8) + chance_jaccard(1, 1, 8)) / 2)
    # fact 0: {layer 0: 1, layer 1: 1} vs {layer 1: 1}; fact 1: layer 0 vs layer 1 can never overlap
    matched = layer_matched_chance_jaccard({0: 1, 1: 1}, {1: 1}, 4) / 2
    assert stability["chance_jaccard_layer_matched"] == pytest.approx(matched)
    md = (out / "sweep.md").read_text()
    assert "mean Jaccard 0.2500" in md and f"layer-matched {matched:.4f}" in md and "L2" in md
    assert "Over the 2 variants that learned their facts" in md  # too few to rank: reported as nan
    assert "**Did not learn its facts**" in md and "`ffn512`." in md
    assert (out / "effects.png").stat().st_size > 10_000 and (out / "effects.pdf").exists()
    assert (out / "confidence.png").stat().st_size > 10_000 and (out / "confidence.pdf").exists()
    assert (out / "ceiling.png").stat().st_size > 10_000 and (out / "ceiling.pdf").exists()
