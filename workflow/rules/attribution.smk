# Knowledge attribution (SPEC §3): integrated gradients and the activation baseline,
# one job per (relation, shard of ig.facts_per_shard study facts). Dominates the DAG's cost.


rule attribute:
    input:
        model_input(),
        data=lambda wc: relation_data(wc.relation),
    output:
        scores=f"{MODEL_DIR}/attributions/{{relation}}/{{shard}}.parquet",
        prompts=f"{MODEL_DIR}/attributions/{{relation}}/{{shard}}.prompts.parquet",
    params:
        overrides=stage_args("seed", "results_dir", "model", "ig", "study", "data.max_facts_per_relation"),
    log:
        log_path(f"{MODEL}/attributions/{{relation}}/{{shard}}"),
    benchmark:
        bench_path(f"{MODEL}/attributions/{{relation}}/{{shard}}")
    # One thread per job: shards are independent, so Snakemake fills the cores with parallel jobs.
    # On the shared 2-core machine (load 4-8) a 2-thread job took 1.6-7x the wall and CPU time of
    # a 1-thread job on the same shard (OpenMP threads spin while the other one is descheduled).
    threads: 1
    resources:
        # the trained organism is small; a pretrained BERT-base/large with batch 64 needs a few GB
        mem_mb=2000 if CFG.model.source == "trained" else 8000,
        gpu=1 if CFG.ig.device == "cuda" else 0,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.attribute --relation {wildcards.relation} --shard {wildcards.shard} "
        "--threads {threads} --in data={input.data} --out scores={output.scores} "
        "--out prompts={output.prompts} {params.overrides} > {log} 2>&1"


for _relation in RELATIONS:
    TARGETS.extend(attribution_shards(_relation) + shard_prompt_tables(_relation))
