# Shared helpers: compose the Hydra config once, hand each rule its resolved values.
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from kn.config import compose_config, flatten_overrides, model_location
from kn.data.pararel import fact_counts, load_relations, select_relations
from kn.integrity import quarantine_broken_parquet


OVERRIDES = list(config.get("overrides", []))
CFG = compose_config(OVERRIDES)
CONDA_ENV = "../../environment.yml"  # relative to workflow/rules/; used with --use-conda
RESULTS = CFG.results_dir
MODEL = CFG.model.name
RELATIONS = select_relations(list(load_relations(Path(CFG.data.resources_dir))), CFG.data.relations)
FACT_COUNTS = fact_counts(Path(CFG.data.resources_dir), CFG.data.max_facts_per_relation)
TARGETS = []  # every rules file appends its final outputs
MODEL_DIR = f"{RESULTS}/{MODEL}"  # everything model-specific lives under results/<model alias>/
MODEL_SPEC = model_location(CFG.model, RESULTS)  # trained dir, HF id or local path

# A truncated/corrupt result file is moved aside before the DAG is built, so Snakemake
# recomputes its job instead of handing it on (kn.integrity). Cluster jobs re-parse this
# file: only the main process checks.
if workflow.is_main_process:
    for _broken, _moved in quarantine_broken_parquet(RESULTS):
        print(f"kn: {_broken} is truncated or corrupt; moved to {_moved}, its job will rerun", file=sys.stderr)


wildcard_constraints:
    relation=r"P\d+",
    model=r"[A-Za-z0-9_.\-]+",
    shard=r"\d+",


def stage_args(*sections):
    """Resolved config sections as quoted key=value overrides for a stage CLI (use in params:)."""
    return " ".join(shlex.quote(o) for o in flatten_overrides(CFG, sections))


def user_overrides():
    """The command line's own overrides, quoted: for stages that read config groups whose keys
    an experiment adds (sweep.variants), which flattened key=value overrides cannot create."""
    return " ".join(shlex.quote(o) for o in OVERRIDES)


def study_facts(relation):
    """Number of facts of ``relation`` that attribution and later stages study."""
    n = FACT_COUNTS[relation]
    cap = CFG.study.facts_per_relation
    return n if cap is None else min(cap, n)


def shards(relation):
    """Shard ids of a relation's attribution (ig.facts_per_shard facts each)."""
    per = CFG.ig.facts_per_shard
    return [f"{k:03d}" for k in range((study_facts(relation) + per - 1) // per)]


def pararel_resources(relation):
    root = CFG.data.resources_dir
    return [f"{root}/patterns/{relation}.jsonl", f"{root}/query_pairs.json", f"{root}/lama_relations.jsonl"]


def model_input():
    """Input that makes a rule wait for the trained organism (nothing for pretrained models)."""
    return [f"{MODEL_DIR}/model"] if CFG.model.source == "trained" else []


def relation_data(relation):
    return f"{RESULTS}/data/relations/{relation}.parquet"


def log_path(output_path):
    """Logs mirror output paths under results/logs/."""
    return f"{RESULTS}/logs/{output_path}.log"


def bench_path(output_path):
    """Benchmarks mirror output paths under results/benchmarks/."""
    return f"{RESULTS}/benchmarks/{output_path}.tsv"


def all_targets(wildcards):
    return TARGETS


def attribution_shards(relation):
    """A relation's attribution score shards (docs/CONTRACTS.md, attribute)."""
    return [f"{MODEL_DIR}/attributions/{relation}/{shard}.parquet" for shard in shards(relation)]


def shard_prompt_tables(relation):
    """The per-prompt tables written beside each attribution shard."""
    return [f"{MODEL_DIR}/attributions/{relation}/{shard}.prompts.parquet" for shard in shards(relation)]


def shard_args(paths):
    """``--in scores<k>=<shard>`` flags: the stage reads each shard's .prompts.parquet from beside it."""
    return " ".join(f"--in scores{k:03d}={shlex.quote(path)}" for k, path in enumerate(paths))


def per_relation_args(name, paths):
    """``--in <name>:<relation>=<path>`` flags, one per selected relation (same order as RELATIONS)."""
    return " ".join(f"--in {name}:{rel}={shlex.quote(path)}" for rel, path in zip(RELATIONS, paths))


# Organism sweep (workflow/rules/sweep.smk)
def variant_overrides_for(variant):
    """Outer overrides + the variant's own, redirected into results/sweep/<variant>/."""
    from kn.sweep import variant_overrides

    redirect = [f"results_dir={RESULTS}/sweep/{variant}", "sweep.variants={}"]
    return [*OVERRIDES, *redirect, *variant_overrides(CFG.sweep.variants, variant)]


def variant_config_arg(variant):
    """``--config`` value that runs this workflow as the sweep variant."""
    return shlex.quote(f"overrides={json.dumps(variant_overrides_for(variant))}")


def variant_targets(variant):
    vcfg = compose_config(variant_overrides_for(variant))  # validates the variant's config early
    model_dir = f"{vcfg.results_dir}/{vcfg.model.name}"
    return [f"{model_dir}/model_card.md", f"{model_dir}/analysis/kn_stats.json", f"{model_dir}/evaluate/summary.csv"]
