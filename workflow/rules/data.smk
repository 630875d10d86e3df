# ParaRel ingestion (SPEC §2): per relation, then one combined table and its stats.


rule ingest_relation:
    input:
        lambda wc: pararel_files([wc.relation]),
    output:
        L.relation_prompts("{relation}"),
    params:
        record=L.benchmark(L.relation_prompts("{relation}")),
        overrides=stage_args("ingest_relation"),
    log:
        L.log(L.relation_prompts("{relation}")),
    benchmark:
        L.benchmark(L.relation_prompts("{relation}"))
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} ingest_relation --relation {wildcards.relation} --out prompts={output} "
        "{params.overrides} > {log} 2>&1"


rule ingest:
    input:
        relations=list(per_relation(L.relation_prompts).values()),
    output:
        prompts=L.data("prompts.parquet"),
        facts=L.data("facts.parquet"),
        stats=L.data("stats.json"),
    params:
        record=L.benchmark(L.data("ingest")),
        overrides=stage_args("ingest"),
        relations=keyed_args(relation=per_relation(L.relation_prompts)),
    log:
        L.log(L.data("ingest")),
    benchmark:
        L.benchmark(L.data("ingest"))
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} ingest {params.relations} --out prompts={output.prompts} --out facts={output.facts} "
        "--out stats={output.stats} {params.overrides} > {log} 2>&1"


TARGETS.append(L.data("stats.json"))
