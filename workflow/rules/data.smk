# ParaRel ingestion (SPEC §2): per relation, then one combined table and its stats.


rule ingest_relation:
    input:
        lambda wc: pararel_resources(wc.relation),
    output:
        f"{RESULTS}/data/relations/{{relation}}.parquet",
    params:
        overrides=stage_args("seed", "data.resources_dir", "data.max_facts_per_relation"),
    log:
        log_path("data/relations/{relation}"),
    benchmark:
        bench_path("data/relations/{relation}")
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.ingest --relation {wildcards.relation} --out prompts={output} "
        "{params.overrides} > {log} 2>&1"


rule ingest:
    input:
        expand(f"{RESULTS}/data/relations/{{relation}}.parquet", relation=RELATIONS),
    output:
        prompts=f"{RESULTS}/data/prompts.parquet",
        facts=f"{RESULTS}/data/facts.parquet",
        stats=f"{RESULTS}/data/stats.json",
    params:
        overrides=stage_args("seed", "data"),
        relations_dir=lambda wc, input: os.path.dirname(input[0]),
    log:
        log_path("data/ingest"),
    benchmark:
        bench_path("data/ingest")
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.combine_data --in relations_dir={params.relations_dir} --out prompts={output.prompts} "
        "--out facts={output.facts} "
        "--out stats={output.stats} {params.overrides} > {log} 2>&1"


TARGETS.append(f"{RESULTS}/data/stats.json")
