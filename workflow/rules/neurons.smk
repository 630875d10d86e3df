# Knowledge neurons (SPEC §4): refinement per relation, then the paper's statistics over all relations.


rule refine:
    input:
        scores=lambda wc: attribution_shards(wc.relation),
        prompts=lambda wc: shard_prompt_tables(wc.relation),
    output:
        neurons=f"{MODEL_DIR}/neurons/{{relation}}.parquet",
        summary=f"{MODEL_DIR}/neurons/{{relation}}.json",
    params:
        overrides=stage_args("seed", "refine", "ig.storage_ratio"),
        shards=lambda wc, input: shard_args(input.scores),
    log:
        log_path(f"{MODEL}/neurons/{{relation}}"),
    benchmark:
        bench_path(f"{MODEL}/neurons/{{relation}}")
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.refine --relation {wildcards.relation} {params.shards} "
        "--out neurons={output.neurons} --out summary={output.summary} {params.overrides} > {log} 2>&1"


rule kn_analysis:
    input:
        model_input(),
        neurons=expand(f"{MODEL_DIR}/neurons/{{relation}}.parquet", relation=RELATIONS),
        summaries=expand(f"{MODEL_DIR}/neurons/{{relation}}.json", relation=RELATIONS),
    output:
        stats=f"{MODEL_DIR}/analysis/kn_stats.json",
        table=report(f"{MODEL_DIR}/analysis/kn_stats.csv", caption="../report/kn_stats.rst", category="2. Knowledge neurons"),
        markdown=f"{MODEL_DIR}/analysis/kn_stats.md",
        per_relation=report(f"{MODEL_DIR}/analysis/kn_per_relation.csv", caption="../report/kn_per_relation.rst", category="2. Knowledge neurons"),
        layers=report(f"{MODEL_DIR}/analysis/layer_distribution.csv", caption="../report/layer_distribution.rst", category="2. Knowledge neurons"),
        figure_png=report(f"{MODEL_DIR}/analysis/kneurons_distribution.png", caption="../report/kneurons_distribution.rst", category="2. Knowledge neurons"),
        figure_pdf=f"{MODEL_DIR}/analysis/kneurons_distribution.pdf",
    params:
        overrides=stage_args("seed", "model", "results_dir", "evaluate.inter_draws"),
        neurons=lambda wc, input: per_relation_args("neurons", input.neurons),
    log:
        log_path(f"{MODEL}/analysis/kn_stats"),
    benchmark:
        bench_path(f"{MODEL}/analysis/kn_stats")
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.kn_analysis {params.neurons} "
        "--out stats={output.stats} --out table={output.table} --out markdown={output.markdown} "
        "--out per_relation={output.per_relation} --out layers={output.layers} "
        "--out figure_png={output.figure_png} --out figure_pdf={output.figure_pdf} "
        "{params.overrides} > {log} 2>&1"


TARGETS.append(f"{MODEL_DIR}/analysis/kn_stats.json")
