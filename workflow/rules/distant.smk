# Activating prompts on web sentences (SPEC §6): stage 4 per relation (KN activations at
# [MASK] on T1 head+tail, T2 head-only and T3 random Bing sentences), its aggregation and
# figure, and stage 5 (the most/least activating sentences) for distant.trigger_relations.

DISTANT_RESOURCES = [f"{CFG.distant.resources_dir}/sentences.parquet", f"{CFG.distant.resources_dir}/stats.json"]
DISTANT_DIR = f"{MODEL_DIR}/distant"
TRIGGER_RELATIONS = [rel for rel in CFG.distant.trigger_relations if rel in RELATIONS]
DISTANT_CATEGORY = "4. Activating prompts"
DISTANT_TABLES = {  # stage 4's per-relation outputs, by kind
    kind: expand(f"{DISTANT_DIR}/{{relation}}.{kind}.parquet", relation=RELATIONS)
    for kind in ("facts", "sentences", "activations")
}


rule distant:
    input:
        model_input(),
        data=lambda wc: relation_data(wc.relation),
        neurons=f"{MODEL_DIR}/neurons/{{relation}}.parquet",
        resources=DISTANT_RESOURCES,
    output:
        facts=f"{DISTANT_DIR}/{{relation}}.facts.parquet",
        sentences=f"{DISTANT_DIR}/{{relation}}.sentences.parquet",
        activations=f"{DISTANT_DIR}/{{relation}}.activations.parquet",
    params:
        overrides=stage_args(
            "seed", "results_dir", "model", "study", "ig.device", "distant.resources_dir", "distant.max_len",
            "distant.max_mask_word", "distant.head_redraws", "distant.batch_size",
        ),
    log:
        log_path(f"{MODEL}/distant/{{relation}}"),
    benchmark:
        bench_path(f"{MODEL}/distant/{{relation}}")
    threads: 1
    resources:
        # the 476k-sentence pool takes ~1 GB in pandas; a pretrained BERT adds its weights and batch
        mem_mb=2000 if CFG.model.source == "trained" else 6000,
        gpu=1 if CFG.ig.device == "cuda" else 0,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.distant --relation {wildcards.relation} --threads {threads} "
        "--in data={input.data} --in neurons={input.neurons} --in sentences={input.resources[0]} "
        "--out facts={output.facts} --out sentences={output.sentences} --out activations={output.activations} "
        "{params.overrides} > {log} 2>&1"


rule distant_summary:
    input:
        facts=DISTANT_TABLES["facts"],
        sentences=DISTANT_TABLES["sentences"],
        activations=DISTANT_TABLES["activations"],
    output:
        fact_means=f"{DISTANT_DIR}/fact_means.parquet",
        by_relation=report(f"{DISTANT_DIR}/activation_by_relation.csv", caption="../report/distant_by_relation.rst", category=DISTANT_CATEGORY),
        overall=report(f"{DISTANT_DIR}/activation_overall.csv", caption="../report/distant_overall.rst", category=DISTANT_CATEGORY),
        usability=report(f"{DISTANT_DIR}/usability.csv", caption="../report/distant_usability.rst", category=DISTANT_CATEGORY),
        markdown=report(f"{DISTANT_DIR}/activation.md", caption="../report/distant_markdown.rst", category=DISTANT_CATEGORY),
        figure_png=report(f"{DISTANT_DIR}/distant.png", caption="../report/distant_figure.rst", category=DISTANT_CATEGORY),
        figure_pdf=f"{DISTANT_DIR}/distant.pdf",
    params:
        overrides=stage_args("seed", "model.name", "distant.max_len", "distant.max_unk_share"),
        tables=lambda wc, input: " ".join(
            per_relation_args(kind, getattr(input, kind)) for kind in ("facts", "sentences", "activations")
        ),
    log:
        log_path(f"{MODEL}/distant/summary"),
    benchmark:
        bench_path(f"{MODEL}/distant/summary")
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.distant_summary {params.tables} --out fact_means={output.fact_means} "
        "--out by_relation={output.by_relation} --out overall={output.overall} --out usability={output.usability} "
        "--out markdown={output.markdown} --out figure_png={output.figure_png} --out figure_pdf={output.figure_pdf} "
        "{params.overrides} > {log} 2>&1"


rule distant_triggers:
    input:
        data=lambda wc: relation_data(wc.relation),
        facts=f"{DISTANT_DIR}/{{relation}}.facts.parquet",
        sentences=f"{DISTANT_DIR}/{{relation}}.sentences.parquet",
        activations=f"{DISTANT_DIR}/{{relation}}.activations.parquet",
    output:
        markdown=report(
            f"{DISTANT_DIR}/triggers/{{relation}}.md",
            caption="../report/distant_triggers.rst",
            category=DISTANT_CATEGORY,
            subcategory="Trigger sentences",
            labels={"relation": "{relation}"},
        ),
    params:
        overrides=stage_args("seed", "model.name", "distant.trigger_lines"),
    log:
        log_path(f"{MODEL}/distant/triggers/{{relation}}"),
    benchmark:
        bench_path(f"{MODEL}/distant/triggers/{{relation}}")
    threads: 1
    resources:
        mem_mb=500,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.distant_triggers --relation {wildcards.relation} --in data={input.data} "
        "--in facts={input.facts} --in sentences={input.sentences} --in activations={input.activations} "
        "--out markdown={output.markdown} {params.overrides} > {log} 2>&1"


TARGETS.extend(
    [
        f"{DISTANT_DIR}/activation_overall.csv",
        f"{DISTANT_DIR}/activation.md",
        f"{DISTANT_DIR}/distant.png",
        f"{DISTANT_DIR}/distant.pdf",
        *expand(f"{DISTANT_DIR}/triggers/{{relation}}.md", relation=TRIGGER_RELATIONS),
    ]
)
