# Shared helpers: compose the Hydra config once, hand each rule its resolved values.
import json
import os
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from kn.config import RUN_CONFIG_ENV, compose_config, flatten_overrides, run_config_text
from kn.data.pararel import fact_counts, load_relations, select_relations
from kn.integrity import quarantine_broken_parquet
from kn.jobrecord import install as record_jobs_own_usage
from kn.layout import Layout
from kn.stages.sections import sections_of
from kn.tables import study_fact_count


OVERRIDES = list(config.get("overrides", []))
CFG = compose_config(OVERRIDES)
CONDA_ENV = "../../environment.yml"  # relative to workflow/rules/; used with --use-conda
RESULTS = CFG.results_dir
MODEL = CFG.model.name
L = Layout(RESULTS, MODEL)  # every result path (kn.layout); everything model-specific lives under results/<model>/
ALL_RELATIONS = list(load_relations(Path(CFG.data.resources_dir)))
RELATIONS = select_relations(ALL_RELATIONS, CFG.data.relations)
FACT_COUNTS = fact_counts(Path(CFG.data.resources_dir), CFG.data.max_facts_per_relation)
TARGETS = []  # every rules file appends its final outputs
TRAINED = CFG.model.source == "trained"
GPU = 1 if CFG.device == "cuda" else 0  # resources.gpu of the rules that run the model

# Every job's benchmark file holds the job's own CPU time and peak RSS, which the stage worker measures
# (rules pass their benchmark path to kn.worker as --record); Snakemake alone would sample the client.
record_jobs_own_usage()

# The run's whole resolved config, written once per distinct config; every job's provenance
# names it (kn.io.provenance), while the job itself receives only the sections it reads.
RUN_CONFIG_SHA, RUN_CONFIG_TEXT = run_config_text(CFG, OVERRIDES)
os.environ[RUN_CONFIG_ENV] = L.run_config(RUN_CONFIG_SHA)

# A truncated/corrupt result file is moved aside before the DAG is built, so Snakemake
# recomputes its job instead of handing it on (kn.integrity). Cluster jobs re-parse this
# file: only the main process checks.
if workflow.is_main_process:
    for _broken, _moved in quarantine_broken_parquet(RESULTS):
        print(f"kn: {_broken} is truncated or corrupt; moved to {_moved}, its job will rerun", file=sys.stderr)


onstart:
    from kn.io import write_text

    if not Path(os.environ[RUN_CONFIG_ENV]).exists():
        write_text(os.environ[RUN_CONFIG_ENV], RUN_CONFIG_TEXT)


# Job order when cores are few (Snakemake runs the highest priority first): the long single edit jobs
# start as soon as their inputs exist, and the jobs that unlock others (probe -> attribute -> refine)
# come before the per-relation leaves (evaluate, localise, distant), which fill the cores to the end.
PRIORITY = {"edit_update": 30, "edit_erase": 25, "attribute": 20, "refine": 20, "probe": 10}


wildcard_constraints:
    relation=r"P\d+",
    model=r"[A-Za-z0-9_.\-]+",
    shard=r"\d+",


def stage_args(stage):
    """The config sections ``stage`` reads (kn.stages.sections), resolved, as quoted key=value params."""
    sections = sections_of(stage)
    return " ".join(shlex.quote(o) for o in flatten_overrides(CFG, list(CFG.keys()) if sections is None else sections))


def user_overrides():
    """The command line's own overrides, quoted: for stages that read config groups whose keys
    an experiment adds (sweep.variants), which flattened key=value overrides cannot create."""
    return " ".join(shlex.quote(o) for o in OVERRIDES)


def study_facts(relation):
    """Number of facts of ``relation`` that attribution and later stages study."""
    return study_fact_count(FACT_COUNTS[relation], CFG.study.facts_per_relation)


