# Activating prompts on web sentences (SPEC §6): stage 4 per relation (KN activations at
# [MASK] on T1 head+tail, T2 head-only and T3 random Bing sentences), its aggregation and
# figure, and stage 5 (the most/least activating sentences) for distant.trigger_relations.

SENTENCES = f"{CFG.distant.resources_dir}/sentences.parquet"
SENTENCE_STATS = f"{CFG.distant.resources_dir}/stats.json"
TRIGGER_RELATIONS = [rel for rel in CFG.distant.trigger_relations if rel in RELATIONS]
DISTANT = "4. Activating prompts"


rule distant:
    input:
        model_input(),
        data=L.relation_prompts("{relation}"),
        neurons=L.neurons("{relation}"),
        sentences=SENTENCES,
        sentence_stats=SENTENCE_STATS,
    output:
        facts=L.distant("{relation}", "facts"),
        sentences=L.distant("{relation}", "sentences"),
        activations=L.distant("{relation}", "activations"),
    params:
        record=L.benchmark(L.path("distant/{relation}")),
        overrides=stage_args("distant"),
        model=MODEL_FLAG,
    log:
        L.log(L.path("distant/{relation}")),
    benchmark:
        L.benchmark(L.path("distant/{relation}"))
    threads: 1
    resources:
        # the 476k-sentence pool takes ~1 GB in pandas; a pretrained BERT adds its weights and batch
        mem_mb=2000 if TRAINED else 6000,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} distant --relation {wildcards.relation} --threads {threads} {params.model} "
        "--in data={input.data} --in neurons={input.neurons} --in sentences={input.sentences} "
        "--in sentence_stats={input.sentence_stats} --out facts={output.facts} --out sentences={output.sentences} "
        "--out activations={output.activations} {params.overrides} > {log} 2>&1"


rule distant_summary:
    input:
        [path for paths in distant_tables().values() for path in paths.values()],
    output:
        fact_means=L.path("distant/fact_means.parquet"),
        by_relation=report(L.path("distant/activation_by_relation.csv"), caption="../report/distant_by_relation.rst", category=DISTANT),
        overall=report(L.path("distant/activation_overall.csv"), caption="../report/distant_overall.rst", category=DISTANT),
        usability=report(L.path("distant/usability.csv"), caption="../report/distant_usability.rst", category=DISTANT),
        markdown=report(L.path("distant/activation.md"), caption="../report/distant_markdown.rst", category=DISTANT),
        figure_png=report(L.path("distant/distant.png"), caption="../report/distant_figure.rst", category=DISTANT),
        figure_pdf=L.path("distant/distant.pdf"),
    params:
        record=L.benchmark(L.path("distant/summary")),
        overrides=stage_args("distant_summary"),
        tables=keyed_args(**distant_tables()),
    log:
        L.log(L.path("distant/summary")),
    benchmark:
        L.benchmark(L.path("distant/summary"))
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} distant_summary {params.tables} --out fact_means={output.fact_means} "
        "--out by_relation={output.by_relation} --out overall={output.overall} --out usability={output.usability} "
        "--out markdown={output.markdown} --out figure_png={output.figure_png} --out figure_pdf={output.figure_pdf} "
        "{params.overrides} > {log} 2>&1"


rule distant_triggers:
    input:
        data=L.relation_prompts("{relation}"),
        facts=L.distant("{relation}", "facts"),
        sentences=L.distant("{relation}", "sentences"),
        activations=L.distant("{relation}", "activations"),
    output:
        markdown=report(
            L.path("distant/triggers/{relation}.md"),
            caption="../report/distant_triggers.rst",
            category=DISTANT,
            subcategory="Trigger sentences",
            labels={"relation": "{relation}"},
        ),
    params:
        record=L.benchmark(L.path("distant/triggers/{relation}")),
        overrides=stage_args("distant_triggers"),
    log:
        L.log(L.path("distant/triggers/{relation}")),
    benchmark:
        L.benchmark(L.path("distant/triggers/{relation}"))
    threads: 1
    resources:
        mem_mb=500,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} distant_triggers --relation {wildcards.relation} --in data={input.data} "
        "--in facts={input.facts} --in sentences={input.sentences} --in activations={input.activations} "
        "--out markdown={output.markdown} {params.overrides} > {log} 2>&1"


TARGETS.extend(
    [
        L.path("distant/activation_overall.csv"),
        L.path("distant/activation.md"),
        L.path("distant/distant.png"),
        L.path("distant/distant.pdf"),
        *(L.path(f"distant/triggers/{rel}.md") for rel in TRIGGER_RELATIONS),
    ]
)
