"""Stage: suppress/amplify one relation's knowledge neurons (SPEC §5), for IG, base and a random control.

Inputs: ``--in neurons=<model>/neurons/<rel>.parquet``; the relation's attribution shards as
``--in scores:<k>=...`` and ``--in prompts:<k>=...`` (rankings for the dose curve); every
selected relation's prompt table as ``--in data:<rel>=...`` (other-relation prompts); the
trained organism as ``--in model=...`` (pretrained models come from ``model.path``).
Outputs: per-prompt probabilities ``--out results=...parquet`` and the dose curve
``--out dose=...parquet``.
"""

from __future__ import annotations

import logging

from kn.interventions import evaluate_relation, relation_inputs
from kn.io import provenance
from kn.models.adapters import adapter_for
from kn.stages.cli import StageArgs, load_model, run_stage
from kn.tables import DOSE, EVALUATION, RELATION_PROMPTS, read_attribution, read_neurons, shard_pairs, studied_rows

log = logging.getLogger("kn.evaluate")


def main(args: StageArgs) -> None:
    cfg, relation = args.cfg, args.require_relation()
    ec = cfg.evaluate
    prompts = {rel: studied_rows(RELATION_PROMPTS.read(path, rel), cfg.study.facts_per_relation)
               for rel, path in args.keyed_inputs("data").items()}
    neurons = read_neurons(args.input("neurons"), relation)
    attribution = read_attribution(shard_pairs(args.inputs), relation)
    loaded = load_model(args)
    dose_ks = sorted(k for k in ec.dose_ks if k <= ec.dose_max_k)
    inputs = relation_inputs(relation, prompts, loaded.tokenizer, int(cfg.seed), neurons, attribution.scores,
                             random_control=bool(ec.random_control), n_units=adapter_for(loaded.model).ffn_size,
                             dose_ks=dose_ks, codec=loaded.codec)
    results, dose = evaluate_relation(loaded.model, inputs, suppress_factor=float(ec.suppress_factor),
                                      amplify_factor=float(ec.amplify_factor), dose_ks=dose_ks,
                                      batch_size=int(ec.batch_size))
    record = provenance(cfg, "evaluate", relation=relation, **loaded.record())
    EVALUATION.write(args.output("results"), results, record)
    DOSE.write(args.output("dose"), dose, record)
    own = results[results["target"] == "own"]
    for method, group in own.groupby("method"):
        log.info("%s %s: suppress %.4f, amplify %.4f (ratio of averages, own prompts)", relation, method,
                 (group.p_suppress - group.p0).mean() / group.p0.mean(), (group.p_amplify - group.p0).mean() / group.p0.mean())


if __name__ == "__main__":
    run_stage(main)