def shards(relation):
    """Shard ids of a relation's attribution (ig.facts_per_shard facts each)."""
    per = CFG.ig.facts_per_shard
    return [f"{k:03d}" for k in range((study_facts(relation) + per - 1) // per)]


def pararel_files(relations):
    """The ParaRel resource files a stage reading ``relations`` depends on."""
    root = CFG.data.resources_dir
    return [*(f"{root}/patterns/{rel}.jsonl" for rel in relations), f"{root}/query_pairs.json", f"{root}/lama_relations.jsonl"]


def model_input():
    """The trained organism's folder (a rule input and the stage's ``--in model``); nothing for pretrained models."""
    return [L.trained_model] if TRAINED else []


MODEL_FLAG = " ".join(f"--in model={shlex.quote(path)}" for path in model_input())


def all_targets(wildcards):
    return TARGETS


def shard_inputs(relation):
    """A relation's attribution shards and their prompt tables (docs/CONTRACTS.md, attribute)."""
    return [L.scores(relation, shard) for shard in shards(relation)] + [L.shard_prompts(relation, shard) for shard in shards(relation)]


def shard_args(relation):
    """``--in scores:<k>=... --in prompts:<k>=...`` for every shard of ``relation``."""
    return " ".join(
        f"--in scores:{shard}={shlex.quote(L.scores(relation, shard))} --in prompts:{shard}={shlex.quote(L.shard_prompts(relation, shard))}"
        for shard in shards(relation)
    )


def keyed_args(**kinds):
    """``--in <kind>:<key>=<path>`` flags, for each ``kind={key: path}`` given."""
    return " ".join(f"--in {kind}:{key}={shlex.quote(path)}" for kind, paths in kinds.items() for key, path in paths.items())


def per_relation(path_of, relations=None):
    """{relation: path_of(relation)} over the selected relations."""
    return {rel: path_of(rel) for rel in (RELATIONS if relations is None else relations)}


# Organism sweep (workflow/rules/sweep.smk)
def variant_overrides_for(variant):
    """Outer overrides + the variant's own, redirected into results/sweep/<variant>/."""
    from kn.sweep import variant_overrides

    redirect = [f"results_dir={RESULTS}/sweep/{variant}", "sweep.variants={}"]
    return [*OVERRIDES, *redirect, *variant_overrides(CFG.sweep.variants, variant)]


def variant_config_arg(variant):
    """``--config`` value that runs this workflow as the sweep variant."""
    return shlex.quote(f"overrides={json.dumps(variant_overrides_for(variant))}")


def variant_layout(variant):
    """The variant's own results layout (its config validated early)."""
    vcfg = compose_config(variant_overrides_for(variant))
    return Layout(vcfg.results_dir, vcfg.model.name)


# Activating prompts (workflow/rules/distant.smk)
DISTANT_KINDS = ("facts", "sentences", "activations")


def distant_tables(relations=None):
    """{kind: {relation: path}} of stage 4's per-relation tables."""
    return {kind: per_relation(lambda rel, kind=kind: L.distant(rel, kind), relations) for kind in DISTANT_KINDS}


def variant_files(variant):
    """{input kind: {key: path}} of a finished variant run that sweep_collect reads."""
    vcfg = compose_config(variant_overrides_for(variant))
    vl = Layout(vcfg.results_dir, vcfg.model.name)
    counts = fact_counts(Path(vcfg.data.resources_dir), vcfg.data.max_facts_per_relation)
    relations = select_relations(ALL_RELATIONS, vcfg.data.relations)
    per = vcfg.ig.facts_per_shard
    shard_ids = {
        rel: [f"{k:03d}" for k in range((study_fact_count(counts[rel], vcfg.study.facts_per_relation) + per - 1) // per)]
        for rel in relations
    }
    main_outputs = [
        vl.path("training/train_model"), vl.path("analysis/kn_stats"), vl.path("evaluate/summary"),
        *(vl.relation_prompts(rel) for rel in relations), *(vl.neurons(rel) for rel in relations),
        *(vl.evaluation(rel) for rel in relations), *(vl.localisation(rel) for rel in relations),
        vl.path("localise/ceiling"),
        *(vl.scores(rel, shard) for rel in relations for shard in shard_ids[rel]),
    ]
    return {
        "metrics": {"": vl.path("training/metrics.json")},
        "kn_stats": {"": vl.path("analysis/kn_stats.json")},
        "effects": {"": vl.path("evaluate/summary.csv")},
        "ceiling": {"": vl.path("localise/ceiling.csv")},
        "prompts": {f"{rel}/{shard}": vl.shard_prompts(rel, shard) for rel in relations for shard in shard_ids[rel]},
        "record": {rel: vl.refine_record(rel) for rel in relations},
        "neurons": {rel: vl.neurons(rel) for rel in relations},
        "benchmark": {str(k): vl.benchmark(path) for k, path in enumerate(main_outputs)},
    }


def variant_args(variant):
    """sweep_collect's ``--in`` flags for a variant."""
    flags = []
    for kind, paths in variant_files(variant).items():
        flags += [f"--in {kind}={shlex.quote(p)}" if key == "" else f"--in {kind}:{key}={shlex.quote(p)}" for key, p in paths.items()]
    return " ".join(flags)


COMPANION_DROPS = ("experiment=", "model=", "model.name=", "model.path=", "model.source=", "model.layer_norm_eps=",
                   "compare=", "results_dir=")


def companion_overrides(name):
    """model=<name>, then this run's overrides except those choosing the experiment, the model or the comparison
    (so data, study and method settings, and a trained organism's recipe overrides, agree)."""
    own = [o for o in OVERRIDES if not o.lstrip("+~").startswith(COMPANION_DROPS)]
    return [f"model={name}", *own, f"results_dir={RESULTS}", "compare=[]"]


# Positive control (workflow/rules/controls.smk): the planted copy's study is this workflow run into the controls folder
CONTROL_DIR = L.path("controls")
PLANTED = Layout(CONTROL_DIR, "planted")  # the nested run's own layout
PLANTED_DROPS = ("model=", "model.", "compare=", "results_dir=", "data.relations=", "data.resources_dir=",
                 "data.max_facts_per_relation=", "study.", "controls.enabled=")


def planted_overrides():
    """This run's overrides (the experiment and every method setting) on the planted copy and its planted facts."""
    own = [o for o in OVERRIDES if not o.lstrip("+~").startswith(PLANTED_DROPS)]
    return [*own, "model=hf", "model.name=planted", f"model.path={CONTROL_DIR}/model", f"results_dir={CONTROL_DIR}",
            f"data.resources_dir={CONTROL_DIR}/pararel", "data.max_facts_per_relation=null",
            "study.facts_per_relation=null", "data.relations=all", "compare=[]", "controls.enabled=false"]


def planted_study_files(wildcards=None):
    """{--in name: path} of what controls_summary reads: the planting record, the planted study's run record,
    the planted checkpoint and, when the study ran, its per-relation files (known once planting.json exists)."""
    study = checkpoints.planted_study.get().output[0]
    files = {"record": f"{CONTROL_DIR}/planting.json", "study": study, "model": f"{CONTROL_DIR}/model"}
    with open(study, encoding="utf-8") as handle:
        ran = json.load(handle)["ran"]
    if not ran:
        return files
    with open(files["record"], encoding="utf-8") as handle:
        planted = json.load(handle)["facts"]
    counts = {}
    for fact in planted:
        counts[fact["relation"]] = counts.get(fact["relation"], 0) + 1
    per = CFG.ig.facts_per_shard
    for rel, count in sorted(counts.items()):
        files[f"data:{rel}"] = PLANTED.relation_prompts(rel)
        files[f"neurons:{rel}"] = PLANTED.neurons(rel)
        files[f"evaluation:{rel}"] = PLANTED.evaluation(rel)
        files[f"localisation:{rel}"] = PLANTED.localisation(rel)
        files[f"studied:{rel}"] = L.relation_prompts(rel)
        for k in range((count + per - 1) // per):
            files[f"scores:{rel}/{k:03d}"] = PLANTED.scores(rel, f"{k:03d}")
            files[f"prompts:{rel}/{k:03d}"] = PLANTED.shard_prompts(rel, f"{k:03d}")
    return files
