# Suppressing and amplifying knowledge neurons (SPEC §5): per relation, then the summary over relations.


rule evaluate:
    input:
        model_input(),
        neurons=f"{MODEL_DIR}/neurons/{{relation}}.parquet",
        scores=lambda wc: attribution_shards(wc.relation),
        prompts=lambda wc: shard_prompt_tables(wc.relation),
        data=expand(f"{RESULTS}/data/relations/{{relation}}.parquet", relation=RELATIONS),
    output:
        results=f"{MODEL_DIR}/evaluate/{{relation}}.parquet",
        dose=f"{MODEL_DIR}/evaluate/{{relation}}.dose.parquet",
    params:
        overrides=stage_args("seed", "model", "results_dir", "study", "evaluate"),
        shards=lambda wc, input: shard_args(input.scores),
        data=lambda wc, input: per_relation_args("data", input.data),
    log:
        log_path(f"{MODEL}/evaluate/{{relation}}"),
    benchmark:
        bench_path(f"{MODEL}/evaluate/{{relation}}")
    threads: 1
    resources:
        mem_mb=4000,
        gpu=1 if CFG.evaluate.device == "cuda" else 0,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.evaluate --relation {wildcards.relation} --threads {threads} "
        "--in neurons={input.neurons} {params.shards} {params.data} "
        "--out results={output.results} --out dose={output.dose} {params.overrides} > {log} 2>&1"


rule evaluate_summary:
    input:
        results=expand(f"{MODEL_DIR}/evaluate/{{relation}}.parquet", relation=RELATIONS),
        dose=expand(f"{MODEL_DIR}/evaluate/{{relation}}.dose.parquet", relation=RELATIONS),
    output:
        json=f"{MODEL_DIR}/evaluate/summary.json",
        csv=report(f"{MODEL_DIR}/evaluate/summary.csv", caption="../report/evaluate_summary.rst", category="3. Suppress and amplify"),
        markdown=f"{MODEL_DIR}/evaluate/summary.md",
        dose_csv=report(f"{MODEL_DIR}/evaluate/dose_response.csv", caption="../report/dose_response_csv.rst", category="3. Suppress and amplify"),
        suppress_png=report(f"{MODEL_DIR}/evaluate/suppress.png", caption="../report/suppress.rst", category="3. Suppress and amplify"),
        suppress_pdf=f"{MODEL_DIR}/evaluate/suppress.pdf",
        amplify_png=report(f"{MODEL_DIR}/evaluate/amplify.png", caption="../report/amplify.rst", category="3. Suppress and amplify"),
        amplify_pdf=f"{MODEL_DIR}/evaluate/amplify.pdf",
        dose_png=report(f"{MODEL_DIR}/evaluate/dose_response.png", caption="../report/dose_response.rst", category="3. Suppress and amplify"),
        dose_pdf=f"{MODEL_DIR}/evaluate/dose_response.pdf",
    params:
        overrides=stage_args("seed", "evaluate"),
        results=lambda wc, input: per_relation_args("results", input.results),
        dose=lambda wc, input: per_relation_args("dose", input.dose),
    log:
        log_path(f"{MODEL}/evaluate/summary"),
    benchmark:
        bench_path(f"{MODEL}/evaluate/summary")
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.evaluate_summary {params.results} {params.dose} "
        "--out json={output.json} --out csv={output.csv} --out markdown={output.markdown} "
        "--out dose_csv={output.dose_csv} --out suppress_png={output.suppress_png} "
        "--out suppress_pdf={output.suppress_pdf} --out amplify_png={output.amplify_png} "
        "--out amplify_pdf={output.amplify_pdf} --out dose_png={output.dose_png} --out dose_pdf={output.dose_pdf} "
        "{params.overrides} > {log} 2>&1"


TARGETS.append(f"{MODEL_DIR}/evaluate/summary.json")
