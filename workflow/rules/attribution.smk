# Knowledge attribution (SPEC §3): integrated gradients and the activation baseline,
# one job per (relation, shard of ig.facts_per_shard study facts). Dominates the DAG's cost.


rule attribute:
    input:
        model_input(),
        data=L.relation_prompts("{relation}"),
    output:
        scores=L.scores("{relation}", "{shard}"),
        prompts=L.shard_prompts("{relation}", "{shard}"),
    params:
        record=L.benchmark(L.scores("{relation}", "{shard}")),
        overrides=stage_args("attribute"),
        model=MODEL_FLAG,
    log:
        L.log(L.scores("{relation}", "{shard}")),
    benchmark:
        L.benchmark(L.scores("{relation}", "{shard}"))
    # One thread per job: shards are independent, so Snakemake fills the cores with parallel jobs.
    # On the shared 2-core machine (load 4-8) a 2-thread job took 1.6-7x the wall and CPU time of
    # a 1-thread job on the same shard (OpenMP threads spin while the other one is descheduled).
    threads: 1
    priority: PRIORITY["attribute"]
    resources:
        # the trained organism is small; a pretrained BERT-base/large with batch 64 needs a few GB
        mem_mb=2000 if TRAINED else 8000,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} attribute --relation {wildcards.relation} --shard {wildcards.shard} "
        "--threads {threads} --in data={input.data} {params.model} --out scores={output.scores} "
        "--out prompts={output.prompts} {params.overrides} > {log} 2>&1"


for _relation in RELATIONS:
    TARGETS.extend(shard_inputs(_relation))
