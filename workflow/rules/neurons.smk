# Knowledge neurons (SPEC §4): refinement per relation, then the paper's statistics over all relations.


rule refine:
    input:
        lambda wc: shard_inputs(wc.relation),
    output:
        neurons=L.neurons("{relation}"),
        summary=L.refine_record("{relation}"),
    params:
        record=L.benchmark(L.neurons("{relation}")),
        overrides=stage_args("refine"),
        shards=lambda wc: shard_args(wc.relation),
    log:
        L.log(L.neurons("{relation}")),
    benchmark:
        L.benchmark(L.neurons("{relation}"))
    threads: 1
    priority: PRIORITY["refine"]
    resources:
        mem_mb=1000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} refine --relation {wildcards.relation} {params.shards} "
        "--out neurons={output.neurons} --out summary={output.summary} {params.overrides} > {log} 2>&1"


rule kn_analysis:
    input:
        neurons=list(per_relation(L.neurons).values()),
        records=list(per_relation(L.refine_record).values()),
    output:
        stats=L.path("analysis/kn_stats.json"),
        table=report(L.path("analysis/kn_stats.csv"), caption="../report/kn_stats.rst", category="2. Knowledge neurons"),
        markdown=L.path("analysis/kn_stats.md"),
        per_relation=report(L.path("analysis/kn_per_relation.csv"), caption="../report/kn_per_relation.rst", category="2. Knowledge neurons"),
        layers=report(L.path("analysis/layer_distribution.csv"), caption="../report/layer_distribution.rst", category="2. Knowledge neurons"),
        figure_png=report(L.path("analysis/kneurons_distribution.png"), caption="../report/kneurons_distribution.rst", category="2. Knowledge neurons"),
        figure_pdf=L.path("analysis/kneurons_distribution.pdf"),
    params:
        record=L.benchmark(L.path("analysis/kn_stats")),
        overrides=stage_args("kn_analysis"),
        tables=keyed_args(neurons=per_relation(L.neurons), record=per_relation(L.refine_record)),
    log:
        L.log(L.path("analysis/kn_stats")),
    benchmark:
        L.benchmark(L.path("analysis/kn_stats"))
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} kn_analysis {params.tables} "
        "--out stats={output.stats} --out table={output.table} --out markdown={output.markdown} "
        "--out per_relation={output.per_relation} --out layers={output.layers} "
        "--out figure_png={output.figure_png} --out figure_pdf={output.figure_pdf} "
        "{params.overrides} > {log} 2>&1"


TARGETS.append(L.path("analysis/kn_stats.json"))
