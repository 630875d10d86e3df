# Suppressing and amplifying knowledge neurons (SPEC §5): per relation, then the summary over relations.

EFFECTS = "3. Suppress and amplify"


rule evaluate:
    input:
        model_input(),
        lambda wc: shard_inputs(wc.relation),
        neurons=L.neurons("{relation}"),
        data=list(per_relation(L.relation_prompts).values()),  # other-relation prompts
    output:
        results=L.evaluation("{relation}"),
        dose=L.dose("{relation}"),
    params:
        record=L.benchmark(L.evaluation("{relation}")),
        overrides=stage_args("evaluate"),
        model=MODEL_FLAG,
        shards=lambda wc: shard_args(wc.relation),
        data=keyed_args(data=per_relation(L.relation_prompts)),
    log:
        L.log(L.evaluation("{relation}")),
    benchmark:
        L.benchmark(L.evaluation("{relation}"))
    threads: 1
    resources:
        mem_mb=4000,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} evaluate --relation {wildcards.relation} --threads {threads} {params.model} "
        "--in neurons={input.neurons} {params.shards} {params.data} "
        "--out results={output.results} --out dose={output.dose} {params.overrides} > {log} 2>&1"


rule evaluate_summary:
    input:
        results=list(per_relation(L.evaluation).values()),
        dose=list(per_relation(L.dose).values()),
    output:
        json=L.path("evaluate/summary.json"),
        csv=report(L.path("evaluate/summary.csv"), caption="../report/evaluate_summary.rst", category=EFFECTS),
        markdown=L.path("evaluate/summary.md"),
        dose_csv=report(L.path("evaluate/dose_response.csv"), caption="../report/dose_response_csv.rst", category=EFFECTS),
        suppress_png=report(L.path("evaluate/suppress.png"), caption="../report/suppress.rst", category=EFFECTS),
        suppress_pdf=L.path("evaluate/suppress.pdf"),
        amplify_png=report(L.path("evaluate/amplify.png"), caption="../report/amplify.rst", category=EFFECTS),
        amplify_pdf=L.path("evaluate/amplify.pdf"),
        dose_png=report(L.path("evaluate/dose_response.png"), caption="../report/dose_response.rst", category=EFFECTS),
        dose_pdf=L.path("evaluate/dose_response.pdf"),
    params:
        record=L.benchmark(L.path("evaluate/summary")),
        overrides=stage_args("evaluate_summary"),
        tables=keyed_args(results=per_relation(L.evaluation), dose=per_relation(L.dose)),
    log:
        L.log(L.path("evaluate/summary")),
    benchmark:
        L.benchmark(L.path("evaluate/summary"))
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} evaluate_summary {params.tables} "
        "--out json={output.json} --out csv={output.csv} --out markdown={output.markdown} "
        "--out dose_csv={output.dose_csv} --out suppress_png={output.suppress_png} "
        "--out suppress_pdf={output.suppress_pdf} --out amplify_png={output.amplify_png} "
        "--out amplify_pdf={output.amplify_pdf} --out dose_png={output.dose_png} --out dose_pdf={output.dose_pdf} "
        "{params.overrides} > {log} 2>&1"


TARGETS.append(L.path("evaluate/summary.json"))
